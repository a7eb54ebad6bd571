"""What every backend provides.

A backend computes one attention pattern for a set of heads of a ``[B, N, heads, D]``
layer and writes its results into slices of tensors the dispatcher allocated once. Its
capability predicate :meth:`Backend.why_not` both selects and explains: an empty list
means "I can run this", otherwise each string is one reason why not. ``auto`` takes the
first backend in priority order whose list is empty and reports the others' reasons.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..plan import Mode, RoutingPlan

__all__ = ["Backend", "Groups", "frame_batched", "heads_view"]

#: ``(mode, heads)`` pairs handed to one backend call.
Groups = Sequence[tuple[Mode, Sequence[int]]]


class Backend:
    """Base class. Subclasses set ``name`` and ``modes`` and implement the three methods."""

    name: str = "?"
    modes: frozenset = frozenset()
    #: False when the backend only serves explicit requests (e.g. the Triton interpreter on CPU).
    auto_eligible: bool = True
    #: whether the backward gives the same bits on every run of the same inputs
    deterministic_backward: bool = True

    def determinism_reasons(self) -> list[str]:
        """Why this backend cannot serve a call that asks for ``deterministic=True`` (empty if it can)."""
        if self.deterministic_backward:
            return []
        return ["its backward is not deterministic (deterministic=True asks for one that is)"]

    def why_not(self, mode: Mode, q: torch.Tensor, plan: RoutingPlan) -> list[str]:
        """Reasons this backend cannot run ``mode`` heads on inputs like ``q``; empty if it can."""
        raise NotImplementedError

    def why_not_auto(self, mode: Mode, q: torch.Tensor, plan: RoutingPlan) -> list[str]:
        """Like :meth:`why_not`, plus reasons ``auto`` should not pick it (it may still be forced)."""
        return self.why_not(mode, q, plan)

    def prepare(self, plan: RoutingPlan, groups: Groups, device: torch.device, settings):
        """What this backend computes once per prepared call (:class:`oasis_kernels.call.RoutedCall`)
        for ``groups`` of ``plan`` on ``device`` under the call's ``settings``
        (:class:`oasis_kernels.Settings`); handed back as ``state`` on every run."""
        return None

    def forward(self, q, k, v, out, lse, plan: RoutingPlan, groups: Groups, scale: float, state=None) -> None:
        """Compute the heads of ``groups`` and write ``out[:, :, h]`` and ``lse[:, h]`` for each.

        ``q, k, v, out``: ``[B, N, heads, D]`` with unit stride on D; ``lse``: ``[B, heads, N]``
        float32 (float64 for float64 inputs).
        ``groups``: ``(mode, heads)`` pairs, each naming heads of one mode this backend serves.
        ``state``: what :meth:`prepare` returned for this call.
        """
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, dq, dk, dv, plan: RoutingPlan, groups: Groups,
                 scale: float, deterministic: bool, state=None) -> None:
        """Write ``dq, dk, dv[:, :, h]`` for the heads of ``groups``."""
        raise NotImplementedError

    def _modes_reason(self, mode: Mode) -> list[str]:
        if mode not in self.modes:
            served = ", ".join(m.name.lower() for m in sorted(self.modes))
            return [f"does not serve {mode.name.lower()} heads (serves: {served})"]
        return []

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


def heads_view(x: torch.Tensor, run: slice) -> torch.Tensor:
    """``x[:, :, run]`` for a ``[B, N, heads, D]`` tensor: a strided view, never a copy."""
    return x[:, :, run]


def frame_batched(x: torch.Tensor, grid) -> torch.Tensor:
    """``[B, N, h, D]`` -> ``[B*T, H*W, h, D]`` view: intra-frame attention is dense attention per frame.

    Free because tokens are t-major: each frame is a contiguous block of ``H*W`` tokens.
    Works on head-sliced views too (their batch stride stays a multiple of the frame stride);
    only a batch stride that is not a multiple of the token stride (e.g. a slice of a longer
    sequence) makes ``reshape`` copy.
    """
    t, h, w = grid
    # plain reshape, not einops: this sits on the per-call hot path, where einops adds host time
    return x.reshape(x.shape[0] * t, h * w, x.shape[2], x.shape[3])
