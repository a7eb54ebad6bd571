"""The prepared call: everything about a routed-attention call that its signature decides, made
once, and every way it runs (the custom ops, the eager autograd path, the C++ replay).

A :class:`RoutedCall` belongs to one signature: plan, backend request, scale, ``deterministic``,
the shapes, strides, dtype, device and ``requires_grad`` of ``q, k, v``, the settings in force
(:mod:`oasis_kernels.config`) and PyTorch's SDPA switches. It holds the decisions per head
group, each backend's prepared state (the Triton backend's head table), the stream policy and,
where the C++ extension serves the call, its replays (:mod:`oasis_kernels.fastpath`). Calls live
in one bounded LRU cache (:func:`lookup`), the package's only cache of call state; every path
runs them: the custom op under ``torch.compile``, the eager call, the C++ replay.

>>> call = ok.prepare(q, plan, k, v)    # flashinfer's plan/run split: prepare once per signature
>>> out = call(q, k, v)                 # then run, as often as wanted, with autograd

Stream policy (:meth:`RoutedCall.forks`): on CUDA the global heads run on a high-priority side
stream forked from the caller's, the local heads on the caller's stream, which then waits for the
side stream; the local kernels fill the SMs that the global kernels' last wave leaves idle
without delaying them (docs/PERF.md, entries 9-10). A call forks when the settings allow it, it
has both kinds of heads, and the fork pays for its host time: always in the C++ replay (two
event records), inside CUDA-graph capture (replays cost no host time), and on the Python path
from ``overlap_min_flops`` FLOPs of global heads.
"""

from __future__ import annotations

import collections
import importlib
import sys
import threading

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import config, fastpath, streams
from .backends import BACKENDS
from .dispatch import Dispatch, aligned, decide, normalize_backend
from .inputs import check_inputs, prepare_inputs, unit_stride
from .plan import Mode, RoutingPlan
from .reference import accumulate_dtype

__all__ = ["RoutedCall", "prepare", "lookup", "MAX_CALLS", "routed_attention_fwd", "routed_attention_bwd",
           "routed_attention_call"]

#: prepared calls kept (least recently used dropped first)
MAX_CALLS = 1024


def _sdpa_switches() -> tuple:
    # PyTorch's global switches change what its SDPA checks accept (the deterministic mode
    # rules out cuDNN), so they belong to the signature
    cuda = torch.backends.cuda
    return (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
            torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())


def _kernel_state() -> tuple:
    """The Triton kernels' tuning state and debug switches, where they are loaded: the C++ replay
    repeats recorded launches, which must not outlive a config list or autotuner swapped by a
    test or benchmark, or Triton's debug modes."""
    name = f"{__package__}.kernels.local_attention"
    if name not in sys.modules:
        return ()
    # another thread may still be importing it (sys.modules holds it from the import's start):
    # import_module waits for that import to finish
    la = importlib.import_module(name)
    knobs = sys.modules["triton"].knobs  # imported with the kernels
    return (la.tuning_state(), knobs.runtime.debug, knobs.compilation.instrumentation_mode)


def signature(q, k, v, plan_args: tuple, scale: float, request: str, deterministic: bool,
              settings: config.Settings) -> tuple:
    """The cache key of a call: what a prepared call depends on."""
    return (plan_args, request, scale, deterministic, tuple(q.shape), q.stride(), k.stride(), v.stride(), v is k,
            q.dtype, q.device, q.requires_grad, settings, _sdpa_switches(), _kernel_state())


