"""Baseline JPEG in torch: frames through encode and decode on their own device, batched.

The training degradations' JPEG (:mod:`oasis.degrade`) runs on the CPU through PIL (libjpeg) by
default. On a GPU that means a copy to the host and back per JPEG step and ~50-200 ms of one core per
clip, which made the JPEG steps most of the CPU time of a degraded clip. This module computes the
same lossy steps as libjpeg's baseline encoder and decoder with torch ops, on the frames' device:

1. RGB -> YCbCr (JFIF), samples rounded to integers;
2. chroma down-sampled 2x2 (4:2:0, libjpeg's default) as libjpeg's h2v2_downsample does: the sum of
   each 2x2 block plus a bias alternating 1, 2 along the row, over 4, rounded down; the image first
   padded to 16-pixel multiples by repeating its last row and column (as libjpeg fills its MCUs);
3. level shift, 8x8 DCT-II, quantisation by the Annex K tables scaled by the quality as libjpeg's
   ``jpeg_quality_scaling`` does (clamped to 1..255, baseline), rounded half away from zero;
4. decode: dequantisation, inverse DCT, samples rounded and clamped to 0..255, chroma up-sampled by
   libjpeg's "fancy" triangle filter (3/4 of the nearer sample, 1/4 of the farther, per axis, in its
   integer arithmetic), YCbCr -> RGB rounded and clamped.

The entropy coding is lossless and left out. libjpeg works in fixed point (its islow DCT, integer
colour conversion and up-sampling), so a coefficient near a quantisation step now and then rounds
the other way: against PIL the mean difference is ~0.2-0.7 of 255 levels, where the JPEG itself moves
pixels by ~8-19, and single pixels of such a block differ by up to a few tens of levels
(tests/test_oasis_degrade.py bounds the mean). The artefacts (blocking, ringing, chroma loss) are the
same. Nothing here waits for the device: the tables go over with the frames' stream.
"""

from __future__ import annotations

import functools
import math
import operator

import torch
import torch.nn.functional as F

__all__ = ["jpeg_roundtrip", "jpeg_roundtrip_each", "quantisation_tables"]

# ITU T.81 Annex K, tables K.1 (luminance) and K.2 (chrominance)
_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
         14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_CHROMA = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
           47, 66, 99, 99, 99, 99, 99, 99) + (99,) * 32


