"""Dispatch: which backend serves each head group of a plan, and running them.

``decide`` is pure (same inputs, same answer) and cached; ``explain`` prints it. The
forward/backward runners allocate the outputs once and let each backend write its heads'
slices, so routed attention costs no gather or concatenation of head groups.

On CUDA the global heads run on a high-priority side stream forked from the caller's stream
and joined back before returning, the local (intra-frame, window) heads on the caller's
stream, so the local kernels fill the SMs the global kernels leave idle (their last wave)
without delaying them. Small layers skip it (see :data:`OVERLAP_MIN_FLOPS`) unless a CUDA
graph is being captured.
``OASIS_OVERLAP=0``, or the :func:`single_stream` context, runs everything on the caller's stream.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from typing import Mapping

import torch

from .backends import BACKENDS, expand_backend_name, priority
from .plan import Mode, RoutingPlan
from .reference import accumulate_dtype

__all__ = [
    "BackendError",
    "GroupDecision",
    "Dispatch",
    "normalize_backend",
    "decide",
    "explain",
    "run_forward",
    "run_backward",
    "single_stream",
    "aligned",
]

log = logging.getLogger("oasis_kernels")


class BackendError(NotImplementedError, ValueError):
    """No backend can run a head group, or a forced backend cannot; the message lists every reason."""


@dataclass(frozen=True)
class GroupDecision:
    """The heads of one mode, the backend that serves them and why the others did not."""

    mode: Mode
    heads: tuple[int, ...]
    backend: str
    declined: tuple[tuple[str, tuple[str, ...]], ...] = ()
    note: str = ""

    def __str__(self) -> str:
        lines = [f"{self.mode.name.lower():>6} heads {list(self.heads)} -> {self.backend}"]
        if self.note:
            lines.append(f"         ({self.note})")
        for name, reasons in self.declined:
            lines.append(f"         {name} declined: {'; '.join(reasons)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Dispatch:
    """All decisions for one call."""

    decisions: tuple[GroupDecision, ...]

    def backend_for(self, mode) -> str:
        m = Mode.parse(mode)
        for d in self.decisions:
            if d.mode == m:
                return d.backend
        raise KeyError(f"no {m.name.lower()} heads in this plan")

    def calls(self) -> list[tuple[str, list[tuple[Mode, tuple[int, ...]]]]]:
        """Backends in order of first use, each with all the groups it serves (one call each)."""
        order: dict[str, list[tuple[Mode, tuple[int, ...]]]] = {}
        for d in self.decisions:
            order.setdefault(d.backend, []).append((d.mode, d.heads))
        return list(order.items())

    def __str__(self) -> str:
        return "\n".join(str(d) for d in self.decisions)


def normalize_backend(backend: "str | Mapping") -> str:
    """Canonical string form of a backend request (it travels through the custom op as a str).

    ``"auto"``, a backend name or alias (``"triton"``, ``"sdpa"``, ``"sdpa_cudnn"`` ...), or a
    mapping from mode to name, e.g. ``{"intra": "triton", "window": "triton"}`` (modes not
    named use ``auto``).
    """
    if isinstance(backend, str):
        if "=" in backend:  # canonical mapping form: "intra=triton,window=reference"
            pairs = [part.split("=", 1) for part in backend.split(",")]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(f"backend {backend!r}: expected 'mode=name' pairs separated by commas")
            return normalize_backend(dict(pairs))
        if backend != "auto":
            expand_backend_name(backend)
        return backend
    if isinstance(backend, Mapping):
        parts = {}
        for mode, name in backend.items():
            m = Mode.parse(mode)
            if not isinstance(name, str):
                raise TypeError(f"backend for {m.name.lower()} heads must be a str, got {name!r}")
            if m in parts:
                raise ValueError(f"backend mapping {dict(backend)!r} names {m.name.lower()} heads twice")
            if name != "auto":
                names = expand_backend_name(name)
                if not any(m in BACKENDS[n].modes for n in names):
                    raise ValueError(f"backend {name!r} does not serve {m.name.lower()} heads")
            parts[m] = f"{m.name.lower()}={name}"
        return ",".join(sorted(parts.values()))
    raise TypeError(f"backend must be a str or a mapping of mode to str, got {type(backend).__name__}: {backend!r}")


def _request_for(request: str, mode: Mode) -> str:
    if "=" not in request:
        return request
    for part in request.split(","):
        key, name = part.split("=")
        if Mode.parse(key) == mode:
            return name
    return "auto"


def _choose_auto(mode, q, plan) -> GroupDecision:
    declined = []
    order, note = priority(mode, q, plan)
    for name in order:
        reasons = BACKENDS[name].why_not_auto(mode, q, plan)
        if not reasons:
            return GroupDecision(mode, plan.heads_of(mode), name, tuple(declined), note=note)
        declined.append((name, tuple(reasons)))
    detail = "; ".join(f"{n}: {' / '.join(r)}" for n, r in declined)
    raise BackendError(f"no backend can run the {mode.name.lower()} heads of {plan} for {q.shape=}, {q.dtype=}, "
                       f"{q.device=}: {detail}")


def _decide_mode(mode: Mode, q, plan: RoutingPlan, request: str) -> GroupDecision:
    if request == "auto":
        return _choose_auto(mode, q, plan)
    names = expand_backend_name(request)
    serving = [n for n in names if mode in BACKENDS[n].modes]
    if not serving:
        d = _choose_auto(mode, q, plan)
        return GroupDecision(d.mode, d.heads, d.backend, d.declined,
                             note=f"{request!r} does not serve {mode.name.lower()} heads; auto chose")
    declined = []
    for name in serving:
        reasons = BACKENDS[name].why_not(mode, q, plan)
        if not reasons:
            return GroupDecision(mode, plan.heads_of(mode), name, tuple(declined))
        declined.append((name, tuple(reasons)))
    detail = "; ".join(f"{n}: {' / '.join(r)}" for n, r in declined)
    raise BackendError(f"backend={request!r} cannot run the {mode.name.lower()} heads of {plan} for "
                       f"{q.shape=}, {q.dtype=}, {q.device=}: {detail}")


def _check_query(q, plan) -> None:
    """The checks of ``api.check_inputs`` that concern ``q`` alone (``decide`` sees no k, v)."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan, got {type(plan).__name__}: {plan!r}")
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, tokens, heads, head_dim], got {q.shape=}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype=}")
    _, n, heads, d = q.shape
    if n != plan.num_tokens:
        raise ValueError(f"{q.shape=} has N={n} tokens but {plan.grid=} holds T*H*W={plan.num_tokens}")
    if heads != plan.heads:
        raise ValueError(f"{q.shape=} has {heads} heads but the plan routes len(plan.modes)={plan.heads}")
    if d == 0:
        raise ValueError(f"head_dim must be positive, got {q.shape=}")


