"""The causal cache entries of one stage's convolutions as slots of one tensor (docs/PERF.md entry 18u).

A causal 3x3x3 convolution reads its last ``time_pad`` input frames of the previous call, then the new
ones, as one run of frames. Kept apart, each entry is copied into a new buffer's front at every call and
the new entry written a second time beside the buffer (by the norm pass, ``tail``). Here the entries of a
stage's convolutions (:class:`ConvGroup`: one geometry, run in a fixed order) are slots of ``time_pad``
frames in one tensor, the :class:`CacheArena`, with room for one call's new frames: a convolution's input
is a *window* of it, its entry's slot followed by free slots the norm pass writes the new frames into, and
its next entry is the window's last slot, where the frames already are. A stage's windows move up the
tensor by the new frames at each call; once the top is reached the entries are moved down together
(:meth:`CacheArena._compact`: one copy of each entry, as many bytes as the copies into the buffers'
fronts were), so what goes is the second write, the buffers and their allocations. The arrangement keeps
itself: entries claimed from the top down in the order the convolutions first run leave each one's
window free when its turn comes.

The frames of a call must fill whole slots (``frames`` a multiple of ``time_pad``) and the batch be one
(a window of a larger batch is not a packed tensor); any other call takes the usual path, its entry still
in its slot (overwritten in place). Not under autograd: a window overwritten later would be a tensor saved
for the backward pass.
"""

from __future__ import annotations

import torch

__all__ = ["ConvGroup", "CacheArena"]


