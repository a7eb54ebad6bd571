"""Algorithm 1 of the paper: Attention Specialization Routing.

    s_h = min(s_h^intra, s_h^window);  m_h = argmin
    sort all heads of all layers by s_h, ascending;  K = ceil(rho * N)
    the first N - K heads take m_h; the other K stay global.

Ties are broken deterministically: equal scores keep (layer, head) order, and a head whose
two scores are equal takes intra-frame (the cheaper pattern).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..plan import Mode

__all__ = ["HeadAssignment", "assign_heads", "global_head_count"]


def global_head_count(rho: float, n_heads: int) -> int:
    """``K = ceil(rho * N)`` computed exactly (0.4 * 10 is 4, not 4.000000000000001 -> 5)."""
    # numpy's floats too (np.float32(0.4) prints as 0.4: its decimal, not its binary value, is meant)
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be a number in [0, 1], got {rho=}")
    return math.ceil(Fraction(str(rho)) * n_heads)


@dataclass(frozen=True)
class HeadAssignment:
    """Result of Algorithm 1: ``modes[layer][head]`` plus what it was computed from."""

    modes: tuple[tuple[Mode, ...], ...]
    scores: tuple[tuple[float, ...], ...]       # s_h per layer and head
    preferred: tuple[tuple[Mode, ...], ...]     # m_h per layer and head
    rho: float
    num_global: int


def assign_heads(scores, rho: float) -> HeadAssignment:
    """Route every head of every layer.

    Args:
        scores: ``[layers, heads, 2]`` (``s^intra``, ``s^window``): a tensor, array or nested
            lists; e.g. the mean KL divergences from :class:`~oasis_kernels.routing.RoutingCalibrator`.
        rho: fraction of all heads (across layers) kept global.
    """
    s = torch.as_tensor(scores, dtype=torch.float64)
    if s.dim() != 3 or s.shape[-1] != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"scores must be [layers, heads, 2] (intra, window), got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError("scores must be finite (NaN or inf in the statistics)")
    n_layers, n_heads, _ = s.shape
    total = n_layers * n_heads
    k_global = global_head_count(rho, total)
    s_h = torch.minimum(s[..., 0], s[..., 1])
    m_h = [[Mode.INTRA if s[l, h, 0] <= s[l, h, 1] else Mode.WINDOW for h in range(n_heads)] for l in range(n_layers)]
    order = sorted(((float(s_h[l, h]), l, h) for l in range(n_layers) for h in range(n_heads)))
    modes = [[Mode.GLOBAL] * n_heads for _ in range(n_layers)]
    for _, l, h in order[: total - k_global]:
        modes[l][h] = m_h[l][h]
    return HeadAssignment(
        modes=tuple(tuple(r) for r in modes),
        scores=tuple(tuple(float(x) for x in r) for r in s_h),
        preferred=tuple(tuple(r) for r in m_h),
        rho=float(rho),
        num_global=k_global,
    )