def decide(q: torch.Tensor, plan: RoutingPlan, backend: "str | Mapping" = "auto") -> Dispatch:
    """Which backend serves each head group of ``plan`` for inputs like ``q``, and why.

    ``q`` is checked as :func:`oasis_kernels.routed_attention` checks it (``[B, N, heads, D]``
    with ``N`` and ``heads`` those of the plan, a float dtype): TypeError/ValueError otherwise.
    """
    _check_query(q, plan)
    request = normalize_backend(backend)
    modes = [m for m in Mode if m in plan.modes]
    return Dispatch(tuple(_decide_mode(m, q, plan, _request_for(request, m)) for m in modes))


_CACHE: dict = {}


def _global_switches() -> tuple:
    # PyTorch's global switches change what its SDPA checks accept (the deterministic mode
    # rules out cuDNN), so they key the cache
    cuda = torch.backends.cuda
    return (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
            torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())


def _decide_cached(q, plan: RoutingPlan, request: str, k=None, v=None) -> Dispatch:
    """:func:`decide` memoized on everything the capability predicates read (PyTorch's flash
    check reads ``requires_grad``)."""
    key = (plan, request, tuple(q.shape), q.stride(), q.dtype, q.device, q.requires_grad,
           None if k is None else k.stride(), None if v is None else v.stride(), _global_switches())
    hit = _CACHE.get(key)
    if hit is None:
        if len(_CACHE) > 1024:
            _CACHE.clear()
        hit = _CACHE[key] = decide(q, plan, request)
    return hit


def explain(q: torch.Tensor, plan: RoutingPlan, backend: "str | Mapping" = "auto") -> str:
    """Human-readable :func:`decide`: one line per head group plus each declined backend's reasons.

    ``q`` must be a ``[B, N, heads, D]`` float tensor matching ``plan`` (a rank-3 ``q`` or a
    wrong token or head count is a ValueError, as in :func:`oasis_kernels.routed_attention`).
    """
    return str(decide(q, plan, backend))


#: OASIS_OVERLAP=0 keeps every head group on the caller's stream
OVERLAP = os.environ.get("OASIS_OVERLAP", "1") != "0"
#: Below this many forward FLOPs of global heads (``4 * B * N^2 * D`` each) the layer stays on
#: one stream, except inside CUDA-graph capture: such calls are host-bound and the fork and
#: join cost host time (~25 us on the H200's host) the overlap cannot win back. Measured on
#: the H200 at 96b2d55, before the global heads moved to the high-priority stream (not
#: re-measured since): at S (5,20,40), 4.1e10, the overlap made the eager routed forward
#: 0.219 ms vs 0.164 ms on one stream; at A (9,45,80), 3.4e12, it gained 2%, at B 0.7% fwd /
#: 1.7% fwd+bwd.
#: The eager C++ replay (fastpath.py) always forks: its fork costs two event records and waits.
OVERLAP_MIN_FLOPS = 1e11
#: one side stream per thread and device: a thread capturing a CUDA graph must not share its
#: side stream with another thread's eager work (that work would join the capture or break it)
_SIDE_STREAMS = threading.local()


