"""The Triton backend: every intra-frame and window head of a layer in one launch."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..plan import Mode
from .base import Backend

__all__ = ["TritonLocalBackend", "HeadTable", "input_limits"]


@functools.lru_cache(maxsize=1)
def _kernels():
    """Import the kernels on first use: ``import oasis_kernels`` must not need Triton."""
    try:
        from ..kernels import local_attention
    except Exception as exc:  # ImportError, or a Triton that fails to initialise
        return None, f"cannot import triton kernels: {type(exc).__name__}: {exc}"
    return local_attention, ""


@dataclass(frozen=True)
class HeadTable:
    """The local heads of one launch: their indices (int32, window heads first) in host memory,
    pinned on CUDA, how many are window heads, and the window radii the kernels compile for.

    The indices are copied to the device on each call, an asynchronous copy that CUDA graphs
    capture. A device tensor kept across calls would, when first made inside
    ``torch.compile(mode="reduce-overhead")``'s warm-up, live in its CUDA-graph pool, which
    refuses allocations that outlive a call.
    """

    host: torch.Tensor
    n_window: int
    radii: tuple[int, int, int]
    autotune: bool | None = None  # the call's setting; None: the settings in force at launch

    @classmethod
    def of(cls, plan, groups, device, autotune: bool | None = None) -> "HeadTable":
        window = [h for m, heads in groups if m == Mode.WINDOW for h in heads]
        intra = [h for m, heads in groups if m == Mode.INTRA for h in heads]
        host = torch.tensor(window + intra, dtype=torch.int32)
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
        return cls(host, len(window), _radii(plan, len(window)), autotune)

    def on(self, device) -> torch.Tensor:
        return self.host.to(device, non_blocking=True)


class TritonLocalBackend(Backend):
    name = "triton"
    modes = frozenset({Mode.INTRA, Mode.WINDOW})

    def why_not(self, mode, q, plan) -> list[str]:
        reasons = self._modes_reason(mode)
        kernels, err = _kernels()
        if kernels is None:
            return reasons + [err]
        if q.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(q.device)
            if major < 8:
                reasons.append(f"needs compute capability 8.0+, got {major}.{minor}")
        elif not (q.device.type == "cpu" and kernels.INTERPRET):
            reasons.append(f"needs a CUDA tensor (or TRITON_INTERPRET=1 at import for CPU tests), got device {q.device}")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"supports float16, bfloat16 and float32, got {q.dtype=}")
        d = q.shape[-1]
        if d % 16 or not 16 <= d <= 256:
            reasons.append(f"head dim must be a multiple of 16 in [16, 256], got {d}")
        if q.stride(-1) != 1:
            reasons.append(f"needs unit stride on the head dim, got {q.stride()=}")
        return reasons + input_limits(_radii(plan) if mode == Mode.WINDOW else (0, 0, 0), q=q)

    def why_not_auto(self, mode, q, plan) -> list[str]:
        reasons = self.why_not(mode, q, plan)
        if not reasons and q.device.type == "cpu":
            reasons.append("the Triton interpreter is a test tool; ask for backend='triton' explicitly")
        return reasons

    def prepare(self, plan, groups, device, settings) -> HeadTable:
        return HeadTable.of(plan, groups, device, settings.autotune)

    def forward(self, q, k, v, out, lse, plan, groups, scale, state=None):
        _check_extents(k=k, v=v)
        heads = state or HeadTable.of(plan, groups, q.device)
        _kernels()[0].local_attention_forward(q, k, v, out, lse, heads.on(q.device), heads.n_window, plan.grid,
                                              heads.radii, scale, autotune=heads.autotune)

    def backward(self, dout, q, k, v, out, lse, dq, dk, dv, plan, groups, scale, deterministic, state=None):
        heads = state or HeadTable.of(plan, groups, q.device)
        _kernels()[0].local_attention_backward(dout, q, k, v, out, lse, dq, dk, dv, heads.on(q.device), heads.n_window,
                                               plan.grid, heads.radii, scale, autotune=heads.autotune)


def _extent(x) -> int:
    """Largest element offset within one batch item (the kernels add the batch offset in int64)."""
    return sum((size - 1) * stride for size, stride in zip(x.shape[1:], x.stride()[1:]))


def input_limits(radii, **tensors) -> list[str]:
    """Why the Triton kernels (attention and routing statistics) cannot take these window radii
    (already clipped to the grid) or tensors: the 10-bit visibility codes and int32 offsets."""
    kernels, err = _kernels()
    if kernels is None:
        return [err]
    reasons = []
    if max(radii) > kernels.MAX_RADIUS:
        reasons.append(f"window radii up to {kernels.MAX_RADIUS} per axis (clipped to the grid), got {radii}")
    for name, x in tensors.items():
        if _extent(x) >= 2**31:
            reasons.append(f"offsets within one batch item overflow int32 for {name}.shape={tuple(x.shape)}, "
                           f"{name}.stride()={x.stride()}")
    return reasons


def _check_extents(**tensors):
    reasons = input_limits((0, 0, 0), **tensors)
    if reasons:
        raise ValueError(f"triton backend: {'; '.join(reasons)}; make the tensor contiguous or use another backend")


def _radii(plan, n_window=1):
    """Window radii for the kernels, which compile one variant per radii: clipped to the grid (a
    radius beyond it changes nothing and keeps the halo small), and zeros when no head of the
    launch is a window head (intra heads ignore them)."""
    if not n_window:
        return (0, 0, 0)
    return tuple(min(r, s - 1) for r, s in zip(plan.radii, plan.grid))
