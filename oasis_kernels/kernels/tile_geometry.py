"""Tile geometry of the local-attention kernels: where a tile's queries are, which keys it walks,
and which of them each query sees. Triton device functions, shared by the attention kernels
(:mod:`.local_attention`) and the routing-statistics kernels (:mod:`.routing_stats`).

Both local patterns are boxes on the ``(T, H, W)`` grid (see :mod:`oasis_kernels.masks`). Program
axis 1 of a launch runs over ``(batch, local head)`` and reads the head's index from a small int32
table (window heads first, so the position gives the mode), axis 0 over the head's *primary tiles*:

* window heads tile the grid in 3D boxes of ``BT x BH x BW`` tokens. The keys a tile needs are
  its box grown by the window radii ``(RT, RH, RW)``: the *halo*, of the compile-time shape
  ``(BT + 2RT, BH + 2RH, BW + 2RW)``, walked in blocks of ``BLOCK_N`` in t-major order, so every
  key of it is loaded once per tile. Halo positions outside the grid are masked as missing keys,
  which is exactly the clipping of eqs. 6-7. Since the halo shape is a compile-time constant,
  a halo position ``j`` and a tile position ``i`` see each other iff ``0 <= j_x - i_x <= 2 R_x``
  on each axis, whatever the tile; :func:`box_visible` tests that with packed integer codes (two
  subtractions, one three-way AND and one compare per score) instead of unpacking coordinates.
* intra-frame heads tile each frame in runs of ``BT*BH*BW`` consecutive tokens; their keys are
  the whole frame, a contiguous token range, so only the frame end needs a mask.

Visibility is symmetric (``|t - t'| <= rt`` either way), so the queries that see a key tile are
its halo too, and the backward's dK/dV walk uses the same code. Window radii are compile-time
constants (one compile per window shape; the launchers clip them to the grid first), grid
sizes are not.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["MAX_RADIUS", "NO_SPECIALIZE", "LOG2E", "block_d", "box_coords", "box_code", "head_setup", "tile_count",
           "primary_tile", "frame_block", "halo_block", "box_visible", "window_setup", "window_block", "mm",
           "load_rows", "load_block", "frame_walk", "full_block", "store_rows", "masked_scores"]

#: largest window radius per axis: the visibility codes keep each axis in a 10-bit field
MAX_RADIUS = 120
#: grid sizes and head counts vary per layer and video; specializing on them (==1, %16) would
#: recompile for every shape without making the code faster
NO_SPECIALIZE = ["T", "H", "W", "n_local", "n_window", "D"]
LOG2E = 1.4426950408889634

# visibility codes: one 10-bit field per axis (t at bit 20, h at bit 10, w at bit 0); BIAS puts
# 512 in each field so differences of local coordinates stay non-negative, TOP is each field's
# bit 9, set iff the field's difference is >= 0 after removing the bias
_CODE_BIAS = tl.constexpr((512 << 20) | (512 << 10) | 512)
_CODE_TOP = tl.constexpr((1 << 29) | (1 << 19) | (1 << 9))


def block_d(d: int) -> dict:
    """The head dim ``D`` and the power-of-two row width the kernels load it in."""
    width = max(16, triton.next_power_of_2(d))
    return dict(D=d, BLOCK_D=width, EVEN_D=width == d)


@triton.jit
def box_coords(i, B1: tl.constexpr, B2: tl.constexpr):
    """Local coordinates of position ``i`` of a t-major box whose last two sides are B1, B2."""
    return i // (B1 * B2), (i // B2) % B1, i % B2


@triton.jit
def box_code(a, b, c):
    return (a << 20) + (b << 10) + c


@triton.jit
def head_setup(HEADS, pid_bh, n_local, n_window):
    # the table lists window heads first, so a head's mode follows from its position; only the
    # head index is loaded (loop bounds then stay plain scalars, also in the interpreter)
    b = (pid_bh // n_local).to(tl.int64)
    j = pid_bh % n_local
    head = tl.load(HEADS + j)
    return b, j, head, j < n_window


@triton.jit
def tile_count(is_window, T, H, W, BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    n_window = tl.cdiv(T, BT) * tl.cdiv(H, BH) * tl.cdiv(W, BW)
    n_intra = T * tl.cdiv(H * W, BT * BH * BW)
    return tl.where(is_window, n_window, n_intra)


@triton.jit
def primary_tile(p, is_window, T, H, W, RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
                  BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Tokens of primary tile ``p`` and their validity; for window heads also the tile origin
    and the tile side of the visibility codes (``lo``, ``hi``), for intra heads the frame start.

    ``lo_i = code(i)`` and ``hi_i = code(i + 2R) + BIAS``: with ``x_j = code(j) + BIAS`` of a halo
    position, ``x_j - lo_i`` has each field's top bit set iff ``j - i >= 0`` on that axis, and
    ``hi_i - code(j)`` iff ``j - i <= 2R``.
    """
    BLOCK: tl.constexpr = BT * BH * BW
    i = tl.arange(0, BLOCK)
    HW = H * W
    # window: a BT x BH x BW box
    nbh = tl.cdiv(H, BH)
    nbw = tl.cdiv(W, BW)
    t0 = (p // (nbh * nbw)) * BT
    h0 = ((p // nbw) % nbh) * BH
    w0 = (p % nbw) * BW
    ia, ib, ic = box_coords(i, BH, BW)
    w_valid = (t0 + ia < T) & (h0 + ib < H) & (w0 + ic < W)
    w_tok = ((t0 + ia) * H + h0 + ib) * W + w0 + ic
    # intra-frame: BLOCK consecutive tokens of one frame
    tpf = tl.cdiv(HW, BLOCK)
    f_base = (p // tpf) * HW
    f = (p % tpf) * BLOCK + i
    valid = tl.where(is_window, w_valid, f < HW)
    tok = tl.where(valid, tl.where(is_window, w_tok, f_base + f), 0)
    lo = box_code(ia, ib, ic)
    hi = box_code(ia + 2 * RT, ib + 2 * RH, ic + 2 * RW) + _CODE_BIAS
    return tok, valid, t0, h0, w0, lo, hi, f_base


@triton.jit
def frame_block(start, f_base, HW, BLOCK_N: tl.constexpr):
    """Tokens ``start .. start+BLOCK_N`` of the frame starting at token ``f_base``."""
    j = start + tl.arange(0, BLOCK_N)
    valid = j < HW
    return tl.where(valid, f_base + j, 0), valid


@triton.jit
def halo_block(start, t0, h0, w0, T, H, W, RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
                BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Halo positions ``start .. start+BLOCK_N`` of a window tile with origin ``(t0, h0, w0)``:
    token index, whether the token exists (inside the halo and the grid), and its code."""
    HB: tl.constexpr = BH + 2 * RH
    HC: tl.constexpr = BW + 2 * RW
    L: tl.constexpr = (BT + 2 * RT) * HB * HC
    j = start + tl.arange(0, BLOCK_N)
    ja, jb, jc = box_coords(j, HB, HC)
    t = t0 - RT + ja
    h = h0 - RH + jb
    w = w0 - RW + jc
    valid = (j < L) & (t >= 0) & (t < T) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    tok = (t * H + h) * W + w
    return tl.where(valid, tok, 0), valid, box_code(ja, jb, jc)


@triton.jit
def box_visible(lo, hi, code, valid):
    """[M, N] visibility between tile positions (rows: their ``lo``/``hi`` codes) and halo
    positions (columns: ``code`` and whether the token exists)."""
    keep = tl.where(valid, _CODE_TOP, 0)
    y = ((code + _CODE_BIAS)[None, :] - lo[:, None]) & (hi[:, None] - code[None, :]) & keep[None, :]
    return y == _CODE_TOP


# ---------------------------------------------------------------------------------------
# the walks of a tile over the tokens it attends to (keys; for dK/dV, the queries)
# ---------------------------------------------------------------------------------------
#
# Each program branches once on its head's mode (a scalar, uniform over the program) into one
# of two loops, each pipelined on its own; the loops live in different branches, so their
# shared-memory buffers can overlap. A launch of intra heads only (INTRA_ONLY) compiles just
# the frame loop.
#
# * intra-frame tiles (``frame_walk``): the frame's full blocks with no mask at all, then at
#   most one partial block with the frame end masked;
# * window tiles (``window_setup``, ``window_block``), chosen at compile time by ``SLICED``:
#   - general: the halo in blocks of BLOCK_N tokens, visibility from packed codes
#     (``box_visible``) per score;
#   - sliced (tiles whose halo slice ``(BH + 2RH) x (BW + 2RW)`` fits one block, e.g. a (4,4,4)
#     tile of a (3,5,5) window: 8 x 8 = 64): one block per frame of the halo. The h/w part of
#     the mask, the token offsets and the validity of every column are then the same for all
#     blocks of the tile and are computed once before the loop; per block only the frame
#     changes, which is one scalar and a per-row test. Frames outside the grid are not walked.

@triton.jit
def window_setup(t0, h0, w0, lo, hi, T, H, W, RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
                  BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr,
                  SLICED: tl.constexpr):
    """The halo walk of the window tile with origin ``(t0, h0, w0)`` and codes ``lo``, ``hi``
    (``primary_tile``): its loop range and the loop invariants ``a .. e`` that
    ``window_block`` takes (their meaning depends on ``SLICED``). Called inside the window
    branch, so nothing of it is live in the frame walk."""
    if SLICED:
        HB: tl.constexpr = BH + 2 * RH
        HC: tl.constexpr = BW + 2 * RW
        BLOCK: tl.constexpr = BT * BH * BW
        i = tl.arange(0, BLOCK)
        ia, ib, ic = box_coords(i, BH, BW)
        jj = tl.arange(0, BLOCK_N)
        jb = jj // HC
        jc = jj % HC
        h = h0 - RH + jb
        w = w0 - RW + jc
        col_valid = (jj < HB * HC) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        db = jb[None, :] - ib[:, None]
        dc = jc[None, :] - ic[:, None]
        a = (db >= 0) & (db <= 2 * RH) & (dc >= 0) & (dc <= 2 * RW) & col_valid[None, :]
        b = tl.where(col_valid, h * W + w, 0)
        c = col_valid
        d = ia
        e = t0 - RT
        it_lo = tl.maximum(RT - t0, 0)
        it_hi = tl.minimum(BT + 2 * RT, T - t0 + RT)
    else:
        L: tl.constexpr = (BT + 2 * RT) * (BH + 2 * RH) * (BW + 2 * RW)
        a = lo
        b = hi
        c = t0
        d = h0
        e = w0
        it_lo = 0
        it_hi = tl.cdiv(L, BLOCK_N)
    return it_lo, it_hi, a, b, c, d, e


@triton.jit
def window_block(it, a, b, c, d, e, T, H, W, RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
                  BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, SLICED: tl.constexpr):
    """Block ``it`` of a window tile's halo walk: its tokens (columns), their validity and the
    [M, N] mask."""
    if SLICED:
        valid = c
        tok = tl.where(valid, (e + it) * (H * W) + b, 0)
        dt = it - d
        row_ok = (dt >= 0) & (dt <= 2 * RT)
        mask = a & row_ok[:, None]
    else:
        tok, valid, code = halo_block(it * BLOCK_N, c, d, e, T, H, W, RT, RH, RW, BT, BH, BW, BLOCK_N)
        mask = box_visible(a, b, code, valid)
    return tok, valid, mask


@triton.jit
def narrow(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """float32 ``x`` to ``dtype``, rounding to nearest even as the GPU does. ``UPCAST`` (the
    interpreter with bfloat16, see ``mm``): Triton 3.6's interpreter truncates float32 to bfloat16,
    which doubles the rounding error of every narrowed value (P and dS before their MMAs, the
    stored outputs) and made CPU tests judge worse math than the GPU runs; rounding the float32
    bits first makes its truncation exact."""
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def mm(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in float32. ``UPCAST`` is set only under the interpreter, whose
    bfloat16 dot is broken in Triton 3.6 (it multiplies the raw bits); bf16 products are exact
    in float32, so upcasting first keeps the same math."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def load_rows(base, tok, stride, valid, d, dmask, EVEN_D: tl.constexpr):
    """Rows ``tok`` of a ``[tokens, D]`` view (stride ``stride`` between tokens); zero where invalid."""
    ptrs = base + tok[:, None] * stride + d[None, :]
    if EVEN_D:
        return tl.load(ptrs, mask=valid[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=valid[:, None] & dmask[None, :], other=0.0)


@triton.jit
def load_block(base, tok, stride, valid, d, dmask, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """``load_rows``, or with ``MASKED`` false a load of rows all known to exist (no row mask)."""
    if MASKED:
        return load_rows(base, tok, stride, valid, d, dmask, EVEN_D)
    ptrs = base + tok[:, None] * stride + d[None, :]
    if EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=dmask[None, :], other=0.0)


@triton.jit
def frame_walk(H, W, BLOCK_N: tl.constexpr):
    """The walk of an intra-frame tile: the frame's full blocks, which need no mask at all, then
    at most one partial block (``frame_block``) with the frame end masked. Returns the number
    of full blocks and the partial block's start (``H*W`` if none)."""
    n_full = (H * W) // BLOCK_N
    return n_full, n_full * BLOCK_N


@triton.jit
def full_block(f_base, it, BLOCK_N: tl.constexpr):
    """Tokens of full block ``it`` of the frame starting at token ``f_base``."""
    return f_base + it * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def store_rows(base, tok, stride, valid, d, dmask, x, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """Store float32 rows ``x`` at rows ``tok`` of a ``[tokens, D]`` view, narrowed to its dtype."""
    ptrs = base + tok[:, None] * stride + d[None, :]
    y = narrow(x, base.dtype.element_ty, UPCAST)
    if EVEN_D:
        tl.store(ptrs, y, mask=valid[:, None])
    else:
        tl.store(ptrs, y, mask=valid[:, None] & dmask[None, :])



@triton.jit
def masked_scores(qk, mask, qk_scale, POS_SCALE: tl.constexpr):
    """``(s, c)``: masked scores and the factor still to apply, ``s * c`` being the scaled score
    (base 2: the scale carries log2(e)), -inf where masked. With a positive scale the factor is
    fused into the softmax's FMA; otherwise (0 or negative, where ``-inf * c`` would be NaN or
    +inf) the scores are scaled before masking."""
    if POS_SCALE:
        return tl.where(mask, qk, float("-inf")), qk_scale
    else:
        return tl.where(mask, qk * qk_scale, float("-inf")), 1.0

