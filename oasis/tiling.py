"""Splitting a video into overlapping chunks (time) and tiles (space), and blending them back.

Every axis is cut the same way: spans of a fixed size with a fixed overlap, the last one aligned to
the end, and linear cross-fades over each overlap. The weights of two overlapping spans add up to
one at every position, so a result that is the same in both spans comes through unchanged: no
seams from the blending itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["spans", "span_weights", "TilePlan", "plan_tiles", "estimate_bytes"]


def spans(length: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, stop)`` spans of ``size`` covering ``[0, length)``, neighbours sharing >= ``overlap``.

    The last span ends at ``length`` (it may share more than ``overlap`` with the one before);
    ``size >= length`` gives one span.
    """
    if size <= 0 or length <= 0:
        raise ValueError(f"span size and length must be positive, got {size=}, {length=}")
    if size >= length:
        return [(0, length)]
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, size), got {overlap=} for {size=}")
    out, start = [], 0
    while start + size < length:
        out.append((start, start + size))
        start += size - overlap
    out.append((length - size, length))
    return out


def span_weights(all_spans: list[tuple[int, int]], device=None, dtype=torch.float32) -> list[torch.Tensor]:
    """One weight vector per span: a linear ramp across each overlap with a neighbour, normalised so
    the weights of all spans add up to exactly one at every position (also where three overlap)."""
    length = max(stop for _, stop in all_spans)
    raw = []
    for i, (start, stop) in enumerate(all_spans):
        pos = torch.arange(start, stop, dtype=torch.float64) + 0.5
        w = torch.ones(stop - start, dtype=torch.float64)
        if i > 0 and all_spans[i - 1][1] > start:
            w = torch.minimum(w, (pos - start) / (all_spans[i - 1][1] - start))
        if i + 1 < len(all_spans) and all_spans[i + 1][0] < stop:
            w = torch.minimum(w, (stop - pos) / (stop - all_spans[i + 1][0]))
        raw.append(w)
    total = torch.zeros(length, dtype=torch.float64)
    for (start, stop), w in zip(all_spans, raw):
        total[start:stop] += w
    return [(w / total[start:stop]).to(device=device, dtype=dtype) for (start, stop), w in zip(all_spans, raw)]


@dataclass(frozen=True)
class TilePlan:
    """How one call cuts the LQ video: chunks of frames and spatial tiles, in LQ units."""

    chunk_frames: int
    overlap_frames: int
    tile: tuple[int, int]
    tile_overlap: int
    estimated_bytes: int

    @property
    def tiled(self) -> bool:
        return self.tile is not None


def estimate_bytes(frames: int, height: int, width: int, *, dim: int, ffn_dim: int, elem: int, scale: int,
                   decoder_width: int = 96, frame_area: int | None = None, frames_per_latent: int = 4,
                   pixels_per_token: int = 4, decoder_values: int = 5700) -> int:
    """Peak activation bytes of restoring one LQ chunk ``frames x height x width`` (weights excluded);
    ``frame_area`` is the whole LQ frame's when ``height x width`` is one tile of it.

    DiT: per token the block keeps the residual stream, its float32 norm, q/k/v, the attention output
    and the FFN's hidden layer twice (about ``elem*(8*dim + 2*ffn) + 12*dim`` bytes). Decoder: the Wan
    decoder runs one latent frame at a time, so its working set scales with the output frame's area
    and its channel width: ~5700 values per output pixel at Wan2.1's width of 96 (from its measured
    10.3 GiB peak at 720x1280, bf16). Output: the chunk's whole frames, float32, twice (the
    accumulator and the blended result).
    """
    t = 1 + (frames - 1) // frames_per_latent
    tokens = t * math.ceil(height / pixels_per_token) * math.ceil(width / pixels_per_token)
    dit = tokens * (elem * (8 * dim + 2 * ffn_dim) + 12 * dim)
    out_pixels = height * width * scale * scale
    decoder = out_pixels * decoder_values * decoder_width // 96 * elem
    accumulators = 2 * frames * (frame_area or height * width) * scale * scale * 3 * 4
    return int(dit + decoder + accumulators)


def plan_tiles(frames: int, height: int, width: int, *, budget: int | None, estimate, chunk_frames: int | None = None,
               max_chunk_frames: int = 81, overlap_frames: int = 8, tile: int | None = None, tile_overlap: int = 32,
               frames_per_latent: int = 4, align: int = 4) -> TilePlan:
    """Choose chunk length and tile size so ``estimate(frames, h, w)`` fits ``budget`` bytes.

    Chunks are ``4k+1`` frames (the projector's grid), at most ``max_chunk_frames`` unless
    ``chunk_frames`` fixes them; tiles are squares whose side is a multiple of ``align``. The largest
    chunk without tiling wins; then the largest chunk in the largest tile that fits.
    Raises MemoryError when even the smallest fits nothing.
    """
    ft = frames_per_latent
    if chunk_frames is not None:
        if chunk_frames < 1 or (chunk_frames - 1) % ft:
            raise ValueError(f"chunk_frames must be {ft}k+1 (1, 5, 9, ...), got {chunk_frames}")
        chunk_options = [chunk_frames]
    else:
        whole = 1 + ft * math.ceil((frames - 1) / ft)  # the clip padded to 4k+1
        top = min(whole, max_chunk_frames)
        chunk_options = list(range(top, min(top, 1 + ft) - 1, -ft))
    if tile is not None:
        if tile <= 0 or tile % align:
            raise ValueError(f"tile must be a positive multiple of {align}, got {tile}")
        tile_options = [tile]
    else:
        side = max(height, width)
        tile_options = [None] + [s for s in (1024, 768, 512, 384, 256, 192, 128, 96, 64) if s < side]
    smallest = None
    for t in tile_options:
        th, tw = (height, width) if t is None else (min(t, height), min(t, width))
        for c in chunk_options:
            need = estimate(min(c, frames + ft), th, tw)
            smallest = need if smallest is None else min(smallest, need)
            if budget is None or need <= budget:
                # overlaps stay below half a chunk / tile, so at most two spans meet anywhere
                ov = min(overlap_frames, (c - 1) // 2) if frames > c else 0
                tov = 0 if t is None else min(tile_overlap, align * (min(th, tw) // (2 * align)))
                return TilePlan(c, ov, None if t is None else (th, tw), tov, need)
    raise MemoryError(f"the memory budget leaves {budget / 2**30:.2f} GiB beside the weights, below the smallest "
                      f"chunk's estimated {smallest / 2**30:.2f} GiB; raise the budget, or lower chunk frames or "
                      f"the tile size")
