"""``torch.library`` custom ops behind every entry point, and the eager path beside them.

Two ops, ``oasis_kernels::routed_attention_fwd`` and ``oasis_kernels::routed_attention_bwd``,
take the plan as plain lists of ints so ``torch.compile`` sees an opaque call with a fake
(meta) implementation: no graph break, and for a fixed plan no recompilation. Autograd is
registered on the forward op and calls the backward op, which is itself a custom op, so the
backward graph is compiled the same way.

Eager calls on plain tensors skip the custom-op machinery (on the H200 its wrappers cost
~0.2 ms of host time per forward and ~1.5 ms per forward+backward, several times the GPU time
of a small layer; ``scripts/host_parts.py``, docs/PERF.md): :func:`routed_attention_call` runs
the same prepared call (:class:`oasis_kernels.call.RoutedCall`) under a ``torch.autograd.Function``,
or its C++ replay with a C++ autograd node (:mod:`.fastpath`). Under ``torch.compile``, for
fake or other tensor subclasses, and for meta tensors the op is used, so tracing sees it. Every
path runs a prepared call: the ops look theirs up by signature (:func:`oasis_kernels.call.lookup`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import fastpath
from .call import aligned_call, lookup
from .reference import accumulate_dtype

__all__ = ["routed_attention_fwd", "routed_attention_bwd", "routed_attention_call"]


def _call_for(q, k, v, grid, modes, window, scale, backend, deterministic):
    """The prepared call of these op arguments, for aligned copies of ``q, k, v`` where needed."""
    call = lookup(q, k, v, (tuple(grid), tuple(modes), tuple(window)), scale, backend, deterministic)
    return aligned_call(call, q, k, v)


@torch.library.custom_op("oasis_kernels::routed_attention_fwd", mutates_args=())
def routed_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, grid: list[int], modes: list[int], window: list[int],
    scale: float, backend: str, deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """``(out [B, N, heads, D], lse [B, heads, N])``; inputs already validated by the API."""
    call, q, k, v = _call_for(q, k, v, grid, modes, window, scale, backend, deterministic)
    return call.forward(q, k, v)


@routed_attention_fwd.register_fake
def _(q, k, v, grid, modes, window, scale, backend, deterministic):
    b, n, nh, d = q.shape
    return q.new_empty(b, n, nh, d), q.new_empty(b, nh, n, dtype=accumulate_dtype(q.dtype))


@torch.library.custom_op("oasis_kernels::routed_attention_bwd", mutates_args=())
def routed_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    grid: list[int], modes: list[int], window: list[int], scale: float, backend: str, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    call, q, k, v = _call_for(q, k, v, grid, modes, window, scale, backend, deterministic)
    return _backward_of(call, dout, q, k, v, out, lse)


@routed_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, grid, modes, window, scale, backend, deterministic):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _backward_of(call, dout, q, k, v, out, lse):
    """The Python path of ``call``'s backward with ``dout`` aligned as the kernels want it."""
    from .dispatch import aligned

    return call.backward(aligned(dout), q, k, v, out, lse)


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
    """The eager twin of the op with its registered autograd: the same prepared call, the same
    saved tensors; the backward runs with the forward's call (and so its settings)."""

    @staticmethod
    def forward(ctx, q, k, v, call):
        out, lse = _eager_forward(call, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        # the LSE's gradient is never used: no zero tensor (an allocation and a fill kernel) for it
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the op: no double backward, an error not a wrong answer
    def backward(ctx, dout, dlse):
        if dout is None:  # out's gradient is undefined (zero, not materialized): no gradient flows
            return None, None, None, None
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        grads = fastpath.backward(ctx.call, dout, q, k, v, out, lse)
        if grads is None:
            call, q, k, v = aligned_call(ctx.call, q, k, v)
            grads = _backward_of(call, dout, q, k, v, out, lse)
        dq, dk, dv = grads
        return dq, dk, dv, None


def _eager_forward(call, q, k, v):
    res = fastpath.forward(call, q, k, v)
    if res is not None:
        return res
    call, q, k, v = aligned_call(call, q, k, v)
    return call.forward(q, k, v)


def _eager(x: Tensor) -> bool:
    # plain tensors on a real device, outside any tracing: FakeTensor, functional and other
    # subclasses, meta tensors, and calls under a dispatch mode (make_fx, FlopCounterMode ...) or
    # torch.jit.trace go through the op, so tracers record it and its fake implementation serves them
    return (type(x) is Tensor and x.device.type != "meta" and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and _get_current_dispatch_mode() is None)


def routed_attention_call(q: Tensor, k: Tensor, v: Tensor, grid: list[int], modes: list[int], window: list[int],
                          scale: float, backend: str, deterministic: bool, call=None) -> tuple[Tensor, Tensor]:
    """``routed_attention_fwd`` with autograd, through the op when traced and directly in eager
    mode; ``call``: the prepared call of this signature where the caller holds it."""
    if not (_eager(q) and _eager(k) and _eager(v)):
        return routed_attention_fwd(q, k, v, grid, modes, window, scale, backend, deterministic)
    if call is None:
        call = lookup(q, k, v, (tuple(grid), tuple(modes), tuple(window)), scale, backend, deterministic)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # replayed with a C++ autograd node once the call has a replay (fastpath)
        res = fastpath.forward(call, q, k, v, autograd=True)
        if res is not None:
            return res
        return _RoutedAttention.apply(q, k, v, call)
    return _eager_forward(call, q, k, v)