def quantisation_tables(quality: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (luminance, chrominance) ``[8, 8]`` tables libjpeg uses at ``quality`` (1..100), baseline."""
    luma, chroma = _tables(_quality(quality))
    return luma.clone(), chroma.clone()  # the cached ones stay as they are


def over_255(x: torch.Tensor) -> torch.Tensor:
    """``x / 255`` correctly rounded on any device: CUDA divides by a Python scalar as a multiplication by
    its reciprocal (one unit in the last place off for about half of the 8-bit values), a 0-dim tensor on
    ``x``'s device it divides. So the CPU and a GPU give the same values here."""
    return x / torch.full((), 255.0, dtype=x.dtype, device=x.device)


def _quality(quality) -> int:
    try:
        q = operator.index(quality)
    except TypeError:
        q = None
    if q is None or isinstance(quality, bool) or not 1 <= q <= 100:
        raise ValueError(f"JPEG quality must be an int in [1, 100], got {quality!r}")
    return q


@functools.lru_cache(maxsize=None)
def _tables(quality: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    tables = []
    for base in (_LUMA, _CHROMA):
        t = torch.tensor(base, dtype=torch.int64).view(8, 8)
        tables.append(((t * scale + 50) // 100).clamp_(1, 255).to(torch.float64))
    return tables[0], tables[1]  # float64, on the CPU


@functools.lru_cache(maxsize=None)
def _dct_matrix() -> torch.Tensor:
    """The orthonormal 8-point DCT-II as ``[u, x]`` (JPEG's FDCT is its 2D form), float64 on the CPU."""
    u = torch.arange(8, dtype=torch.float64)[:, None]
    x = torch.arange(8, dtype=torch.float64)[None, :]
    m = torch.cos((2 * x + 1) * u * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` (multiples of 8) -> ``[N, H/8, W/8, 8, 8]``."""
    n, h, w = x.shape
    return x.view(n, h // 8, 8, w // 8, 8).transpose(2, 3)


def _unblocks(b: torch.Tensor) -> torch.Tensor:
    n, hb, wb = b.shape[:3]
    return b.transpose(2, 3).reshape(n, hb * 8, wb * 8)


def _lossy(planes: list, tables: list, dct: torch.Tensor) -> list:
    """Integer samples ``[N, H_k, W_k]`` of each plane -> their decoded samples, plane ``k`` quantised with
    ``tables[k] [N, 8, 8]``; the planes' blocks go through the DCTs together."""
    # float64 products: a TF32 matmul (set_float32_matmul_precision("high"), a global setting) would
    # move coefficients across quantisation steps; the 8x8 products are a small part of the work
    blocks = [_blocks(p - 128.0) for p in planes]
    counts = [b.shape[:3].numel() for b in blocks]
    coef = dct @ torch.cat([b.reshape(-1, 8, 8) for b in blocks]).double() @ dct.T
    # each block's table: the frame's table of its plane
    t = torch.cat([table[:, None, None].expand(b.shape).reshape(-1, 8, 8) for table, b in zip(tables, blocks)])
    q = torch.sign(coef) * torch.floor(coef.abs() / t + 0.5)  # libjpeg rounds half away from zero
    out = (dct.T @ (q * t) @ dct).float()
    return [(_unblocks(o.view(b.shape)) + 128.0).round_().clamp_(0.0, 255.0) for o, b in zip(out.split(counts), blocks)]


def _fancy_upsample(c: torch.Tensor) -> torch.Tensor:
    """``[N, h, w]`` integer samples -> ``[N, 2h, 2w]`` as libjpeg's h2v2_fancy_upsample: per axis 3/4 of
    the nearer sample and 1/4 of the farther (edges repeated), in integers: the column sums 3 * near +
    far, then (3 * this + neighbour + 8) >> 4 for even output columns, + 7 for odd ones."""
    def shifted(x: torch.Tensor, dim: int, step: int) -> torch.Tensor:
        n = x.shape[dim]
        if step < 0:  # the previous sample, the first repeated
            return torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
        return torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)

    rows = torch.stack([3 * c + shifted(c, 1, -1), 3 * c + shifted(c, 1, 1)], 2).flatten(1, 2)
    even = torch.floor((3 * rows + shifted(rows, 2, -1) + 8) / 16)
    odd = torch.floor((3 * rows + shifted(rows, 2, 1) + 7) / 16)
    return torch.stack([even, odd], -1).flatten(-2)


def jpeg_roundtrip(frames: torch.Tensor, qualities) -> torch.Tensor:
    """``[N, 3, H, W]`` float in [0, 1] -> the same frames after a baseline JPEG encode and decode, frame
    ``i`` at ``qualities[i]`` (an int in 1..100, or None to keep it), on 8-bit steps; on the frames'
    device, float32 inside (the DCT's products in float64)."""
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [N, 3, H, W], got {tuple(getattr(frames, 'shape', ()))}")
    qualities = list(qualities)
    if len(qualities) != frames.shape[0]:
        raise ValueError(f"one quality per frame: {len(qualities)} for {frames.shape[0]} frames")
    keep = [i for i, q in enumerate(qualities) if q is not None]
    if not keep:
        return frames
    n, _, h, w = frames.shape
    device = frames.device
    if len(keep) < n:  # a device index, sent without waiting (a list index is a blocking copy)
        index = torch.tensor(keep).to(device, non_blocking=True)
    x = frames if len(keep) == n else frames.index_select(0, index)
    ph, pw = -h % 16, -w % 16
    if ph or pw:  # libjpeg fills its last MCUs by repeating the last row and column
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    out = _codec(x, [qualities[i] for i in keep], None)[..., :h, :w].to(frames.dtype)
    if len(keep) == n:
        return out
    return frames.index_copy(0, index, out)


def jpeg_roundtrip_each(frames, qualities) -> list:
    """Frames of different sizes, ``[3, H_i, W_i]`` float in [0, 1] each (on one device), through
    :func:`jpeg_roundtrip` in one batch: frame ``i`` comes back as ``jpeg_roundtrip(frames[i][None],
    [qualities[i]])[0]`` (None keeps it), with ~100 torch operations for the batch instead of that per
    frame. Each frame is padded as libjpeg pads it, to its own 16-pixel multiples, then to the batch's
    largest frame; its blocks and its chroma's edges are its own, so the padding changes nothing."""
    frames, qualities = list(frames), list(qualities)
    for i, f in enumerate(frames):
        if not isinstance(f, torch.Tensor) or f.dim() != 3 or f.shape[0] != 3:
            raise ValueError(f"frame {i} must be [3, H, W], got {tuple(getattr(f, 'shape', ()))}")
    out = jpeg_roundtrip_rows([f[None] for f in frames], qualities)
    return [f if q is None else o[0] for f, q, o in zip(frames, qualities, out)]  # a kept frame is itself


def jpeg_roundtrip_rows(frames, qualities) -> list:
    """:func:`jpeg_roundtrip_each` of frames ``[1, 3, H_i, W_i]`` (a batch of one each, as
    :mod:`oasis.degrade` holds frames of several sizes), given back so: no operation per frame to take a
    frame out of its batch and put it back."""
    frames, qualities = list(frames), list(qualities)
    if len(qualities) != len(frames):
        raise ValueError(f"one quality per frame: {len(qualities)} for {len(frames)} frames")
    for i, f in enumerate(frames):
        if not isinstance(f, torch.Tensor) or f.dim() != 4 or tuple(f.shape[:2]) != (1, 3):
            raise ValueError(f"frame {i} must be [1, 3, H, W], got {tuple(getattr(f, 'shape', ()))}")
        if f.device != frames[0].device:
            raise ValueError(f"frame {i} is on {f.device}, frame 0 on {frames[0].device}")
    keep = [i for i, q in enumerate(qualities) if q is not None]
    if not keep:
        return frames
    sizes = [(-(-frames[i].shape[2] // 16) * 16, -(-frames[i].shape[3] // 16) * 16) for i in keep]
    hp, wp = max(s[0] for s in sizes), max(s[1] for s in sizes)
    x = torch.cat([F.pad(frames[i].float(), (0, wp - frames[i].shape[3], 0, hp - frames[i].shape[2]),
                         mode="replicate") for i in keep])
    rgb = _codec(x, [qualities[i] for i in keep], sizes)
    out = list(frames)
    for j, i in enumerate(keep):
        out[i] = rgb[j:j + 1, :, :frames[i].shape[2], :frames[i].shape[3]].to(frames[i].dtype)
    return out


def _codec(x: torch.Tensor, qualities: list, sizes) -> torch.Tensor:
    """Frames ``[N, 3, H, W]`` in [0, 1] (H, W multiples of 16, edges already padded) through encode and
    decode at ``qualities`` (ints), as floats in [0, 1]. ``sizes``: each frame's own padded ``(h, w)``
    where the batch holds frames of several sizes (their chroma edges), else None."""
    device = x.device
    x = (x.float().clamp(0, 1) * 255.0).round()
    r, g, b = x.unbind(1)
    y = (0.299 * r + 0.587 * g + 0.114 * b).round_()
    cb = (-0.168735892 * r - 0.331264108 * g + 0.5 * b + 128.0).round_().clamp_(0.0, 255.0)
    cr = (0.5 * r - 0.418687589 * g - 0.081312411 * b + 128.0).round_().clamp_(0.0, 255.0)
    # libjpeg's h2v2_downsample: (sum of the 2x2 block + bias) >> 2, the bias 1, 2, 1, 2, ... along the row
    bias = torch.tensor([1.0, 2.0]).to(device, non_blocking=True).repeat(cb.shape[-1] // 4)  # W/2 columns
    cb, cr = (torch.floor((F.avg_pool2d(c[:, None], 2)[:, 0] * 4.0 + bias) / 4.0) for c in (cb, cr))
    # int(q) as the PIL path takes it (the draws may be floats or numpy ints)
    tables = [_tables(_quality(int(q))) for q in qualities]  # (torch.stack copies the cached tables)
    luma = torch.stack([t[0] for t in tables]).to(device, non_blocking=True)
    chroma = torch.stack([t[1] for t in tables]).to(device, non_blocking=True)
    dct = _dct_matrix().to(device, non_blocking=True)
    y, cb, cr = _lossy([y, cb, cr], [luma, chroma, chroma], dct)
    # both chroma planes up-sampled in one pass
    cb, cr = (_fancy_upsample(_own_edges(torch.cat([cb, cr]), sizes * 2 if sizes else None)) - 128.0).chunk(2)
    if sizes is not None:
        h, w = y.shape[-2:]
        cb, cr = cb[..., :h, :w], cr[..., :h, :w]
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136286 * cb - 0.714136286 * cr, y + 1.772 * cb], 1)
    return over_255(rgb.round_().clamp_(0.0, 255.0))


def _own_edges(c: torch.Tensor, sizes) -> torch.Tensor:
    """Chroma ``[N, h, w]`` of frames of several ``sizes``: one more row and column, and each frame's
    first row and column past its own edge set to its last ones, so that the up-sampling's neighbours
    beyond a frame's edge repeat it as at the batch's edge."""
    if sizes is None:
        return c
    device = c.device
    c = F.pad(c, (0, 1, 0, 1))
    frame = torch.arange(c.shape[0]).to(device, non_blocking=True)
    rows = torch.tensor([s[0] // 2 for s in sizes]).to(device, non_blocking=True)
    cols = torch.tensor([s[1] // 2 for s in sizes]).to(device, non_blocking=True)
    c[frame, rows] = c[frame, rows - 1]
    c[frame, :, cols] = c[frame, :, cols - 1]
    return c
