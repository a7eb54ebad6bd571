"""The Triton backend: every intra-frame and window head of a layer in one launch."""

from __future__ import annotations

import functools

import torch

from ..plan import Mode
from .base import Backend

__all__ = ["TritonLocalBackend", "input_limits"]


@functools.lru_cache(maxsize=1)
def _kernels():
    """Import the kernels on first use: ``import oasis_kernels`` must not need Triton."""
    try:
        from ..kernels import local_attention
    except Exception as exc:  # ImportError, or a Triton that fails to initialise
        return None, f"cannot import triton kernels: {type(exc).__name__}: {exc}"
    return local_attention, ""


_TABLES: dict = {}


def _head_table(groups, device) -> tuple[torch.Tensor, int]:
    """int32 ``[n_local]`` head indices on ``device``, window heads first, and the number of
    window heads.

    The indices are kept per head set in pinned host memory and copied to the device on each
    call, an asynchronous copy that CUDA graphs capture. A device tensor kept across calls
    would, when first made inside ``torch.compile(mode="reduce-overhead")``'s warm-up, live in
    its CUDA-graph pool, which refuses allocations that outlive a call.
    """
    device = torch.device(device)
    key = (tuple((int(m), tuple(h)) for m, h in groups), device.type)
    hit = _TABLES.get(key)
    if hit is None:
        window = [h for m, heads in groups if m == Mode.WINDOW for h in heads]
        intra = [h for m, heads in groups if m == Mode.INTRA for h in heads]
        host = torch.tensor(window + intra, dtype=torch.int32)
        hit = _TABLES[key] = (host.pin_memory() if device.type == "cuda" else host, len(window))
    host, n_window = hit
    return host.to(device, non_blocking=True), n_window


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

    def forward(self, q, k, v, out, lse, plan, groups, scale):
        _check_extents(k=k, v=v)
        kernels, _ = _kernels()
        table, n_window = _head_table(groups, q.device)
        kernels.local_attention_forward(q, k, v, out, lse, table, n_window, plan.grid, _radii(plan, n_window), scale)

    def backward(self, dout, q, k, v, out, lse, dq, dk, dv, plan, groups, scale, deterministic):
        kernels, _ = _kernels()
        table, n_window = _head_table(groups, q.device)
        kernels.local_attention_backward(
            dout, q, k, v, out, lse, dq, dk, dv, table, n_window, plan.grid, _radii(plan, n_window), scale
        )


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