class RoutedCall:
    """Routed attention prepared for one signature (see the module's doc). Made by
    :func:`prepare` (or :func:`lookup`); calling it runs the attention with autograd.

    Attributes:
        plan, scale, request, deterministic, settings: what the call was prepared with.
        dispatch: the backend of each head group and why the others declined (``str(call.dispatch)``).
        shape, dtype, device: of the ``q, k, v`` it takes.
    """

    def __init__(self, q, k, v, plan: RoutingPlan, scale: float, request: str, deterministic: bool,
                 settings: config.Settings):
        self.plan, self.scale, self.request = plan, scale, request
        self.deterministic, self.settings = deterministic, settings
        self.shape, self.dtype, self.device = tuple(q.shape), q.dtype, q.device
        self.strides = (q.stride(), k.stride(), v.stride())
        self.requires_grad = q.requires_grad
        self.op_args = plan.as_op_args()  # (grid, modes, window) as the custom ops take them
        self._layout = _layout(q, k, v)
        self.dispatch: Dispatch = decide(q, plan, request, deterministic)
        groups: dict[str, list] = {}
        for d in self.dispatch.decisions:
            groups.setdefault(d.backend, []).append((d.mode, d.heads))
        #: backends in order of first use, each with all the groups it serves (one call each)
        self.calls = list(groups.items())
        self.global_calls = [(d.backend, [(d.mode, d.heads)]) for d in self.dispatch.decisions if d.mode == Mode.GLOBAL]
        local: dict[str, list] = {}
        for d in self.dispatch.decisions:
            if d.mode != Mode.GLOBAL:
                local.setdefault(d.backend, []).append((d.mode, d.heads))
        self.local_calls = list(local.items())
        b, n, _, dh = self.shape
        self.global_flops = 4.0 * b * n * n * dh * len(plan.heads_of(Mode.GLOBAL))
        #: each backend's state for this call (``Backend.prepare``), e.g. the Triton head table
        self.states = {name: BACKENDS[name].prepare(plan, backend_groups, self.device, settings)
                       for name, backend_groups in self.calls}
        # the C++ replays (fastpath.py): None = not tried yet, False = not served
        self.replay_forward = None
        self.replay_backward = None

    def __repr__(self) -> str:
        return (f"RoutedCall({self.plan}, shape={self.shape}, dtype={self.dtype}, device={self.device}, "
                f"scale={self.scale:g}, backend={self.request!r})\n{self.dispatch}")

    # -- streams -----------------------------------------------------------------------
    def forks(self, replayed: bool = False) -> bool:
        """Whether this call runs its global heads on the side stream now (see the module's doc);
        ``replayed``: asked by the C++ replay, whose fork costs two event records."""
        if not (self.settings.overlap and self.global_calls and self.local_calls and self.device.type == "cuda"):
            return False
        return replayed or self.global_flops >= self.settings.overlap_min_flops or streams.capturing(self.device)

    def _run(self, work) -> None:
        """``work(backend, groups)`` for every backend call, on the streams :meth:`forks` says.

        Outputs are allocated on the caller's stream before and used on it after the join, so the
        caching allocator needs no ``record_stream``; temporaries of the side work are allocated,
        used and freed on the side stream. CUDA-graph capture follows the fork and the join.
        """
        if not self.forks():
            for name, groups in self.calls:
                work(name, groups)
            return
        caller = torch.cuda.current_stream(self.device)
        stream = streams.side_stream(self.device)
        stream.wait_stream(caller)
        try:
            with torch.cuda.stream(stream):
                for name, groups in self.global_calls:
                    work(name, groups)
            for name, groups in self.local_calls:
                work(name, groups)
        finally:
            # also after an error: kernels already launched on the side stream write tensors the caller frees
            caller.wait_stream(stream)

    # -- the Python path -----------------------------------------------------------------
    def forward(self, q, k, v):
        """``(out [B, N, heads, D], lse [B, heads, N])`` without autograd, each head group on its
        backend. ``q, k, v`` have this call's signature, their rows 16-byte aligned
        (:func:`aligned_call`)."""
        b, n, nh, d = q.shape
        out = torch.empty(b, n, nh, d, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, nh, n, dtype=accumulate_dtype(q.dtype), device=q.device)
        plan, scale, states = self.plan, self.scale, self.states
        self._run(lambda name, groups: BACKENDS[name].forward(q, k, v, out, lse, plan, groups, scale,
                                                              state=states[name]))
        return out, lse

    def backward(self, dout, q, k, v, out, lse):
        """``(dq, dk, dv)`` for a forward of this call (``dout`` with contiguous rows; copied where its
        data pointer is not 16-byte aligned, as the inputs are)."""
        dout = aligned(dout)
        dq, dk, dv = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
        plan, scale, states, det = self.plan, self.scale, self.states, self.deterministic
        self._run(lambda name, groups: BACKENDS[name].backward(dout, q, k, v, out, lse, dq, dk, dv, plan, groups,
                                                               scale, det, state=states[name]))
        return dq, dk, dv

    # -- with autograd ---------------------------------------------------------------------
    def __call__(self, q, k, v, *, return_lse: bool = False):
        """Run the prepared call: ``out`` (and ``lse`` with ``return_lse``), with autograd.

        ``q, k, v`` must match the signature it was prepared for (shape, strides once the head dim
        is made contiguous, dtype, device, ``requires_grad``): a ValueError names what differs.
        Under ``torch.compile`` it goes through the custom ops, which look their call up by
        signature with this call's settings.
        """
        if _layout(q, k, v) != self._layout:  # the common case costs one tuple comparison
            v_is_k = v is k
            q, k = unit_stride(q), unit_stride(k)
            v = k if v_is_k else unit_stride(v)
            self.check(q, k, v)
        grid, modes, window = self.op_args
        out, lse = routed_attention_call(q, k, v, grid, modes, window, self.scale, self.request, self.deterministic,
                                         call=self)
        return (out, lse) if return_lse else out

    def check(self, q, k, v) -> None:
        """ValueError naming what differs from this call's signature; None when ``q, k, v`` match."""
        check_inputs(q, k, v, self.plan)
        got = dict(shape=tuple(q.shape), dtype=q.dtype, device=q.device, strides=(q.stride(), k.stride(), v.stride()),
                   requires_grad=q.requires_grad, v_is_k=v is k)
        want = dict(shape=self.shape, dtype=self.dtype, device=self.device, strides=self.strides,
                    requires_grad=self.requires_grad, v_is_k=self._layout[-1])
        wrong = [f"{name} {got[name]} (prepared for {want[name]})" for name in got if got[name] != want[name]]
        if wrong:
            raise ValueError(f"q, k, v do not match this prepared call: {'; '.join(wrong)}; prepare another "
                             "(oasis_kernels.prepare) or call oasis_kernels.routed_attention")


