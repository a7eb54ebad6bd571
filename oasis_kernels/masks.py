"""Attention masks as small typed objects.

Each pattern of the paper is a box-shaped neighbourhood on the ``(T, H, W)`` grid: key
``(t', h', w')`` is visible from query ``(t, h, w)`` iff ``|t'-t| <= rt``, ``|h'-h| <= rh``
and ``|w'-w| <= rw``. The radii ``(rt, rh, rw)`` are all that distinguishes the patterns:

=============  ==========================  ================================
pattern        radii                       paper
=============  ==========================  ================================
global         ``(T-1, H-1, W-1)``         full attention
intra-frame    ``(0, H-1, W-1)``           eq. 5: keys of the same frame
window         ``(Pt//2, Ph//2, Pw//2)``   eqs. 6-7, clipped at the borders
=============  ==========================  ================================

The window is *clipped*: a token near a border sees fewer keys (a corner token of a
(3,5,5) window sees 2*3*3 = 18 keys, not 75). NATTEN instead *shifts* the window inward so
that every query sees exactly Pt*Ph*Pw keys; the two differ at the borders only.

``materialize()`` builds the dense boolean ``[N, N]`` mask. It exists for tests and for
small debugging cases; the kernels never build it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import Mode, RoutingPlan, normalize_grid, normalize_window

__all__ = ["BoxMask", "GlobalMask", "IntraFrameMask", "WindowMask", "mask_for", "grid_coords"]


def grid_coords(grid, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, h, w) coordinates of every token in flattened t-major order, each ``[N]`` int64."""
    t, h, w = normalize_grid(grid)
    n = torch.arange(t * h * w, device=device)
    return n // (h * w), (n // w) % h, n % w


def _visible_along_axis(size: int, radius: int) -> int:
    """Number of (query, key) pairs along one axis with ``|q - k| <= radius``, clipped."""
    r = min(radius, size - 1)
    # sum over q of (min(q + r, size-1) - max(q - r, 0) + 1)
    return size * (2 * r + 1) - r * (r + 1)


@dataclass(frozen=True)
class BoxMask:
    """Key visible iff every coordinate offset is within ``radii`` (clipped at the borders)."""

    grid: tuple[int, int, int]
    radii: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    def visible_pairs(self) -> int:
        """Number of visible (query, key) pairs, i.e. the nonzeros of the mask."""
        out = 1
        for size, r in zip(self.grid, self.radii):
            out *= _visible_along_axis(size, r)
        return out

    def density(self) -> float:
        return self.visible_pairs() / float(self.num_tokens) ** 2

    def materialize(self, device=None) -> torch.Tensor:
        """Dense ``[N, N]`` bool mask, ``mask[q, k]`` True where key ``k`` is visible from query ``q``."""
        ct, ch, cw = grid_coords(self.grid, device)
        rt, rh, rw = self.radii
        return (
            ((ct[:, None] - ct[None, :]).abs() <= rt)
            & ((ch[:, None] - ch[None, :]).abs() <= rh)
            & ((cw[:, None] - cw[None, :]).abs() <= rw)
        )


class GlobalMask(BoxMask):
    """Every query sees every key."""

    def __init__(self, grid):
        g = normalize_grid(grid)
        super().__init__(g, (g[0] - 1, g[1] - 1, g[2] - 1))


class IntraFrameMask(BoxMask):
    """Each query sees the keys of its own frame (paper eq. 5)::

        frame t=0   frame t=1
        [x x x x] . [. . . .]      query in frame 0: row of frame 0 only
        [x x x x] . [. . . .]
    """

    def __init__(self, grid):
        g = normalize_grid(grid)
        super().__init__(g, (0, g[1] - 1, g[2] - 1))


class WindowMask(BoxMask):
    """Clipped 3D sliding window centred on each query (paper eqs. 6-7)::

        window (1,3,3), query q at a corner and in the interior of one frame:
        q x . . .        . . . . .
        x x . . .        . x x x .
        . . . . .        . x q x .
                         . x x x .
    """

    window: tuple[int, int, int]

    def __init__(self, grid, window=(3, 5, 5)):
        g = normalize_grid(grid)
        wdw = normalize_window(window)
        super().__init__(g, tuple(min(p // 2, s - 1) for p, s in zip(wdw, g)))
        object.__setattr__(self, "window", wdw)


def mask_for(mode, grid, window=(3, 5, 5)) -> BoxMask:
    m = Mode.parse(mode)
    if m == Mode.GLOBAL:
        return GlobalMask(grid)
    if m == Mode.INTRA:
        return IntraFrameMask(grid)
    return WindowMask(grid, window)


def plan_masks(plan: RoutingPlan) -> list[BoxMask]:
    """One mask object per head of ``plan``."""
    return [mask_for(m, plan.grid, plan.window) for m in plan.modes]
