"""Backend registry and the priority order ``auto`` follows for each mode."""

from __future__ import annotations

from ..plan import Mode
from .base import Backend
from .cuda_local import CudaLocalBackend
from .dense import SdpaCpuBackend, SdpaCudnnBackend, SdpaEfficientBackend, SdpaFlashBackend
from .flash import Flash2Backend, Flash3Backend
from .reference import ReferenceBackend
from .triton_local import TritonLocalBackend

__all__ = ["Backend", "BACKENDS", "ALIASES", "PRIORITY", "SMALL_INTRA_FLOPS", "CUDA_BEFORE_TRITON",
           "expand_backend_name", "priority"]

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Flash3Backend(),
        Flash2Backend(),
        SdpaCudnnBackend(),
        SdpaFlashBackend(),
        SdpaEfficientBackend(),
        SdpaCpuBackend(),
        TritonLocalBackend(),
        CudaLocalBackend(),
        ReferenceBackend(),
    )
}

#: Names that stand for several backends, tried in this order.
ALIASES: dict[str, tuple[str, ...]] = {
    "sdpa": ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_cpu"),
    "flash": ("flash3", "flash2"),
    "dense": ("flash3", "flash2", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_cpu"),
}

_DENSE = ALIASES["dense"]

#: What ``auto`` tries, first to last. Intra-frame heads prefer the dense kernels on the
#: frame-batched view: docs/PERF.md has the measurement (cuDNN beat the Triton kernel there).
#: ``cuda`` (csrc/local_attention/) serves only requests that name it until it measures faster.
PRIORITY: dict[Mode, tuple[str, ...]] = {
    Mode.GLOBAL: _DENSE + ("reference",),
    Mode.INTRA: _DENSE + ("triton", "reference"),
    Mode.WINDOW: ("triton", "reference"),
}


#: Intra-frame layers below this many forward FLOPs (``4 * B * N * H*W * D`` per head) go to
#: the Triton launch first: there the host time of a dense call (~70 us forward, ~110 us
#: backward on the H200, plus its copies) outweighs the GPU time the Triton kernel loses to
#: cuDNN (~1.5x slower per FLOP). Break-even: FLOPs * 3.5 * (1/250 - 1/400) TFLOP/s ~ 0.15 ms
#: at ~3e10 FLOPs. At the paper's shapes: S (5,20,40) with 4 intra heads 6.6e9 (Triton), A (9,45,80)
#: 2.7e11 (cuDNN). docs/PERF.md has the measurement.
SMALL_INTRA_FLOPS = 3e10


#: Where ``auto`` tries the CUDA kernels (csrc/local_attention/) just before ``triton``: mode -> the
#: head dims at which they measured faster on the card. Empty: on an H100 at B (27,45,80), 12 heads of
#: 128, bf16, the window heads took 1.02x Triton's time forward and 1.02-1.07x fwd+bwd (dfccbb8), the
#: routed layer with its window heads on them equalled ``auto`` within the run's spread, and the intra
#: heads take longer than cuDNN on the frame-batched view, which ``auto`` runs them on (1.43-1.47x at
#: 07f22fd, ~7% less since; docs/PERF.md entries 21m and 21o), so ``auto`` never picks them yet.
CUDA_BEFORE_TRITON: dict[Mode, frozenset[int]] = {}


def priority(mode: Mode, q, plan) -> tuple[tuple[str, ...], str]:
    """The order ``auto`` tries for ``mode``'s heads of ``plan`` on inputs like ``q``, and a note
    when it is not :data:`PRIORITY`'s."""
    order, note = PRIORITY[mode], ""
    if mode == Mode.INTRA and q.device.type == "cuda":
        b, n, _, d = q.shape
        t, h, w = plan.grid
        flops = 4 * b * n * h * w * d * len(plan.heads_of(mode))
        if flops < SMALL_INTRA_FLOPS:
            order = ("triton",) + order
            note = (f"small intra layer ({flops:.2g} < {SMALL_INTRA_FLOPS:.0e} FLOPs): one Triton launch costs less "
                    "host time than a dense call")
    if q.device.type == "cuda" and q.shape[-1] in CUDA_BEFORE_TRITON.get(mode, ()):
        at = order.index("triton")
        order = order[:at] + ("cuda",) + order[at:]
        note = "; ".join(filter(None, [note, "the CUDA kernels measured faster than Triton here (CUDA_BEFORE_TRITON)"]))
    return order, note


def expand_backend_name(name: str) -> tuple[str, ...]:
    if name in BACKENDS:
        return (name,)
    if name in ALIASES:
        return ALIASES[name]
    known = sorted(set(BACKENDS) | set(ALIASES) | {"auto"})
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(known)}")