# -- the cache -----------------------------------------------------------------------------

_CALLS: "collections.OrderedDict[tuple, RoutedCall]" = collections.OrderedDict()
_LOCK = threading.Lock()


def lookup(q, k, v, plan_args: tuple, scale: float, request: str, deterministic: bool, plan=None,
           settings: config.Settings | None = None) -> RoutedCall:
    """The prepared call of this signature, made on first use (``plan_args`` = ``plan.as_op_args()``
    as tuples; ``plan`` the plan itself where the caller has it; ``settings`` default: those in force)."""
    settings = config.settings() if settings is None else settings
    key = signature(q, k, v, plan_args, scale, request, deterministic, settings)
    call = _CALLS.get(key)
    if call is not None:
        try:
            _CALLS.move_to_end(key)
        except KeyError:  # dropped by another thread meanwhile: still a valid call
            pass
        return call
    if plan is None:
        plan = RoutingPlan.from_op_args(*plan_args)
    call = RoutedCall(q, k, v, plan, scale, request, deterministic, settings)
    # making the call may have imported the Triton kernels, whose tuning state the key holds
    key = signature(q, k, v, plan_args, scale, request, deterministic, settings)
    with _LOCK:
        _CALLS[key] = call
        if len(_CALLS) > MAX_CALLS:
            _evict()
    return call


def _evict() -> None:
    """Drop the least recently used calls beyond :data:`MAX_CALLS`, except those with a C++ replay:
    the extension keeps a replay for the process's lifetime and makes at most
    ``fastpath.MAX_REPLAYS``, so a call that owns one stays (and is not made, and replayed, again)."""
    for key in [key for key, c in _CALLS.items() if not c.replay_forward]:
        if len(_CALLS) <= MAX_CALLS:
            break
        del _CALLS[key]


def aligned_call(call: RoutedCall, q, k, v):
    """``(call, q, k, v)`` with every row 16-byte aligned (:func:`oasis_kernels.dispatch.aligned`):
    the same call for aligned inputs, else the copies and the call of their signature."""
    q2, k2 = aligned(q), aligned(k)
    v2 = k2 if v is k else aligned(v)
    if q2 is q and k2 is k and v2 is v:
        return call, q, k, v
    grid, modes, window = call.op_args
    return lookup(q2, k2, v2, (tuple(grid), tuple(modes), tuple(window)), call.scale, call.request,
                  call.deterministic, call.plan, call.settings), q2, k2, v2


def prepare(q, plan: RoutingPlan, k=None, v=None, *, scale: float | None = None, backend="auto",
            deterministic: bool = False, settings: config.Settings | None = None) -> RoutedCall:
    """Prepare routed attention for inputs like ``q``, ``k``, ``v`` under ``plan``: a :class:`RoutedCall` to
    keep, e.g. per model layer, and call as ``call(q, k, v)`` with tensors laid out as these (``k`` and
    ``v`` default to ``q`` and ``k``: a call prepared so takes ``call(q, q, q)``, where ``v`` is ``k``,
    and refuses a distinct ``v``: give the k and v the call will take). Arguments as :func:`oasis_kernels.routed_attention`'s; ``settings``
    (default: those in force, :func:`oasis_kernels.settings`) are kept by the call.
    """
    k = q if k is None else k
    v = k if v is None else v
    if settings is not None and not isinstance(settings, config.Settings):
        raise TypeError(f"settings must be an oasis_kernels.Settings, got {type(settings).__name__}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be True or False, got {deterministic!r}")
    q, k, v, scale = prepare_inputs(q, k, v, plan, scale)
    request = normalize_backend(backend)
    grid, modes, window = plan.as_op_args()
    return lookup(q, k, v, (tuple(grid), tuple(modes), tuple(window)), scale, request, bool(deterministic), plan,
                  settings)


