"""Backend registry and the priority order ``auto`` follows for each mode."""

from __future__ import annotations

from ..plan import Mode
from .base import Backend
from .dense import SdpaCpuBackend, SdpaCudnnBackend, SdpaEfficientBackend, SdpaFlashBackend
from .flash import Flash2Backend, Flash3Backend
from .reference import ReferenceBackend
from .triton_local import TritonLocalBackend

__all__ = ["Backend", "BACKENDS", "ALIASES", "PRIORITY", "expand_backend_name"]

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
PRIORITY: dict[Mode, tuple[str, ...]] = {
    Mode.GLOBAL: _DENSE + ("reference",),
    Mode.INTRA: _DENSE + ("triton", "reference"),
    Mode.WINDOW: ("triton", "reference"),
}


def expand_backend_name(name: str) -> tuple[str, ...]:
    if name in BACKENDS:
        return (name,)
    if name in ALIASES:
        return ALIASES[name]
    known = sorted(set(BACKENDS) | set(ALIASES) | {"auto"})
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(known)}")

