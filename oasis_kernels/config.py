"""Runtime settings of routed attention: validated fields, process-wide defaults, and a context
manager that overrides them for a block of code.

>>> import oasis_kernels as ok
>>> ok.settings()
Settings(overlap=True, overlap_min_flops=100000000000.0, autotune=True, eager_replay=True, cudnn_direct=True)
>>> with ok.use_settings(overlap=False):      # every head group on the caller's stream
...     out = ok.routed_attention(q, k, v, plan)
>>> call = ok.prepare(q, plan, k, v, settings=ok.settings().replace(autotune=False))   # kept by one call

A prepared call (:func:`oasis_kernels.prepare`, and the ones ``routed_attention`` keeps) takes
the settings in force when it is made and keeps them, so a backward runs with its forward's
settings wherever and whenever autograd runs it. Settings are process-wide, not per thread
(as ``torch.backends`` flags are): set them before starting threads that call the kernels.

The environment gives the defaults, read once when ``oasis_kernels`` is imported (``0`` turns a
setting off): ``OASIS_OVERLAP`` (``overlap``), ``OASIS_TRITON_AUTOTUNE`` (``autotune``),
``OASIS_CPP_EAGER`` (``eager_replay``), ``OASIS_CUDNN_DIRECT`` (``cudnn_direct``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from dataclasses import dataclass

__all__ = ["Settings", "settings", "configure", "use_settings"]


@dataclass(frozen=True)
class Settings:
    """What routed attention may do at run time: how it schedules and launches the same math.
    ``autotune`` and ``cudnn_direct`` can pick other kernels for the same result, whose bits may
    differ in the last place (the tests' tolerance rule holds for every choice).

    Attributes:
        overlap: run the global heads on a high-priority side stream while the local heads run
            on the caller's (CUDA): the local kernels fill the SMs the global kernels' last wave
            leaves idle (docs/PERF.md, entries 9-10).
        overlap_min_flops: below this many forward FLOPs of global heads (``4 B N^2 D`` each) a
            call stays on one stream, except inside CUDA-graph capture: such calls are bound by
            host time, which the fork and join add to (~25 us on the H200's host).
        autotune: time the Triton configs that suit a launch on its first call and keep the
            fastest; off, the first config that suits it runs (faster start, for tests and sweeps).
        eager_replay: replay prepared eager calls from C++ (``oasis_kernels._C``, where built),
            which removes the Python host time of small layers (docs/PERF.md, entry 11).
        cudnn_direct: let cuDNN write the global heads' outputs and gradients straight into the
            routed tensors (``oasis_kernels._C`` built with the cuDNN frontend; entry 14).
    """

    overlap: bool = True
    overlap_min_flops: float = 1e11
    autotune: bool = True
    eager_replay: bool = True
    cudnn_direct: bool = True

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in (bool, "bool") and not isinstance(value, bool):
                raise TypeError(f"setting {field.name} must be a bool, got {type(value).__name__}: {value!r}")
        flops = self.overlap_min_flops
        if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not math.isfinite(flops) or flops < 0:
            raise ValueError(f"setting overlap_min_flops must be a finite number >= 0, got {flops!r}")
        object.__setattr__(self, "overlap_min_flops", float(flops))
        # hashed on every eager call (calls are looked up by signature): computed once
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self))))

    def __hash__(self) -> int:
        return self._hash

    def as_key(self) -> str:
        """A string that :meth:`from_key` turns back into these settings (the custom ops take it)."""
        return ",".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def from_key(key: str) -> "Settings":
        values = {}
        for part in key.split(","):
            name, value = part.split("=", 1)
            values[name] = value == "True" if value in ("True", "False") else float(value)
        return Settings(**values)

    def replace(self, **changes) -> "Settings":
        """A copy with ``changes``; an unknown name is a TypeError listing the known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)


def _from_environment() -> Settings:
    def on(name: str) -> bool:
        return os.environ.get(name, "1") != "0"

    return Settings(overlap=on("OASIS_OVERLAP"), autotune=on("OASIS_TRITON_AUTOTUNE"),
                    eager_replay=on("OASIS_CPP_EAGER"), cudnn_direct=on("OASIS_CUDNN_DIRECT"))


_current = _from_environment()


def settings() -> Settings:
    """The settings in force now (the defaults, or those of the innermost :func:`use_settings`)."""
    return _current


def configure(settings: Settings | None = None, **changes) -> Settings:
    """Change the process-wide settings: a whole :class:`Settings`, or changes to the current ones;
    returns the previous ones (``configure(previous)`` restores them). Names and values are
    validated before anything changes."""
    global _current
    if settings is not None and not isinstance(settings, Settings):
        raise TypeError(f"configure takes a Settings (or keyword changes), got {type(settings).__name__}")
    previous, _current = _current, (settings or _current).replace(**changes)
    return previous


@contextlib.contextmanager
def use_settings(settings: Settings | None = None, **changes):
    """Run a block with other settings: a whole :class:`Settings`, or changes to the current
    ones (``use_settings(overlap=False)``); the previous settings return when the block ends,
    also on an error. Covers the calls made in the block; their backward, wherever it runs,
    runs with the settings of its forward's call."""
    global _current
    if settings is not None and not isinstance(settings, Settings):
        raise TypeError(f"use_settings takes a Settings (or keyword changes), got {type(settings).__name__}")
    new = (settings or _current).replace(**changes)
    previous, _current = _current, new
    try:
        yield new
    finally:
        _current = previous
