"""``torch.library`` custom ops behind every entry point, and the eager fast path beside them.

Two ops, ``oasis_kernels::routed_attention_fwd`` and ``oasis_kernels::routed_attention_bwd``,
take the plan as plain lists of ints so ``torch.compile`` sees an opaque call with a fake
(meta) implementation: no graph break, and for a fixed plan no recompilation. Autograd is
registered on the forward op and calls the backward op, which is itself a custom op, so the
backward graph is compiled the same way.

Eager calls on plain tensors skip the custom-op machinery (on the H200 its wrappers cost
~0.2 ms of host time per forward and ~1.5 ms per forward+backward, several times the GPU time
of a small layer; ``scripts/host_parts.py``, docs/PERF.md): :func:`routed_attention_call` runs
the same dispatch under a ``torch.autograd.Function``, and once a call signature is prepared,
the C++ replay of :mod:`.fastpath` with its own C++ autograd node. Under ``torch.compile``, for
fake or other tensor subclasses, and for meta tensors the op is used, so tracing sees it.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import fastpath
from .dispatch import run_backward, run_forward
from .plan import RoutingPlan
from .reference import accumulate_dtype

__all__ = ["routed_attention_fwd", "routed_attention_bwd", "routed_attention_call"]


@functools.lru_cache(maxsize=1024)
def _plan(grid: tuple, modes: tuple, window: tuple) -> RoutingPlan:
    # the op gets the plan as lists; rebuilding and re-validating it on every call is host time
    return RoutingPlan.from_op_args(grid, modes, window)


@torch.library.custom_op("oasis_kernels::routed_attention_fwd", mutates_args=())
def routed_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, grid: list[int], modes: list[int], window: list[int],
    scale: float, backend: str, deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """``(out [B, N, heads, D], lse [B, heads, N])``; inputs already validated by the API."""
    return run_forward(q, k, v, _plan(tuple(grid), tuple(modes), tuple(window)), scale, backend)


@routed_attention_fwd.register_fake
def _(q, k, v, grid, modes, window, scale, backend, deterministic):
    b, n, nh, d = q.shape
    return q.new_empty(b, n, nh, d), q.new_empty(b, nh, n, dtype=accumulate_dtype(q.dtype))


@torch.library.custom_op("oasis_kernels::routed_attention_bwd", mutates_args=())
def routed_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    grid: list[int], modes: list[int], window: list[int], scale: float, backend: str, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    plan = _plan(tuple(grid), tuple(modes), tuple(window))
    return run_backward(dout, q, k, v, out, lse, plan, scale, backend, deterministic)


@routed_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, grid, modes, window, scale, backend, deterministic):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, grid, modes, window, scale, backend, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (grid, modes, window, scale, backend, deterministic)
    # the log-sum-exp is an output for calibration and debugging: returned as a constant
    # (requires_grad=False), so no gradient is expected through it
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    # autograd may hand an expanded or otherwise strided gradient; the kernels want rows
    dq, dk, dv = routed_attention_bwd(dout.contiguous(), q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("oasis_kernels::routed_attention_fwd", _backward, setup_context=_setup_context)


class _RoutedAttention(torch.autograd.Function):
    """The eager twin of the op with its registered autograd: same dispatch, same saved tensors."""

    @staticmethod
    def forward(ctx, q, k, v, grid, modes, window, scale, backend, deterministic):
        out, lse = _eager_forward(q, k, v, _plan(tuple(grid), tuple(modes), tuple(window)), scale, backend,
                                  deterministic)
        _setup_context(ctx, (q, k, v, grid, modes, window, scale, backend, deterministic), (out, lse))
        # the LSE's gradient is never used: no zero tensor (an allocation and a fill kernel) for it
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the op: no double backward, an error not a wrong answer
    def backward(ctx, dout, dlse):
        if dout is None:  # out's gradient is undefined (zero, not materialized): no gradient flows
            return (None,) * 9
        q, k, v, out, lse = ctx.saved_tensors
        grid, modes, window, scale, backend, deterministic = ctx.args
        plan = _plan(tuple(grid), tuple(modes), tuple(window))
        dout = dout.contiguous()
        grads = fastpath.backward(dout, q, k, v, out, lse, plan, scale, backend, deterministic)
        dq, dk, dv = grads if grads is not None else run_backward(dout, q, k, v, out, lse, plan, scale, backend,
                                                                   deterministic)
        return dq, dk, dv, None, None, None, None, None, None


def _eager_forward(q, k, v, plan, scale, backend, deterministic):
    res = fastpath.forward(q, k, v, plan, scale, backend, deterministic)
    return res if res is not None else run_forward(q, k, v, plan, scale, backend)


def _eager(x: Tensor) -> bool:
    # plain tensors on a real device, outside any tracing: FakeTensor, functional and other
    # subclasses, meta tensors, and calls under a dispatch mode (make_fx, FlopCounterMode ...) or
    # torch.jit.trace go through the op, so tracers record it and its fake implementation serves them
    return (type(x) is Tensor and x.device.type != "meta" and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and _get_current_dispatch_mode() is None)


def routed_attention_call(q: Tensor, k: Tensor, v: Tensor, grid: list[int], modes: list[int], window: list[int],
                          scale: float, backend: str, deterministic: bool) -> tuple[Tensor, Tensor]:
    """``routed_attention_fwd`` with autograd, through the op when traced and directly in eager mode."""
    if not (_eager(q) and _eager(k) and _eager(v)):
        return routed_attention_fwd(q, k, v, grid, modes, window, scale, backend, deterministic)
    plan = _plan(tuple(grid), tuple(modes), tuple(window))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # replayed with a C++ autograd node where the signature is prepared (fastpath)
        res = fastpath.forward(q, k, v, plan, scale, backend, deterministic, autograd=True)
        if res is not None:
            return res
        return _RoutedAttention.apply(q, k, v, grid, modes, window, scale, backend, deterministic)
    return _eager_forward(q, k, v, plan, scale, backend, deterministic)
