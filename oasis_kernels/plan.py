"""Routing plans: which attention pattern each head of a layer uses.

A :class:`RoutingPlan` is small, immutable and hashable. It fixes the token grid
``(T, H, W)``, one :class:`Mode` per head and the window size of window heads.
Everything downstream (dispatch, kernels, the reference) reads the plan; nothing
else carries routing state.
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = [
    "Mode",
    "RoutingPlan",
    "normalize_grid",
    "normalize_window",
    "normalize_modes",
    "head_runs",
]


class Mode(enum.IntEnum):
    """Attention pattern of one head. The integer values are part of the kernel ABI."""

    GLOBAL = 0
    INTRA = 1
    WINDOW = 2

    @classmethod
    def parse(cls, value: "Mode | str | int") -> "Mode":
        if isinstance(value, Mode):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            aliases = {
                "global": cls.GLOBAL, "g": cls.GLOBAL, "full": cls.GLOBAL,
                "intra": cls.INTRA, "i": cls.INTRA, "intra-frame": cls.INTRA,
                "intra_frame": cls.INTRA, "frame": cls.INTRA,
                "window": cls.WINDOW, "w": cls.WINDOW, "win": cls.WINDOW,
            }
            if key in aliases:
                return aliases[key]
            raise ValueError(
                f"unknown attention mode {value!r}; expected one of 'global', 'intra', 'window'"
            )
        if not isinstance(value, bool) and hasattr(value, "__index__"):  # an int, or numpy's (as grid sizes)
            try:
                return cls(operator.index(value))
            except (ValueError, TypeError):
                raise ValueError(f"unknown attention mode {value!r}; expected 0, 1 or 2") from None
        raise TypeError(f"attention mode must be a Mode, str or int, got {type(value).__name__}: {value!r}")

    @property
    def short(self) -> str:
        return "giw"[self.value]


def _as_int_triple(value, name: str, cube: bool) -> tuple[int, int, int]:
    """``value`` as three ints; with ``cube``, one int ``n`` means ``(n, n, n)``."""
    wanted = "an int or a 3-tuple of ints" if cube else "a 3-tuple of ints (T, H, W)"
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be {wanted}, got {value!r}")
    if isinstance(value, (set, frozenset, dict)):  # no order: {9, 45, 80} iterates as 80, 9, 45
        raise TypeError(f"{name} must be {wanted} in order, got the unordered {type(value).__name__} {value!r}")
    if isinstance(value, int):
        if not cube:
            # a grid is rarely a cube: RoutingPlan(180, ...) meaning (180, 180, 180) hid mistakes
            raise TypeError(f"{name} must be {wanted}, got the single int {value!r}; "
                            f"write all three sizes, e.g. ({value}, {value}, {value}) for a cube")
        return (value, value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be {wanted}, got {value!r}") from None
    if len(items) != 3:
        raise ValueError(f"{name} must have 3 entries (T, H, W), got {value!r}")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            # accept integral numpy / torch scalars, refuse floats
            if hasattr(item, "__index__"):
                item = item.__index__()
            else:
                raise TypeError(f"{name} entries must be ints, got {value!r}")
        out.append(int(item))
    return (out[0], out[1], out[2])


def normalize_grid(grid) -> tuple[int, int, int]:
    """``(T, H, W)`` as a tuple of positive ints; a single int is refused (TypeError), a grid
    is not taken to be a cube."""
    t = _as_int_triple(grid, "grid", cube=False)
    if min(t) <= 0:
        raise ValueError(f"grid sizes must be positive, got {grid=}")
    return t


def normalize_window(window) -> tuple[int, int, int]:
    """``(Pt, Ph, Pw)`` as a tuple of odd positive ints; an int means a cube."""
    w = _as_int_triple(window, "window", cube=True)
    if min(w) <= 0 or any(x % 2 == 0 for x in w):
        raise ValueError(
            f"window sizes must be odd and positive (a window is centred on its query), got {window=}"
        )
    return w


def normalize_modes(modes: Iterable) -> tuple[Mode, ...]:
    if isinstance(modes, (str, bytes)):
        raise TypeError(f"modes must be a sequence with one entry per head, got the string {modes!r}")
    out = tuple(Mode.parse(m) for m in modes)
    if not out:
        raise ValueError("modes must name at least one head")
    return out


def head_runs(heads: Sequence[int]) -> list[slice]:
    """Split sorted head indices into strided slices (arithmetic progressions).

    Each slice selects its heads from a ``[B, N, heads, D]`` tensor as a view, so
    backends that take whole tensors need no gather. ``[0, 3, 6, 9]`` is one slice
    (step 3); ``[0, 1, 5]`` becomes ``[0:2, 5:6]``.
    """
    heads = list(heads)
    runs: list[slice] = []
    i = 0
    while i < len(heads):
        if i + 1 == len(heads):
            runs.append(slice(heads[i], heads[i] + 1, 1))
            break
        step = heads[i + 1] - heads[i]
        j = i + 1
        while j + 1 < len(heads) and heads[j + 1] - heads[j] == step:
            j += 1
        runs.append(slice(heads[i], heads[j] + 1, step))
        i = j + 1
    return runs


@dataclass(frozen=True)
class RoutingPlan:
    """Per-head attention routing of one layer.

    Args:
        grid: ``(T, H, W)`` latent token grid, three ints (a single int is a TypeError); tokens
            are flattened t-major, then h, then w, so ``N = T * H * W`` and token ``n`` sits at
            ``(n // (H*W), (n // W) % H, n % W)``.
        modes: one entry per head: ``"global"``, ``"intra"``, ``"window"`` (or :class:`Mode`).
        window: odd window size ``(Pt, Ph, Pw)`` of window heads, or one int for a cube.

    The plan is hashable and compares by value, so it can key caches and be closed over
    by ``torch.compile``.
    """

    grid: tuple[int, int, int]
    modes: tuple[Mode, ...]
    window: tuple[int, int, int] = (3, 5, 5)

    def __init__(self, grid, modes, window=(3, 5, 5)):
        object.__setattr__(self, "grid", normalize_grid(grid))
        object.__setattr__(self, "modes", normalize_modes(modes))
        object.__setattr__(self, "window", normalize_window(window))

    # -- construction helpers -------------------------------------------------
    @classmethod
    def uniform(cls, grid, heads: int, mode, window=(3, 5, 5)) -> "RoutingPlan":
        if isinstance(heads, bool) or not isinstance(heads, int):
            raise TypeError(f"heads must be an int, got {heads=}")
        if heads <= 0:
            raise ValueError(f"heads must be positive, got {heads=}")
        return cls(grid, [Mode.parse(mode)] * heads, window)

    @classmethod
    def from_counts(cls, grid, n_global: int, n_intra: int, n_window: int, window=(3, 5, 5)) -> "RoutingPlan":
        """Contiguous plan: ``n_global`` global heads, then intra, then window heads."""
        for name, n in (("n_global", n_global), ("n_intra", n_intra), ("n_window", n_window)):
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(f"{name} must be an int, got {n!r}")
            if n < 0:
                raise ValueError(f"{name} must be >= 0, got {name}={n}")
        modes = [Mode.GLOBAL] * n_global + [Mode.INTRA] * n_intra + [Mode.WINDOW] * n_window
        return cls(grid, modes, window)

    # -- derived quantities ----------------------------------------------------
    @property
    def heads(self) -> int:
        return len(self.modes)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def radii(self) -> tuple[int, int, int]:
        """Half-window ``(Pt//2, Ph//2, Pw//2)``: a key is visible when each offset is within it."""
        return tuple(p // 2 for p in self.window)  # type: ignore[return-value]

    def heads_of(self, mode) -> tuple[int, ...]:
        m = Mode.parse(mode)
        return tuple(i for i, x in enumerate(self.modes) if x == m)

    def counts(self) -> dict[Mode, int]:
        return {m: sum(1 for x in self.modes if x == m) for m in Mode}

    @property
    def is_contiguous(self) -> bool:
        """True when the heads of each mode form one contiguous block."""
        seen: list[Mode] = []
        for m in self.modes:
            if not seen or seen[-1] != m:
                if m in seen:
                    return False
                seen.append(m)
        return True

    def head_permutation(self) -> tuple[int, ...]:
        """Permutation ``perm`` that groups heads by mode (global, intra, window), stable.

        ``plan.permuted()`` routes head ``i`` of the reordered layer like head ``perm[i]``
        of this one. To reorder a model once at load time, permute the head blocks of the
        q/k/v projection rows and of the output projection columns with ``perm``.
        """
        return tuple(sorted(range(self.heads), key=lambda i: (int(self.modes[i]), i)))

    def permuted(self) -> "RoutingPlan":
        perm = self.head_permutation()
        return RoutingPlan(self.grid, [self.modes[i] for i in perm], self.window)

    # -- ABI for custom ops ----------------------------------------------------
    def as_op_args(self) -> tuple[list[int], list[int], list[int]]:
        return list(self.grid), [int(m) for m in self.modes], list(self.window)

    @classmethod
    def from_op_args(cls, grid, modes, window) -> "RoutingPlan":
        return cls(tuple(grid), [Mode(int(m)) for m in modes], tuple(window))

    def with_grid(self, grid) -> "RoutingPlan":
        return RoutingPlan(grid, self.modes, self.window)

    def __repr__(self) -> str:
        mix = "".join(m.short for m in self.modes)
        return f"RoutingPlan(grid={self.grid}, modes='{mix}', window={self.window})"