@contextlib.contextmanager
def single_stream():
    """Inside this block every head group runs on the caller's stream (no side stream), for
    debugging and for measuring what the overlap gains. Covers calls made in the block,
    forward and backward; not thread-local."""
    global OVERLAP
    previous, OVERLAP = OVERLAP, False
    try:
        yield
    finally:
        OVERLAP = previous


def _side_stream(device) -> "torch.cuda.Stream":
    streams = _SIDE_STREAMS.__dict__.setdefault("by_device", {})
    stream = streams.get(device)
    if stream is None:
        # the highest priority the device has (PyTorch maps a large negative number to it): the
        # block scheduler then issues the global heads' blocks before the local heads' whenever
        # both wait, so the local kernels take only the SMs the global kernels leave idle.
        # CUDA graphs keep the priority (PyTorch instantiates them with per-node priorities)
        stream = streams[device] = torch.cuda.Stream(device, priority=-1000)
    return stream


def _run_groups(dispatch: Dispatch, q, work) -> None:
    """``work(backend, groups)`` for every backend call: global heads on a high-priority side
    stream forked from the caller's, the other heads on the caller's stream, which then waits
    for the side stream.

    Outputs are allocated on the caller's stream before and used on it after the join, so the
    caching allocator needs no ``record_stream``; temporaries of the side work are allocated,
    used and freed on the side stream. CUDA-graph capture follows the fork and the join.
    """
    main = [(d.backend, [(d.mode, d.heads)]) for d in dispatch.decisions if d.mode == Mode.GLOBAL]
    side: dict[str, list] = {}
    for d in dispatch.decisions:
        if d.mode != Mode.GLOBAL:
            side.setdefault(d.backend, []).append((d.mode, d.heads))
    device = q.device
    if not (OVERLAP and main and side and device.type == "cuda" and _worth_a_side_stream(q, main)):
        for name, groups in dispatch.calls():
            work(name, groups)
        return
    caller = torch.cuda.current_stream(device)
    stream = _side_stream(device)
    stream.wait_stream(caller)
    try:
        with torch.cuda.stream(stream):
            for name, groups in main:
                work(name, groups)
        for name, groups in side.items():
            work(name, groups)
    finally:
        # also after an error: kernels already launched on the side stream write tensors the caller frees
        caller.wait_stream(stream)


def _worth_a_side_stream(q, main) -> bool:
    # the threshold weighs host time against GPU time; a CUDA graph replays without the host,
    # so a captured call always forks (at S, H200, fd322b6: fwd+bwd 0.492 vs 0.608 ms per replay)
    return _global_flops(q, main) >= OVERLAP_MIN_FLOPS or _capturing(q.device)


def _capturing(device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph (PyTorch's check reads
    the current device's)."""
    if device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            return torch.cuda.is_current_stream_capturing()
    return torch.cuda.is_current_stream_capturing()


def _global_flops(q, main) -> float:
    b, n, _, d = q.shape
    return 4.0 * b * n * n * d * sum(len(heads) for _, groups in main for _, heads in groups)


def aligned(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a contiguous copy when its data pointer, or the byte stride of a dimension other
    than the last, is not a multiple of 16 (a view at an odd element offset, a slice of wider
    rows) and the copy's would be. Backends may assume aligned rows: cuDNN computed wrong global
    heads from an unaligned view, without an error, on the H200 (cuDNN 9.19)."""
    elt = x.element_size()
    if (x.shape[-1] * elt) % 16:  # a contiguous copy would not be aligned either: leave it to the backends
        return x
    if x.data_ptr() % 16 or any((st * elt) % 16 for st, n in zip(x.stride()[:-1], x.shape[:-1]) if n > 1):
        return x.clone(memory_format=torch.contiguous_format)
    return x


def _aligned_qkv(q, k, v):
    q, k_new = aligned(q), aligned(k)
    return q, k_new, k_new if v is k else aligned(v)  # v is k (attention_lse): one copy at most


def run_forward(q, k, v, plan: RoutingPlan, scale: float, request: str):
    """``(out [B, N, heads, D], lse [B, heads, N])`` with each head group on its backend."""
    q, k, v = _aligned_qkv(q, k, v)
    dispatch = _decide_cached(q, plan, request, k, v)
    b, n, nh, d = q.shape
    out = torch.empty(b, n, nh, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, nh, n, dtype=accumulate_dtype(q.dtype), device=q.device)

    def work(name, groups):
        log.debug("forward %s -> %s", groups, name)
        BACKENDS[name].forward(q, k, v, out, lse, plan, groups, scale)

    _run_groups(dispatch, q, work)
    return out, lse


def run_backward(dout, q, k, v, out, lse, plan: RoutingPlan, scale: float, request: str, deterministic: bool):
    dout, (q, k, v) = aligned(dout), _aligned_qkv(q, k, v)
    dispatch = _decide_cached(q, plan, request, k, v)
    dq, dk, dv = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))

    def work(name, groups):
        log.debug("backward %s -> %s", groups, name)
        BACKENDS[name].backward(dout, q, k, v, out, lse, dq, dk, dv, plan, groups, scale, deterministic)

    _run_groups(dispatch, q, work)
    return dq, dk, dv
