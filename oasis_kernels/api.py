"""Public entry points.

Every function takes ``q, k, v`` of shape ``[B, N, heads, D]`` (FlashAttention's and
Wan2.1's layout) with the ``N = T*H*W`` tokens flattened t-major, then h, then w, and
returns ``out`` of the same shape (plus ``lse [B, heads, N]`` with ``return_lse=True``).
All of them run a prepared call (:mod:`oasis_kernels.call`): through the
``oasis_kernels::routed_attention_fwd`` custom op when traced by ``torch.compile``, and without
the op's wrappers in eager mode (:func:`oasis_kernels.call.routed_attention_call`).
"""

from __future__ import annotations

from typing import Mapping

import torch

from .call import routed_attention_call
from .dispatch import normalize_backend
from .inputs import check_inputs, prepare_inputs
from .plan import Mode, RoutingPlan
from .reference import accumulate_dtype

__all__ = ["routed_attention", "global_attention", "intra_frame_attention", "window_attention", "check_inputs",
           "add_observer", "remove_observer", "attention_lse"]

# callables(q, k, plan, scale) that see every routed_attention call (routing calibration)
_OBSERVERS: list = []


def add_observer(fn) -> None:
    """Call ``fn(q, k, plan, scale)`` on every :func:`routed_attention` call (eager only)."""
    _OBSERVERS.append(fn)


def remove_observer(fn) -> None:
    _OBSERVERS.remove(fn)


def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: RoutingPlan,
    *,
    scale: float | None = None,
    backend: "str | Mapping" = "auto",
    return_lse: bool = False,
    deterministic: bool = False,
):
    """Attention whose heads each follow their own pattern (OASIS, eqs. 5-7).

    Args:
        q, k, v: ``[B, N, heads, D]``, ``N = T*H*W`` tokens in t-major order; fp16, bf16,
            fp32 or fp64; any strides (a tensor whose head dim is not contiguous, or whose data
            pointer or row strides are not 16-byte aligned, is copied once).
        plan: :class:`RoutingPlan` with ``plan.grid == (T, H, W)`` and one mode per head.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto"``; a backend name (``"triton"``, ``"reference"``, ``"sdpa_cudnn"`` ...)
            or alias (``"sdpa"``, ``"flash"``, ``"dense"``) used for every mode it serves (the
            others go to ``auto``); or a mapping from mode to name. ``oasis_kernels.explain``
            shows the choice and every declined backend's reasons.
        return_lse: also return the natural-log log-sum-exp of each query's scores.
        deterministic: ``True`` asks for a backward that gives the same bits on every run, and
            every backend honours it: the backends whose backward is not deterministic (cuDNN's,
            PyTorch's memory-efficient one, PyTorch's FlashAttention outside its deterministic
            mode) decline, the FlashAttention adapters run their deterministic backward, and the
            Triton kernels, the reference and the CPU kernel always are. ``False`` (the default,
            as FlashAttention's) lets the fastest serve; ``torch.use_deterministic_algorithms(True)``
            still acts through PyTorch's own checks, as for ``F.scaled_dot_product_attention``.

    Returns:
        ``out [B, N, heads, D]`` in q's dtype, and with ``return_lse`` also
        ``lse [B, heads, N]`` float32 (float64 for float64 inputs). ``lse`` is returned as a
        constant (``requires_grad=False``): no gradient flows through it. An empty batch
        (``B == 0``) gives empty outputs of these shapes (and empty gradients), as PyTorch's
        SDPA does, without asking any backend; ``D == 0`` is a ValueError.

    Visibility for a query at ``(t, h, w)``, one frame of a (T=2, H=4, W=5) grid, q = query::

        global         intra           window (1,3,3)      window (3,3,3) adds the
        x x x x x      x x x x x       . . . . .           same 3x3 patch in the
        x x q x x      x x q x x       . x q x .           neighbouring frames
        x x x x x      x x x x x       . x x x .
        x x x x x      x x x x x       . . . . .
        (+ frame 2)    (frame 1 only)  (clipped at borders, never shifted)
    """
    q, k, v, scale = prepare_inputs(q, k, v, plan, scale)
    request = normalize_backend(backend)
    if not isinstance(deterministic, bool):  # deterministic="no" would have asked for the deterministic backward
        raise TypeError(f"deterministic must be True or False, got {deterministic!r}")
    if q.shape[0] == 0:  # nothing to compute or observe: no backend is asked
        out, lse = _EmptyBatch.apply(q, k, v)
        return (out, lse) if return_lse else out
    for observe in _OBSERVERS:
        observe(q, k, plan, scale)
    grid, modes, window = plan.as_op_args()
    out, lse = routed_attention_call(q, k, v, grid, modes, window, scale, request, bool(deterministic))
    return (out, lse) if return_lse else out


def attention_lse(q, k, plan: RoutingPlan, *, scale: float | None = None, backend="auto") -> torch.Tensor:
    """Each head's log-sum-exp ``[B, heads, N]`` under ``plan``, for routing statistics.

    Runs the routed forward with ``v = k`` (its output is dropped) without autograd and without
    notifying observers, so a calibration observer may call it.
    """
    q, k, v, scale = prepare_inputs(q, k, k, plan, scale)
    request = normalize_backend(backend)
    if q.shape[0] == 0:
        return _empty_lse(q)
    grid, modes, window = plan.as_op_args()
    with torch.no_grad():
        _, lse = routed_attention_call(q, k, v, grid, modes, window, scale, request, False)
    return lse


def _empty_lse(q):
    b, n, heads, _ = q.shape
    return q.new_empty(b, heads, n, dtype=accumulate_dtype(q.dtype))


class _EmptyBatch(torch.autograd.Function):
    """``(out, lse)`` of an empty batch: empty tensors of the right shapes and dtypes, with
    empty gradients for q, k and v (through ``torch.compile`` too, where B is static)."""

    @staticmethod
    def forward(ctx, q, k, v):
        lse = _empty_lse(q)
        ctx.mark_non_differentiable(lse)
        return torch.empty_like(q, memory_format=torch.contiguous_format), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        # q, k and v share dout's shape, dtype and device: three empty gradients
        return torch.zeros_like(dout), torch.zeros_like(dout), torch.zeros_like(dout)


def _heads(q) -> int:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, tokens, heads, head_dim], got {q.shape=}")
    return q.shape[2]


def global_attention(q, k, v, *, scale=None, backend="auto", return_lse=False, deterministic=False):
    """Full attention over all ``N`` tokens, every head (no grid needed)."""
    heads = _heads(q)
    plan = RoutingPlan.uniform((1, 1, q.shape[1]), heads, Mode.GLOBAL)
    return routed_attention(q, k, v, plan, scale=scale, backend=backend, return_lse=return_lse,
                            deterministic=deterministic)


def intra_frame_attention(q, k, v, grid, *, scale=None, backend="auto", return_lse=False, deterministic=False):
    """Each query attends to the keys of its own frame (paper eq. 5)."""
    plan = RoutingPlan.uniform(grid, _heads(q), Mode.INTRA)
    return routed_attention(q, k, v, plan, scale=scale, backend=backend, return_lse=return_lse,
                            deterministic=deterministic)


def window_attention(q, k, v, grid, window=(3, 5, 5), *, scale=None, backend="auto", return_lse=False,
                     deterministic=False):
    """Each query attends to the clipped ``window`` box centred on it (paper eqs. 6-7)."""
    plan = RoutingPlan.uniform(grid, _heads(q), Mode.WINDOW, window)
    return routed_attention(q, k, v, plan, scale=scale, backend=backend, return_lse=return_lse,
                            deterministic=deterministic)