class ConvGroup:
    """The time-padded convolutions of one stage whose inputs share a geometry (channels, height, width), in
    the order they run: ``size`` of them. Each member's ``group`` attribute points here; a decode or encode
    that runs the stage over several calls plans its arena with :meth:`plan`."""

    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size

    def plan(self, cache: dict, frames: int, time_pad: int = 2) -> None:
        """Give the stage an arena in ``cache`` for calls of ``frames`` new frames each (made at the first
        member's call, with ``frames // time_pad`` free slots): not where such calls fill no whole slot."""
        if frames >= time_pad and frames % time_pad == 0:
            cache[self] = frames // time_pad

    def __repr__(self) -> str:
        return f"ConvGroup(size={self.size})"


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class CacheArena:
    """``slots`` slots of ``time_pad`` frames, ``[1, C, slots * time_pad, H, W]`` in ``like``'s layout: the
    cache entries of a :class:`ConvGroup`'s convolutions and the free room their windows take."""

    def __init__(self, like: torch.Tensor, time_pad: int, slots: int):
        b, c, _, h, w = like.shape
        self.time_pad, self.slots = time_pad, slots
        fmt = torch.channels_last_3d if c > 1 and like.stride(1) == 1 else torch.contiguous_format
        self.mem = torch.empty((b, c, slots * time_pad, h, w), dtype=like.dtype, device=like.device, memory_format=fmt)
        self.owner: list = [None] * slots  # the layer whose entry each slot holds
        self.pos: dict = {}  # layer -> its slot
        self.views: dict = {}  # layer -> the view of its slot handed out as its cache entry
        #: windows handed out and entries moved by compaction or relocation (tests and benchmarks read them)
        self.windows = self.moves = 0

    @classmethod
    def get(cls, group, x: torch.Tensor, time_pad: int, cache: dict | None, *grad_inputs) -> "CacheArena | None":
        """``group``'s arena in ``cache`` for an input like ``x`` (made here at the first call where the stage is
        planned), or None: no group, no plan, a batch over one, gradients wanted, another geometry."""
        if group is None or cache is None or x.dim() != 5 or x.shape[0] != 1 or _grad_needed(x, *grad_inputs):
            return None
        arena = cache.get(group)
        if isinstance(arena, CacheArena):
            return arena if arena._fits(x, time_pad) else None
        if not isinstance(arena, int) or isinstance(arena, bool):
            return None
        arena = cls(x, time_pad, group.size + arena)
        cache[group] = arena
        return arena

    def _fits(self, x: torch.Tensor, time_pad: int) -> bool:
        m = self.mem
        return (time_pad == self.time_pad and x.shape[:2] == m.shape[:2] and x.shape[3:] == m.shape[3:]
                and x.dtype == m.dtype and x.device == m.device and (x.shape[1] == 1 or (x.stride(1) == 1) == (m.stride(1) == 1)))

    def _slot(self, i: int, n: int = 1) -> torch.Tensor:
        tp = self.time_pad
        return self.mem[:, :, i * tp:(i + n) * tp]

    def _own(self, layer, cache: dict) -> int | None:
        """``layer``'s slot, or None; a slot whose view is no longer the layer's entry (another path replaced
        it) is released."""
        s = self.pos.get(layer)
        if s is not None and cache.get(layer) is not self.views[layer]:
            self.release(layer)
            s = None
        return s

    def release(self, layer) -> None:
        """Free ``layer``'s slot (its entry now lives elsewhere, or nowhere)."""
        s = self.pos.pop(layer, None)
        if s is not None:
            self.owner[s] = None
            del self.views[layer]

    def _settle(self, layer, s: int, cache: dict) -> torch.Tensor:
        """Make slot ``s`` ``layer``'s entry (its old slot, if any, freed)."""
        old = self.pos.get(layer)
        if old is not None:
            self.owner[old] = None
        self.owner[s], self.pos[layer] = layer, s
        view = self.views[layer] = self._slot(s)
        cache[layer] = view
        return view

    def _run(self, n: int, mine: int | None = None) -> int | None:
        """The highest start of ``n`` slots free (``mine`` counting as free), or None."""
        free = 0
        for i in range(self.slots - 1, -1, -1):
            free = free + 1 if (self.owner[i] is None or i == mine) else 0
            if free >= n:
                return i
        return None

    def _compact(self, cache: dict) -> None:
        """Every entry moved as low as it goes, their order kept (each move into a slot just freed)."""
        j = 0
        for i in range(self.slots):
            layer = self.owner[i]
            if layer is None:
                continue
            if i != j:
                self._slot(j).copy_(self._slot(i))
                self._settle(layer, j, cache)
                self.moves += 1
            j += 1

    def _free(self, a: int, n: int) -> bool:
        """Slots ``a .. a + n - 1`` exist and are free."""
        return a + n <= self.slots and all(self.owner[i] is None for i in range(a, a + n))

    def window(self, layer, frames: int, cache: dict) -> torch.Tensor | None:
        """The input buffer of ``layer``'s call on ``frames`` new frames: its cached frames (its entry; zeros
        where it has none and ``cache`` holds none either; the entry held there copied in otherwise), then
        ``frames`` frames for the caller to write. ``cache[layer]`` becomes the window's last slot (the next
        entry, written by that same write). None where ``frames`` fills no whole slots or no room is found."""
        m, rest = divmod(frames, self.time_pad)
        if rest or m < 1 or m + 1 > self.slots:
            return None
        s = self._own(layer, cache)
        prev = None if s is not None else cache.get(layer)
        if prev is not None and prev.shape != self._slot(0).shape:
            return None
        if s is not None and self._free(s + 1, m):
            start = s
        else:
            start = self._run(m + 1, s)
            if start is None:  # the windows reached the top: every entry down, then this one's room above it
                self._compact(cache)
                s = self.pos.get(layer)
                start = s if s is not None and self._free(s + 1, m) else self._run(m + 1, s)
                if start is None:
                    return None
            if s is None:
                if prev is None:
                    self._slot(start).zero_()
                else:
                    self._slot(start).copy_(prev)
            elif start != s:
                self._slot(start).copy_(self._slot(s))
                self.moves += 1
        self._settle(layer, start + m, cache)
        self.windows += 1
        return self._slot(start, m + 1)

    def entry(self, layer, cache: dict) -> torch.Tensor | None:
        """A slot to hold ``layer``'s next entry where the caller writes it (a call on frames that fill no
        whole slots): its own slot, else the highest free one; None where none is free."""
        s = self._own(layer, cache)
        if s is None:
            s = self._run(1)
            if s is None:
                return None
        return self._settle(layer, s, cache)
