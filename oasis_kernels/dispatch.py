"""Dispatch: which backend serves each head group of a plan, and why the others do not.

``decide`` is pure (same inputs, same answer); ``explain`` prints it. A prepared call
(:mod:`oasis_kernels.call`) decides once per signature and keeps the answer; it allocates the
outputs once and lets each backend write its heads' slices, so routed attention costs no gather
or concatenation of head groups.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping

import torch

from .backends import BACKENDS, expand_backend_name, priority
from .config import use_settings
from .plan import Mode, RoutingPlan

__all__ = [
    "BackendError",
    "GroupDecision",
    "Dispatch",
    "normalize_backend",
    "decide",
    "explain",
    "single_stream",
    "aligned",
]


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
        if not backend:
            raise ValueError("backend mapping is empty: name a backend for some mode, e.g. {'intra': 'triton'}, "
                             "or give 'auto'")
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


def _choose_auto(mode, q, plan, deterministic=False) -> GroupDecision:
    declined = []
    order, note = priority(mode, q, plan)
    for name in order:
        reasons = BACKENDS[name].why_not_auto(mode, q, plan)
        if deterministic:
            reasons = reasons + BACKENDS[name].determinism_reasons()
        if not reasons:
            return GroupDecision(mode, plan.heads_of(mode), name, tuple(declined), note=note)
        declined.append((name, tuple(reasons)))
    detail = "; ".join(f"{n}: {' / '.join(r)}" for n, r in declined)
    raise BackendError(f"no backend can run the {mode.name.lower()} heads of {plan} for {q.shape=}, {q.dtype=}, "
                       f"{q.device=}: {detail}")


def _decide_mode(mode: Mode, q, plan: RoutingPlan, request: str, deterministic: bool) -> GroupDecision:
    if request == "auto":
        return _choose_auto(mode, q, plan, deterministic)
    names = expand_backend_name(request)
    serving = [n for n in names if mode in BACKENDS[n].modes]
    if not serving:
        d = _choose_auto(mode, q, plan, deterministic)
        return GroupDecision(d.mode, d.heads, d.backend, d.declined,
                             note=f"{request!r} does not serve {mode.name.lower()} heads; auto chose")
    declined = []
    for name in serving:
        reasons = BACKENDS[name].why_not(mode, q, plan)
        if deterministic:
            reasons = reasons + BACKENDS[name].determinism_reasons()
        if not reasons:
            return GroupDecision(mode, plan.heads_of(mode), name, tuple(declined))
        declined.append((name, tuple(reasons)))
    detail = "; ".join(f"{n}: {' / '.join(r)}" for n, r in declined)
    raise BackendError(f"backend={request!r} cannot run the {mode.name.lower()} heads of {plan} for "
                       f"{q.shape=}, {q.dtype=}, {q.device=}: {detail}")


def _check_query(q, plan) -> None:
    """The checks of ``inputs.check_inputs`` that concern ``q`` alone (``decide`` sees no k, v)."""
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


def decide(q: torch.Tensor, plan: RoutingPlan, backend: "str | Mapping" = "auto",
           deterministic: bool = False) -> Dispatch:
    """Which backend serves each head group of ``plan`` for inputs like ``q``, and why.

    ``q`` is checked as :func:`oasis_kernels.routed_attention` checks it (``[B, N, heads, D]``
    with ``N`` and ``heads`` those of the plan, a float dtype): TypeError/ValueError otherwise.
    ``deterministic=True`` leaves out the backends whose backward is not deterministic.
    """
    _check_query(q, plan)
    request = normalize_backend(backend)
    modes = [m for m in Mode if m in plan.modes]
    return Dispatch(tuple(_decide_mode(m, q, plan, _request_for(request, m), bool(deterministic)) for m in modes))


def explain(q: torch.Tensor, plan: RoutingPlan, backend: "str | Mapping" = "auto", deterministic: bool = False) -> str:
    """Human-readable :func:`decide`: one line per head group plus each declined backend's reasons.

    ``q`` must be a ``[B, N, heads, D]`` float tensor matching ``plan`` (a rank-3 ``q`` or a
    wrong token or head count is a ValueError, as in :func:`oasis_kernels.routed_attention`).
    """
    return str(decide(q, plan, backend, deterministic))


@contextlib.contextmanager
def single_stream():
    """Inside this block every head group runs on the caller's stream (no side stream), for
    debugging and for measuring what the overlap gains: ``use_settings(overlap=False)``.
    Covers the calls made in the block, and their backward (which keeps its forward's settings)."""
    with use_settings(overlap=False):
        yield


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
