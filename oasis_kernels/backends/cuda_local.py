"""The CUDA backend: the local heads (intra-frame and window) in the kernels of
``csrc/local_attention/`` (:mod:`oasis_kernels.kernels.cuda_local`), one launch for the forward and
three for the backward (delta, dQ, dK/dV; deterministic, no atomics).

By request (``backend="cuda"`` or ``{"window": "cuda", ...}``); ``auto`` tries it before ``triton``
only for the modes and head dims of :data:`oasis_kernels.backends.CUDA_BEFORE_TRITON`, where it
measured faster on the card (none yet: docs/PERF.md, entry 21).
"""

from __future__ import annotations

import torch

from ..kernels import cuda_local
from ..plan import Mode
from .base import Backend
from .triton_local import HeadTable

__all__ = ["CudaLocalBackend"]


class CudaLocalBackend(Backend):
    name = "cuda"
    modes = frozenset({Mode.INTRA, Mode.WINDOW})

    def why_not(self, mode, q, plan) -> list[str]:
        reasons = self._modes_reason(mode)
        if q.device.type != "cuda":
            return reasons + [f"needs a CUDA tensor, got device {q.device}"]
        major, minor = torch.cuda.get_device_capability(q.device)
        if (major, minor) != (9, 0):
            reasons.append(f"built for sm_90a (Hopper, compute capability 9.0), got {major}.{minor}")
        if q.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"supports float16 and bfloat16, got {q.dtype=}")
        if q.shape[-1] not in (64, 128):
            reasons.append(f"head dim 64 or 128, got {q.shape[-1]}")
        if q.stride(-1) != 1:
            reasons.append(f"needs unit stride on the head dim, got {q.stride()=}")
        if q.shape[1] >= 2**31:
            reasons.append(f"at most 2^31 - 1 tokens, got {q.shape[1]}")
        n_local = sum(len(plan.heads_of(m)) for m in self.modes)
        if q.shape[0] * n_local > 65535:  # one program row per (batch, local head)
            reasons.append(f"batch x local heads at most 65535, got {q.shape[0]} x {n_local}")
        if not reasons:  # load (or JIT-build) the kernels only where they could run
            loaded, why = cuda_local.library()
            if not loaded:
                reasons.append(why)
        return reasons

    def prepare(self, plan, groups, device, settings) -> HeadTable:
        return HeadTable.of(plan, groups, device)

    def forward(self, q, k, v, out, lse, plan, groups, scale, state=None):
        heads = state or HeadTable.of(plan, groups, q.device)
        cuda_local.forward(q, k, v, out, lse, heads.on(q.device), heads.n_window, plan.grid, heads.radii, scale)

    def backward(self, dout, q, k, v, out, lse, dq, dk, dv, plan, groups, scale, deterministic, state=None):
        heads = state or HeadTable.of(plan, groups, q.device)
        cuda_local.backward(dout, q, k, v, out, lse, dq, dk, dv, heads.on(q.device), heads.n_window, plan.grid,
                            heads.radii, scale)