def _layout(q, k, v) -> tuple:
    """What a prepared call's inputs must repeat, as one tuple to compare."""
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device,
            k.device, v.device, q.requires_grad, v is k)


# -- the custom ops, and the eager path beside them -------------------------------------------
#
# Two ops, ``oasis_kernels::routed_attention_fwd`` and ``oasis_kernels::routed_attention_bwd``,
# take the plan as plain lists of ints so ``torch.compile`` sees an opaque call with a fake
# (meta) implementation: no graph break, and for a fixed plan no recompilation. Autograd is
# registered on the forward op and calls the backward op, which is itself a custom op, so the
# backward graph is compiled the same way.
#
# Eager calls on plain tensors skip the custom-op machinery (on the H200 its wrappers cost ~0.2
# ms of host time per forward and ~1.5 ms per forward+backward, several times the GPU time of a
# small layer; scripts/host_parts.py, docs/PERF.md): ``routed_attention_call`` runs the same
# prepared call under a ``torch.autograd.Function``, or its C++ replay with a C++ autograd node
# (fastpath.py). Under ``torch.compile``, for fake or other tensor subclasses, and for meta
# tensors the op is used, so tracing sees it; the ops look their call up by signature. The
# settings travel as an argument (``Settings.as_key``), so the backward op finds its forward's
# call; PyTorch's SDPA switches are read when each op runs, as for PyTorch's own attention.


def _call_for(q, k, v, grid, modes, window, scale, backend, deterministic, settings):
    """The prepared call of these op arguments, for aligned copies of ``q, k, v`` where needed."""
    call = lookup(q, k, v, (tuple(grid), tuple(modes), tuple(window)), scale, backend, deterministic,
                  settings=config.Settings.from_key(settings))
    return aligned_call(call, q, k, v)


@torch.library.custom_op("oasis_kernels::routed_attention_fwd", mutates_args=())
def routed_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, grid: list[int], modes: list[int], window: list[int],
    scale: float, backend: str, deterministic: bool, settings: str,
) -> tuple[Tensor, Tensor]:
    """``(out [B, N, heads, D], lse [B, heads, N])``; inputs already validated by the API."""
    call, q, k, v = _call_for(q, k, v, grid, modes, window, scale, backend, deterministic, settings)
    return call.forward(q, k, v)


@routed_attention_fwd.register_fake
def _(q, k, v, grid, modes, window, scale, backend, deterministic, settings):
    b, n, nh, d = q.shape
    return q.new_empty(b, n, nh, d), q.new_empty(b, nh, n, dtype=accumulate_dtype(q.dtype))


@torch.library.custom_op("oasis_kernels::routed_attention_bwd", mutates_args=())
def routed_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    grid: list[int], modes: list[int], window: list[int], scale: float, backend: str, deterministic: bool,
    settings: str,
) -> tuple[Tensor, Tensor, Tensor]:
    call, q, k, v = _call_for(q, k, v, grid, modes, window, scale, backend, deterministic, settings)
    return call.backward(dout, q, k, v, out, lse)


@routed_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, grid, modes, window, scale, backend, deterministic, settings):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, grid, modes, window, scale, backend, deterministic, settings = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (grid, modes, window, scale, backend, deterministic, settings)
    # the log-sum-exp is an output for calibration and debugging: returned as a constant
    # (requires_grad=False), so no gradient is expected through it
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    # autograd may hand an expanded or otherwise strided gradient; the kernels want rows
    dq, dk, dv = routed_attention_bwd(dout.contiguous(), q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


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
            grads = call.backward(dout, q, k, v, out, lse)
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
        settings = call.settings if call is not None else config.settings()
        return routed_attention_fwd(q, k, v, grid, modes, window, scale, backend, deterministic, settings.as_key())
    if call is None:
        call = lookup(q, k, v, (tuple(grid), tuple(modes), tuple(window)), scale, backend, deterministic)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # replayed with a C++ autograd node once the call has a replay (fastpath)
        res = fastpath.forward(call, q, k, v, autograd=True)
        if res is not None:
            return res
        return _RoutedAttention.apply(q, k, v, call)
    return _eager_forward(call, q, k, v)
