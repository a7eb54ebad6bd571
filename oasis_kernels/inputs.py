"""Validation of the inputs every entry point takes: ``q, k, v [B, N, heads, D]`` and a plan.

Bad inputs get a TypeError or ValueError naming the offending value before any work starts.
"""

from __future__ import annotations

import math

import torch

from .plan import RoutingPlan

__all__ = ["check_inputs", "prepare_inputs", "resolve_scale", "unit_stride"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

def check_inputs(q, k, v, plan: RoutingPlan) -> None:
    """Raise TypeError/ValueError naming the offending value; return None when all is well."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan, got {type(plan).__name__}: {plan!r}")
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, tokens, heads, head_dim], got {q.shape=}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must have the same shape, got {q.shape=}, {k.shape=}, {v.shape=}")
    if q.dtype not in _FLOATS:
        raise TypeError(f"q, k, v must be float16, bfloat16, float32 or float64, got {q.dtype=}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device=}, {k.device=}, {v.device=}")
    b, n, heads, d = q.shape
    if n != plan.num_tokens:
        raise ValueError(
            f"{q.shape=} has N={n} tokens but {plan.grid=} holds T*H*W={plan.num_tokens}"
        )
    if heads != plan.heads:
        raise ValueError(f"{q.shape=} has {heads} heads but the plan routes len(plan.modes)={plan.heads}")
    if d == 0:
        # an empty batch is fine (empty outputs, as PyTorch's SDPA); a zero head dim has no
        # softmax scale 1/sqrt(D) and no backend takes it
        raise ValueError(f"head_dim must be positive, got {q.shape=} (an empty batch, B = 0, is allowed)")


def resolve_scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}: {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale=}")
    return float(scale)


def prepare_inputs(q, k, v, plan, scale):
    """Validated inputs and the resolved scale. Every kernel reads the head dim as contiguous
    rows (other strides are free), so a tensor strided there is copied once (``v is k`` stays
    so). Unaligned data pointers are fixed inside the op (:func:`oasis_kernels.dispatch.aligned`),
    where tensors are real under ``torch.compile`` too."""
    check_inputs(q, k, v, plan)
    v_is_k = v is k
    q, k = unit_stride(q), unit_stride(k)
    return q, k, k if v_is_k else unit_stride(v), resolve_scale(scale, q.shape[-1])


def unit_stride(x):
    return x.contiguous() if x.stride(-1) != 1 and x.shape[-1] > 1 else x
