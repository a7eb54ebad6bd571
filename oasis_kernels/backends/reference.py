"""The chunked reference as a backend: every mode, any device, memory-bounded, float32 math."""

from __future__ import annotations

from ..masks import mask_for
from ..plan import Mode, head_runs
from ..reference import box_attention_backward, box_attention_forward
from .base import Backend

__all__ = ["ReferenceBackend"]


class ReferenceBackend(Backend):
    name = "reference"
    modes = frozenset(Mode)

    def why_not(self, mode, q, plan):
        return []

    def forward(self, q, k, v, out, lse, plan, groups, scale, state=None):
        for mode, heads in groups:
            mask = mask_for(mode, plan.grid, plan.window)
            for run in head_runs(heads):
                o, l = box_attention_forward(q[:, :, run], k[:, :, run], v[:, :, run], mask, scale)
                out[:, :, run] = o
                lse[:, run] = l

    def backward(self, dout, q, k, v, out, lse, dq, dk, dv, plan, groups, scale, deterministic, state=None):
        for mode, heads in groups:
            mask = mask_for(mode, plan.grid, plan.window)
            for run in head_runs(heads):
                grads = box_attention_backward(
                    dout[:, :, run], q[:, :, run], k[:, :, run], v[:, :, run], out[:, :, run], lse[:, run],
                    mask, scale,
                )
                for dst, src in zip((dq, dk, dv), grads):
                    dst[:, :, run] = src
