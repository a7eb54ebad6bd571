"""Triton kernels for the local heads: intra-frame and clipped 3D window, per-head routed.

Geometry
--------
Both patterns are boxes on the ``(T, H, W)`` grid (see :mod:`oasis_kernels.masks`). One launch
serves every local head of a layer: program axis 1 runs over ``(batch, local head)`` and reads
the head's index from a small int32 table (window heads first, so the position gives the mode),
axis 0 over the head's *primary tiles*. Each mode has its own key walk, chosen per program:

* window heads tile the grid in 3D boxes of ``BT x BH x BW`` tokens. The keys a tile needs are
  its box grown by the window radii ``(RT, RH, RW)``: the *halo*, of the compile-time shape
  ``(BT + 2RT, BH + 2RH, BW + 2RW)``, walked in blocks of ``BLOCK_N`` in t-major order, so every
  key of it is loaded once per tile. Halo positions outside the grid are masked as missing keys,
  which is exactly the clipping of eqs. 6-7. Since the halo shape is a compile-time constant,
  a halo position ``j`` and a tile position ``i`` see each other iff ``0 <= j_x - i_x <= 2 R_x``
  on each axis, whatever the tile; the kernels test that with packed integer codes (two
  subtractions, one three-way AND and one compare per score, see ``_box_visible``) instead of
  unpacking coordinates per score.
* intra-frame heads tile each frame in runs of ``BT*BH*BW`` consecutive tokens; their keys are
  the whole frame, a contiguous token range, so only the frame end needs a mask.

Window radii are compile-time constants (one compile per window shape; the launcher clips
them to the grid first), grid sizes are not.

Kernels
-------
* ``_fwd_kernel``: online softmax (FlashAttention-2), writes ``out`` in place into the routed
  output and the natural-log LSE.
* ``_bwd_delta_kernel``: ``delta = rowsum(dO * O)`` per query row, a small kernel of its own.
* ``_bwd_kernel``: one launch whose programs are dQ's query tiles and dK/dV's key tiles side by
  side, so dK/dV does not wait for dQ's last wave. A dK/dV tile walks the queries that see it.
  Visibility is symmetric (``|t - t'| <= rt`` either way), so the queries that see a key tile
  are its halo, and the same geometry code serves. Shared memory is the larger of the two tiles'
  (the branches reuse it), registers and spills dK/dV's. No atomics: the backward is
  deterministic. (A one-pass backward adding dQ atomically, as FlashAttention-2 does, measured
  slower on the H200 at every shape tried: docs/PERF.md, entry 12.) The default since
  docs/PERF.md entry 16: ~12 us (5-20) faster fwd+bwd at S on an H100, A and B unchanged.
* ``_bwd_dq_kernel`` then ``_bwd_dkdv_kernel`` (``OASIS_CONCURRENT_BWD=0``): the same tile code
  as two launches, dQ first (it writes ``delta``), then dK/dV, which reads it.

Each program branches once on its head's mode into that mode's loop: intra-frame tiles walk
their frame in full blocks with no mask and mask only the frame's last, partial block; window
tiles walk their halo. Nothing selects between modes per score. A launch of intra heads only
(``INTRA_ONLY``, a compile-time flag) compiles the frame loop alone.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime import driver

__all__ = ["local_attention_forward", "local_attention_backward", "local_attention_backward_dq",
           "local_attention_backward_dkdv", "local_attention_backward_delta", "local_attention_backward_concurrent",
           "chosen_configs", "INTERPRET", "MAX_RADIUS"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: OASIS_TRITON_AUTOTUNE=0 uses the first config of each list (fast start for tests and sweeps)
AUTOTUNE = os.environ.get("OASIS_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET
#: OASIS_TRITON_DIRECT_LAUNCH=0 sends every launch through Triton's launch path (see ``_Tuned``)
DIRECT_LAUNCH = os.environ.get("OASIS_TRITON_DIRECT_LAUNCH", "1") != "0" and not INTERPRET
#: the backward as a delta kernel and one launch of dQ and dK/dV programs side by side (default),
#: or with OASIS_CONCURRENT_BWD=0 dQ (which writes delta) and then dK/dV (docs/PERF.md, entries 15-16)
CONCURRENT_BWD = os.environ.get("OASIS_CONCURRENT_BWD", "1") != "0"
#: largest window radius per axis: the visibility codes keep each axis in a 10-bit field
MAX_RADIUS = 120

# grid sizes and head counts vary per layer and video; specializing on them (==1, %16) would
# recompile for every shape without making the code faster
_NO_SPECIALIZE = ["T", "H", "W", "n_local", "n_window", "D"]

# visibility codes: one 10-bit field per axis (t at bit 20, h at bit 10, w at bit 0); BIAS puts
# 512 in each field so differences of local coordinates stay non-negative, TOP is each field's
# bit 9, set iff the field's difference is >= 0 after removing the bias
_CODE_BIAS = tl.constexpr((512 << 20) | (512 << 10) | 512)
_CODE_TOP = tl.constexpr((1 << 29) | (1 << 19) | (1 << 9))


# ---------------------------------------------------------------------------------------
# geometry helpers
# ---------------------------------------------------------------------------------------

@triton.jit
def _box_coords(i, B1: tl.constexpr, B2: tl.constexpr):
    """Local coordinates of position ``i`` of a t-major box whose last two sides are B1, B2."""
    return i // (B1 * B2), (i // B2) % B1, i % B2


@triton.jit
def _box_code(a, b, c):
    return (a << 20) + (b << 10) + c


@triton.jit
def _head_setup(HEADS, pid_bh, n_local, n_window):
    # the table lists window heads first, so a head's mode follows from its position; only the
    # head index is loaded (loop bounds then stay plain scalars, also in the interpreter)
    b = (pid_bh // n_local).to(tl.int64)
    j = pid_bh % n_local
    head = tl.load(HEADS + j)
    return b, j, head, j < n_window


@triton.jit
def _tile_count(is_window, T, H, W, BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    n_window = tl.cdiv(T, BT) * tl.cdiv(H, BH) * tl.cdiv(W, BW)
    n_intra = T * tl.cdiv(H * W, BT * BH * BW)
    return tl.where(is_window, n_window, n_intra)


@triton.jit
def _primary_tile(p, is_window, T, H, W, RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
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
    ia, ib, ic = _box_coords(i, BH, BW)
    w_valid = (t0 + ia < T) & (h0 + ib < H) & (w0 + ic < W)
    w_tok = ((t0 + ia) * H + h0 + ib) * W + w0 + ic
    # intra-frame: BLOCK consecutive tokens of one frame
    tpf = tl.cdiv(HW, BLOCK)
    f_base = (p // tpf) * HW
    f = (p % tpf) * BLOCK + i
    valid = tl.where(is_window, w_valid, f < HW)
    tok = tl.where(valid, tl.where(is_window, w_tok, f_base + f), 0)
    lo = _box_code(ia, ib, ic)
    hi = _box_code(ia + 2 * RT, ib + 2 * RH, ic + 2 * RW) + _CODE_BIAS
    return tok, valid, t0, h0, w0, lo, hi, f_base


@triton.jit
def _frame_block(start, f_base, HW, BLOCK_N: tl.constexpr):
    """Tokens ``start .. start+BLOCK_N`` of the frame starting at token ``f_base``."""
    j = start + tl.arange(0, BLOCK_N)
    valid = j < HW
    return tl.where(valid, f_base + j, 0), valid


@triton.jit
def _halo_block(start, t0, h0, w0, T, H, W, RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
                BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Halo positions ``start .. start+BLOCK_N`` of a window tile with origin ``(t0, h0, w0)``:
    token index, whether the token exists (inside the halo and the grid), and its code."""
    HB: tl.constexpr = BH + 2 * RH
    HC: tl.constexpr = BW + 2 * RW
    L: tl.constexpr = (BT + 2 * RT) * HB * HC
    j = start + tl.arange(0, BLOCK_N)
    ja, jb, jc = _box_coords(j, HB, HC)
    t = t0 - RT + ja
    h = h0 - RH + jb
    w = w0 - RW + jc
    valid = (j < L) & (t >= 0) & (t < T) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    tok = (t * H + h) * W + w
    return tl.where(valid, tok, 0), valid, _box_code(ja, jb, jc)


@triton.jit
def _box_visible(lo, hi, code, valid):
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
# * intra-frame tiles (``_frame_walk``): the frame's full blocks with no mask at all, then at
#   most one partial block with the frame end masked;
# * window tiles (``_window_setup``, ``_window_block``), chosen at compile time by ``SLICED``:
#   - general: the halo in blocks of BLOCK_N tokens, visibility from packed codes
#     (``_box_visible``) per score;
#   - sliced (tiles whose halo slice ``(BH + 2RH) x (BW + 2RW)`` fits one block, e.g. a (4,4,4)
#     tile of a (3,5,5) window: 8 x 8 = 64): one block per frame of the halo. The h/w part of
#     the mask, the token offsets and the validity of every column are then the same for all
#     blocks of the tile and are computed once before the loop; per block only the frame
#     changes, which is one scalar and a per-row test. Frames outside the grid are not walked.

@triton.jit
def _window_setup(t0, h0, w0, lo, hi, T, H, W, RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
                  BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr,
                  SLICED: tl.constexpr):
    """The halo walk of the window tile with origin ``(t0, h0, w0)`` and codes ``lo``, ``hi``
    (``_primary_tile``): its loop range and the loop invariants ``a .. e`` that
    ``_window_block`` takes (their meaning depends on ``SLICED``). Called inside the window
    branch, so nothing of it is live in the frame walk."""
    if SLICED:
        HB: tl.constexpr = BH + 2 * RH
        HC: tl.constexpr = BW + 2 * RW
        BLOCK: tl.constexpr = BT * BH * BW
        i = tl.arange(0, BLOCK)
        ia, ib, ic = _box_coords(i, BH, BW)
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
def _window_block(it, a, b, c, d, e, T, H, W, RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
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
        tok, valid, code = _halo_block(it * BLOCK_N, c, d, e, T, H, W, RT, RH, RW, BT, BH, BW, BLOCK_N)
        mask = _box_visible(a, b, code, valid)
    return tok, valid, mask


@triton.jit
def _mm(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in float32. ``UPCAST`` is set only under the interpreter, whose
    bfloat16 dot is broken in Triton 3.6 (it multiplies the raw bits); bf16 products are exact
    in float32, so upcasting first keeps the same math."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _load_rows(base, tok, stride, valid, d, dmask, EVEN_D: tl.constexpr):
    """Rows ``tok`` of a ``[tokens, D]`` view (stride ``stride`` between tokens); zero where invalid."""
    ptrs = base + tok[:, None] * stride + d[None, :]
    if EVEN_D:
        return tl.load(ptrs, mask=valid[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=valid[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _load_block(base, tok, stride, valid, d, dmask, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """``_load_rows``, or with ``MASKED`` false a load of rows all known to exist (no row mask)."""
    if MASKED:
        return _load_rows(base, tok, stride, valid, d, dmask, EVEN_D)
    ptrs = base + tok[:, None] * stride + d[None, :]
    if EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=dmask[None, :], other=0.0)


@triton.jit
def _frame_walk(H, W, BLOCK_N: tl.constexpr):
    """The walk of an intra-frame tile: the frame's full blocks, which need no mask at all, then
    at most one partial block (``_frame_block``) with the frame end masked. Returns the number
    of full blocks and the partial block's start (``H*W`` if none)."""
    n_full = (H * W) // BLOCK_N
    return n_full, n_full * BLOCK_N


@triton.jit
def _full_block(f_base, it, BLOCK_N: tl.constexpr):
    """Tokens of full block ``it`` of the frame starting at token ``f_base``."""
    return f_base + it * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _store_rows(base, tok, stride, valid, d, dmask, x, EVEN_D: tl.constexpr):
    ptrs = base + tok[:, None] * stride + d[None, :]
    if EVEN_D:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=valid[:, None])
    else:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=valid[:, None] & dmask[None, :])


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------

@triton.jit
def _masked_scores(qk, mask, qk_scale, POS_SCALE: tl.constexpr):
    """``(s, c)``: masked scores and the factor still to apply, ``s * c`` being the scaled score
    (base 2: the scale carries log2(e)), -inf where masked. With a positive scale the factor is
    fused into the softmax's FMA; otherwise (0 or negative, where ``-inf * c`` would be NaN or
    +inf) the scores are scaled before masking."""
    if POS_SCALE:
        return tl.where(mask, qk, float("-inf")), qk_scale
    else:
        return tl.where(mask, qk * qk_scale, float("-inf")), 1.0


@triton.jit
def _fwd_step(s, c, v, m_i, l_i, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key block of the online softmax on masked scores ``s`` whose scaled value is ``s * c``
    (see ``_masked_scores``)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * c)
    # a row that has seen no visible key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    pr = tl.math.exp2(s * c - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(pr, 1)
    acc = acc * alpha[:, None] + _mm(pr.to(v.dtype), v, DOT_PREC, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _fwd_block(q, k_base, v_base, ktok, kvalid, mask, skn, svn, d, dmask, m_i, l_i, acc, qk_scale,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
               POS_SCALE: tl.constexpr):
    """One key block of the forward; ``MASKED`` false: every key of it is visible to every row."""
    k = _load_block(k_base, ktok, skn, kvalid, d, dmask, MASKED, EVEN_D)
    v = _load_block(v_base, ktok, svn, kvalid, d, dmask, MASKED, EVEN_D)
    qk = _mm(q, tl.trans(k), DOT_PREC, UPCAST)
    if MASKED:
        s, c = _masked_scores(qk, mask, qk_scale, POS_SCALE)
    elif POS_SCALE:
        s, c = qk, qk_scale
    else:
        s, c = qk * qk_scale, 1.0
    return _fwd_step(s, c, v, m_i, l_i, acc, DOT_PREC, UPCAST)


@triton.jit
def _fwd_frame(q, k_base, v_base, f_base, H, W, skn, svn, d, dmask, m_i, l_i, acc, qk_scale, BLOCK_N: tl.constexpr,
               EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, POS_SCALE: tl.constexpr):
    """The forward's walk of an intra-frame tile: the frame's full key blocks unmasked, then its tail."""
    n_full, tail = _frame_walk(H, W, BLOCK_N)
    for it in range(0, n_full):
        ktok = _full_block(f_base, it, BLOCK_N)
        m_i, l_i, acc = _fwd_block(q, k_base, v_base, ktok, ktok, ktok, skn, svn, d, dmask, m_i, l_i, acc, qk_scale,
                                   False, EVEN_D, DOT_PREC, UPCAST, POS_SCALE)
    if tail < H * W:
        ktok, kvalid = _frame_block(tail, f_base, H * W, BLOCK_N)
        m_i, l_i, acc = _fwd_block(q, k_base, v_base, ktok, kvalid, kvalid[None, :], skn, svn, d, dmask, m_i, l_i,
                                   acc, qk_scale, True, EVEN_D, DOT_PREC, UPCAST, POS_SCALE)
    return m_i, l_i, acc


@triton.jit
def _fwd_halo(q, k_base, v_base, t0, h0, w0, lo, hi, T, H, W, skn, svn, d, dmask, m_i, l_i, acc,
              qk_scale, RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
              BW: tl.constexpr, BLOCK_N: tl.constexpr, SLICED: tl.constexpr, EVEN_D: tl.constexpr,
              DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, POS_SCALE: tl.constexpr):
    """The forward's walk of a window tile over its halo (the mode is a compile-time constant
    here, so nothing selects between modes per score)."""
    it_lo, it_hi, wa, wb, wc, wd, we = _window_setup(t0, h0, w0, lo, hi, T, H, W, RT, RH, RW, BT, BH, BW,
                                                     BLOCK_N, SLICED)
    for it in range(it_lo, it_hi):
        ktok, kvalid, mask = _window_block(it, wa, wb, wc, wd, we, T, H, W, RT, RH, RW, BT, BH, BW, BLOCK_N,
                                           SLICED)
        m_i, l_i, acc = _fwd_block(q, k_base, v_base, ktok, kvalid, mask, skn, svn, d, dmask, m_i, l_i, acc, qk_scale,
                                   True, EVEN_D, DOT_PREC, UPCAST, POS_SCALE)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _fwd_kernel(
    Q, K, V, O, LSE, HEADS,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, slb, slh,
    T, H, W, n_local, n_window, D, qk_scale,
    RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, SLICED: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    INTRA_ONLY: tl.constexpr, POS_SCALE: tl.constexpr,
):
    p = tl.program_id(0)
    b, j, head, is_window = _head_setup(HEADS, tl.program_id(1), n_local, n_window)
    if p >= _tile_count(is_window, T, H, W, BT, BH, BW):
        return
    qtok, qvalid, t0, h0, w0, lo, hi, wf = _primary_tile(p, is_window, T, H, W, RT, RH, RW, BT, BH, BW)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = _load_rows(Q + b * sqb + head * sqh, qtok, sqn, qvalid, d, dmask, EVEN_D)
    k_base = K + b * skb + head * skh
    v_base = V + b * svb + head * svh

    BLOCK_M: tl.constexpr = BT * BH * BW
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if INTRA_ONLY:
        m_i, l_i, acc = _fwd_frame(q, k_base, v_base, wf, H, W, skn, svn, d, dmask, m_i, l_i, acc, qk_scale,
                                   BLOCK_N, EVEN_D, DOT_PREC, UPCAST, POS_SCALE)
    elif is_window:
        m_i, l_i, acc = _fwd_halo(q, k_base, v_base, t0, h0, w0, lo, hi, T, H, W, skn, svn, d,
                                  dmask, m_i, l_i, acc, qk_scale, RT, RH, RW, BT, BH, BW, BLOCK_N, SLICED, EVEN_D,
                                  DOT_PREC, UPCAST, POS_SCALE)
    else:
        m_i, l_i, acc = _fwd_frame(q, k_base, v_base, wf, H, W, skn, svn, d, dmask, m_i, l_i, acc, qk_scale,
                                   BLOCK_N, EVEN_D, DOT_PREC, UPCAST, POS_SCALE)

    # every valid query sees at least itself, so l_i > 0 there; padding rows are not stored
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    _store_rows(O + b * sob + head * soh, qtok, son, qvalid, d, dmask, acc / l_safe[:, None], EVEN_D)
    # natural-log LSE: m and l are in base 2 (qk_scale carries log2(e))
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + b * slb + head * slh + qtok, lse, mask=qvalid)


# ---------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------

@triton.jit
def _dq_step(pr, do, k, v, delta, dq, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``dq += dS @ K`` for one key block, given the masked probabilities ``pr``."""
    dp = _mm(do, tl.trans(v), DOT_PREC, UPCAST)
    ds = pr * (dp - delta[:, None])
    return dq + _mm(ds.to(k.dtype), k, DOT_PREC, UPCAST)


@triton.jit
def _dq_block(q, do, lse2, delta, k_base, v_base, ktok, kvalid, mask, skn, svn, d, dmask, dq, qk_scale,
              MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key block of dQ; ``MASKED`` false: every key of it is visible to every row."""
    k = _load_block(k_base, ktok, skn, kvalid, d, dmask, MASKED, EVEN_D)
    v = _load_block(v_base, ktok, svn, kvalid, d, dmask, MASKED, EVEN_D)
    pr = tl.math.exp2(_mm(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale - lse2[:, None])
    if MASKED:
        pr = tl.where(mask, pr, 0.0)
    return _dq_step(pr, do, k, v, delta, dq, DOT_PREC, UPCAST)


@triton.jit
def _dq_frame(q, do, lse2, delta, k_base, v_base, f_base, H, W, skn, svn, d, dmask, dq, qk_scale,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dQ's walk of an intra-frame tile (see ``_fwd_frame``)."""
    n_full, tail = _frame_walk(H, W, BLOCK_N)
    for it in range(0, n_full):
        ktok = _full_block(f_base, it, BLOCK_N)
        dq = _dq_block(q, do, lse2, delta, k_base, v_base, ktok, ktok, ktok, skn, svn, d, dmask, dq, qk_scale,
                       False, EVEN_D, DOT_PREC, UPCAST)
    if tail < H * W:
        ktok, kvalid = _frame_block(tail, f_base, H * W, BLOCK_N)
        dq = _dq_block(q, do, lse2, delta, k_base, v_base, ktok, kvalid, kvalid[None, :], skn, svn, d, dmask, dq,
                       qk_scale, True, EVEN_D, DOT_PREC, UPCAST)
    return dq


@triton.jit
def _dq_halo(q, do, lse2, delta, k_base, v_base, t0, h0, w0, lo, hi, T, H, W, skn, svn, d, dmask,
             dq, qk_scale, RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
             BW: tl.constexpr, BLOCK_N: tl.constexpr, SLICED: tl.constexpr, EVEN_D: tl.constexpr,
             DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dQ's walk of a window tile (see ``_fwd_halo``)."""
    it_lo, it_hi, wa, wb, wc, wd, we = _window_setup(t0, h0, w0, lo, hi, T, H, W, RT, RH, RW, BT, BH, BW,
                                                     BLOCK_N, SLICED)
    for it in range(it_lo, it_hi):
        ktok, kvalid, mask = _window_block(it, wa, wb, wc, wd, we, T, H, W, RT, RH, RW, BT, BH, BW, BLOCK_N,
                                           SLICED)
        dq = _dq_block(q, do, lse2, delta, k_base, v_base, ktok, kvalid, mask, skn, svn, d, dmask, dq, qk_scale,
                       True, EVEN_D, DOT_PREC, UPCAST)
    return dq


@triton.jit
def _dq_tile(p, b, j, head, is_window, Q, K, V, O, DO, DQ, LSE, DELTA,
             sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh,
             sdob, sdon, sdoh, sdqb, sdqn, sdqh, slb, slh, sdlb, sdlh,
             T, H, W, D, qk_scale, sm_scale,
             RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
             BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, SLICED: tl.constexpr,
             BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
             INTRA_ONLY: tl.constexpr, DELTA_READY: tl.constexpr):
    """dQ of query tile ``p``. ``delta = rowsum(dO * O)``: computed here and stored for dK/dV,
    or (``DELTA_READY``) read from ``DELTA``, written by ``_bwd_delta_kernel``."""
    qtok, qvalid, t0, h0, w0, lo, hi, wf = _primary_tile(p, is_window, T, H, W, RT, RH, RW, BT, BH, BW)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = _load_rows(Q + b * sqb + head * sqh, qtok, sqn, qvalid, d, dmask, EVEN_D)
    do = _load_rows(DO + b * sdob + head * sdoh, qtok, sdon, qvalid, d, dmask, EVEN_D)
    if DELTA_READY:
        delta = tl.load(DELTA + b * sdlb + j * sdlh + qtok, mask=qvalid, other=0.0)
    else:
        o = _load_rows(O + b * sob + head * soh, qtok, son, qvalid, d, dmask, EVEN_D)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + b * sdlb + j * sdlh + qtok, delta, mask=qvalid)
    lse2 = tl.load(LSE + b * slb + head * slh + qtok, mask=qvalid, other=0.0) * 1.4426950408889634
    k_base = K + b * skb + head * skh
    v_base = V + b * svb + head * svh

    BLOCK_M: tl.constexpr = BT * BH * BW
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if INTRA_ONLY:
        dq = _dq_frame(q, do, lse2, delta, k_base, v_base, wf, H, W, skn, svn, d, dmask, dq, qk_scale, BLOCK_N,
                       EVEN_D, DOT_PREC, UPCAST)
    elif is_window:
        dq = _dq_halo(q, do, lse2, delta, k_base, v_base, t0, h0, w0, lo, hi, T, H, W, skn, svn, d,
                      dmask, dq, qk_scale, RT, RH, RW, BT, BH, BW, BLOCK_N, SLICED, EVEN_D, DOT_PREC, UPCAST)
    else:
        dq = _dq_frame(q, do, lse2, delta, k_base, v_base, wf, H, W, skn, svn, d, dmask, dq, qk_scale, BLOCK_N,
                       EVEN_D, DOT_PREC, UPCAST)
    _store_rows(DQ + b * sdqb + head * sdqh, qtok, sdqn, qvalid, d, dmask, dq * sm_scale, EVEN_D)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, HEADS,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh,
    sdob, sdon, sdoh, sdqb, sdqn, sdqh, slb, slh, sdlb, sdlh,
    T, H, W, n_local, n_window, D, qk_scale, sm_scale,
    RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, SLICED: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    INTRA_ONLY: tl.constexpr,
):
    p = tl.program_id(0)
    b, j, head, is_window = _head_setup(HEADS, tl.program_id(1), n_local, n_window)
    if p >= _tile_count(is_window, T, H, W, BT, BH, BW):
        return
    _dq_tile(p, b, j, head, is_window, Q, K, V, O, DO, DQ, LSE, DELTA,
             sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh,
             sdob, sdon, sdoh, sdqb, sdqn, sdqh, slb, slh, sdlb, sdlh,
             T, H, W, D, qk_scale, sm_scale, RT, RH, RW, BT, BH, BW, BLOCK_N, SLICED, BLOCK_D, EVEN_D, DOT_PREC,
             UPCAST, INTRA_ONLY, False)


@triton.jit
def _dkdv_block(k, v, q_base, do_base, lse_base, delta_base, qtok, qvalid, mask, sqn, sdon, d, dmask, dk, dv,
                qk_scale, MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One query block for a key tile, transposed (rows are keys); ``MASKED`` false: every query
    of the block sees every key of the tile."""
    q = _load_block(q_base, qtok, sqn, qvalid, d, dmask, MASKED, EVEN_D)
    do = _load_block(do_base, qtok, sdon, qvalid, d, dmask, MASKED, EVEN_D)
    if MASKED:
        lse2 = tl.load(lse_base + qtok, mask=qvalid, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + qtok, mask=qvalid, other=0.0)
    else:
        lse2 = tl.load(lse_base + qtok) * 1.4426950408889634
        delta = tl.load(delta_base + qtok)
    p_t = tl.math.exp2(_mm(k, tl.trans(q), DOT_PREC, UPCAST) * qk_scale - lse2[None, :])
    if MASKED:
        p_t = tl.where(mask, p_t, 0.0)
    dv += _mm(p_t.to(do.dtype), do, DOT_PREC, UPCAST)
    dp_t = _mm(v, tl.trans(do), DOT_PREC, UPCAST)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _mm(ds_t.to(q.dtype), q, DOT_PREC, UPCAST)
    return dk, dv


@triton.jit
def _dkdv_frame(k, v, q_base, do_base, lse_base, delta_base, f_base, H, W, sqn, sdon, d, dmask, dk, dv, qk_scale,
                BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dK/dV's walk of an intra-frame key tile over the frame's queries (see ``_fwd_frame``)."""
    n_full, tail = _frame_walk(H, W, BLOCK_N)
    for it in range(0, n_full):
        qtok = _full_block(f_base, it, BLOCK_N)
        dk, dv = _dkdv_block(k, v, q_base, do_base, lse_base, delta_base, qtok, qtok, qtok, sqn, sdon, d, dmask, dk,
                             dv, qk_scale, False, EVEN_D, DOT_PREC, UPCAST)
    if tail < H * W:
        qtok, qvalid = _frame_block(tail, f_base, H * W, BLOCK_N)
        dk, dv = _dkdv_block(k, v, q_base, do_base, lse_base, delta_base, qtok, qvalid, qvalid[None, :], sqn, sdon,
                             d, dmask, dk, dv, qk_scale, True, EVEN_D, DOT_PREC, UPCAST)
    return dk, dv


@triton.jit
def _dkdv_halo(k, v, q_base, do_base, lse_base, delta_base, t0, h0, w0, lo, hi, T, H, W, sqn, sdon,
               d, dmask, dk, dv, qk_scale, RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, BT: tl.constexpr,
               BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, SLICED: tl.constexpr, EVEN_D: tl.constexpr,
               DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dK/dV's walk of a window key tile over the queries of its halo (see ``_fwd_halo``)."""
    it_lo, it_hi, wa, wb, wc, wd, we = _window_setup(t0, h0, w0, lo, hi, T, H, W, RT, RH, RW, BT, BH, BW,
                                                     BLOCK_N, SLICED)
    for it in range(it_lo, it_hi):
        qtok, qvalid, mask = _window_block(it, wa, wb, wc, wd, we, T, H, W, RT, RH, RW, BT, BH, BW, BLOCK_N,
                                           SLICED)
        dk, dv = _dkdv_block(k, v, q_base, do_base, lse_base, delta_base, qtok, qvalid, mask, sqn, sdon, d, dmask, dk,
                             dv, qk_scale, True, EVEN_D, DOT_PREC, UPCAST)
    return dk, dv


@triton.jit
def _dkdv_tile(p, b, j, head, is_window, Q, K, V, DO, DK, DV, LSE, DELTA,
               sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh,
               sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, slb, slh, sdlb, sdlh,
               T, H, W, D, qk_scale, sm_scale,
               RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
               BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, SLICED: tl.constexpr,
               BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
               INTRA_ONLY: tl.constexpr):
    """dK and dV of key tile ``p``."""
    # primary tile = keys; the queries that see them are its halo (visibility is symmetric)
    ktok, kvalid, t0, h0, w0, lo, hi, wf = _primary_tile(p, is_window, T, H, W, RT, RH, RW, BT, BH, BW)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    k = _load_rows(K + b * skb + head * skh, ktok, skn, kvalid, d, dmask, EVEN_D)
    v = _load_rows(V + b * svb + head * svh, ktok, svn, kvalid, d, dmask, EVEN_D)
    q_base = Q + b * sqb + head * sqh
    do_base = DO + b * sdob + head * sdoh
    lse_base = LSE + b * slb + head * slh
    delta_base = DELTA + b * sdlb + j * sdlh

    BLOCK_M: tl.constexpr = BT * BH * BW
    dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if INTRA_ONLY:
        dk, dv = _dkdv_frame(k, v, q_base, do_base, lse_base, delta_base, wf, H, W, sqn, sdon, d, dmask, dk, dv,
                             qk_scale, BLOCK_N, EVEN_D, DOT_PREC, UPCAST)
    elif is_window:
        dk, dv = _dkdv_halo(k, v, q_base, do_base, lse_base, delta_base, t0, h0, w0, lo, hi, T, H, W,
                            sqn, sdon, d, dmask, dk, dv, qk_scale, RT, RH, RW, BT, BH, BW, BLOCK_N, SLICED, EVEN_D,
                            DOT_PREC, UPCAST)
    else:
        dk, dv = _dkdv_frame(k, v, q_base, do_base, lse_base, delta_base, wf, H, W, sqn, sdon, d, dmask, dk, dv,
                             qk_scale, BLOCK_N, EVEN_D, DOT_PREC, UPCAST)
    _store_rows(DK + b * sdkb + head * sdkh, ktok, sdkn, kvalid, d, dmask, dk * sm_scale, EVEN_D)
    _store_rows(DV + b * sdvb + head * sdvh, ktok, sdvn, kvalid, d, dmask, dv, EVEN_D)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, HEADS,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh,
    sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, slb, slh, sdlb, sdlh,
    T, H, W, n_local, n_window, D, qk_scale, sm_scale,
    RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, SLICED: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    INTRA_ONLY: tl.constexpr,
):
    p = tl.program_id(0)
    b, j, head, is_window = _head_setup(HEADS, tl.program_id(1), n_local, n_window)
    if p >= _tile_count(is_window, T, H, W, BT, BH, BW):
        return
    _dkdv_tile(p, b, j, head, is_window, Q, K, V, DO, DK, DV, LSE, DELTA,
               sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh,
               sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, slb, slh, sdlb, sdlh,
               T, H, W, D, qk_scale, sm_scale, RT, RH, RW, BT, BH, BW, BLOCK_N, SLICED, BLOCK_D, EVEN_D, DOT_PREC,
               UPCAST, INTRA_ONLY)


@triton.jit(do_not_specialize=["N", "n_local", "D"])
def _bwd_delta_kernel(O, DO, DELTA, HEADS, sob, son, soh, sdob, sdon, sdoh, sdlb, sdlh, N, n_local, D,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """``delta = rowsum(dO * O)`` of ``BLOCK_M`` rows of one local head, for ``_bwd_kernel``."""
    b, j, head, _ = _head_setup(HEADS, tl.program_id(1), n_local, 0)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < N
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    o = _load_rows(O + b * sob + head * soh, rows, son, valid, d, dmask, EVEN_D)
    do = _load_rows(DO + b * sdob + head * sdoh, rows, sdon, valid, d, dmask, EVEN_D)
    tl.store(DELTA + b * sdlb + j * sdlh + rows, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=valid)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_kernel(
    Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA, HEADS,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, sdob, sdon, sdoh,
    sdqb, sdqn, sdqh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, slb, slh, sdlb, sdlh,
    T, H, W, n_local, n_window, D, qk_scale, sm_scale,
    RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, SLICED: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    INTRA_ONLY: tl.constexpr,
):
    """dQ and dK/dV in one launch, from ``DELTA`` (``_bwd_delta_kernel``): the first half of the
    programs along axis 0 are dQ's query tiles, the second half dK/dV's key tiles, so the two
    share the SMs instead of dK/dV waiting for dQ's last wave."""
    half = tl.num_programs(0) // 2
    p = tl.program_id(0)
    b, j, head, is_window = _head_setup(HEADS, tl.program_id(1), n_local, n_window)
    n_tiles = _tile_count(is_window, T, H, W, BT, BH, BW)
    if p < half:
        if p < n_tiles:
            _dq_tile(p, b, j, head, is_window, Q, K, V, O, DO, DQ, LSE, DELTA,
                     sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh,
                     sdob, sdon, sdoh, sdqb, sdqn, sdqh, slb, slh, sdlb, sdlh,
                     T, H, W, D, qk_scale, sm_scale, RT, RH, RW, BT, BH, BW, BLOCK_N, SLICED, BLOCK_D, EVEN_D,
                     DOT_PREC, UPCAST, INTRA_ONLY, True)
    elif p - half < n_tiles:
        _dkdv_tile(p - half, b, j, head, is_window, Q, K, V, DO, DK, DV, LSE, DELTA,
                   sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh,
                   sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, slb, slh, sdlb, sdlh,
                   T, H, W, D, qk_scale, sm_scale, RT, RH, RW, BT, BH, BW, BLOCK_N, SLICED, BLOCK_D, EVEN_D,
                   DOT_PREC, UPCAST, INTRA_ONLY)


# ---------------------------------------------------------------------------------------
# configs and launchers
# ---------------------------------------------------------------------------------------

def _cfg(bt, bh, bw, bn, warps, stages, sliced):
    return triton.Config({"BT": bt, "BH": bh, "BW": bw, "BLOCK_N": bn, "SLICED": sliced}, num_warps=warps,
                         num_stages=stages)


# fp32 rows of more than 128 elements: the only tiles whose blocks fit in shared memory in all
# three kernels (sm_90, D = 256: 103 / 135 / 135 KB; 64-token tiles need up to 279 KB)
_WIDE_ROWS = _cfg(2, 4, 4, 32, 4, 2, False)

if INTERPRET:
    # the interpreter runs each program in numpy: small tiles keep CPU tests fast. The first
    # config that fits is used: sliced where the window allows it ((3,5,5), (1,3,3)), else the
    # general walk ((5,7,7)), so CPU tests cover both
    _FWD_CONFIGS = [_cfg(1, 4, 4, 64, 1, 1, True), _cfg(1, 4, 8, 64, 1, 1, False)]
    _BWD_CONFIGS = list(_FWD_CONFIGS)
else:
    # first fitting entry = the choice when autotuning is off. Sliced (4,4,4) tiles suit the
    # paper's (3,5,5) window: their 6 x 8 x 8 halo is 6 blocks of 64 with no padding and 384 keys
    # per query, like the (2,4,8) general tile whose 4 x 8 x 12 halo needs per-score coordinate
    # arithmetic; 128-query tiles suit intra-frame heads. Few configs: each costs a compile on
    # first use. benchmarks/local_bench.py times candidates one by one.
    _FWD_CONFIGS = [
        _cfg(4, 4, 4, 64, 4, 2, True),
        _cfg(4, 4, 4, 64, 4, 3, True),
        _cfg(8, 4, 4, 64, 8, 2, True),
        _cfg(2, 4, 8, 64, 4, 2, False),
        _cfg(2, 8, 8, 64, 8, 2, False),
        _cfg(2, 4, 8, 32, 4, 3, False),  # intra-only launches at S: 0.059 vs 0.071+ ms (PERF.md, entry 12)
        _WIDE_ROWS,
        _cfg(1, 8, 8, 64, 4, 2, False),  # single-frame grids (images); also the fallback
    ]
    _BWD_CONFIGS = [
        _cfg(4, 4, 4, 64, 4, 2, True),
        _cfg(4, 4, 4, 64, 8, 2, True),  # no dK/dV spills (4 warps spill 160 B); not in a recorded run yet
        _cfg(2, 4, 4, 64, 4, 2, True),
        _cfg(2, 4, 8, 32, 4, 3, False),
        _cfg(2, 4, 8, 32, 4, 4, False),  # intra-only dK/dV at S: 0.104 vs 0.108 ms (PERF.md, entry 12)
        _cfg(2, 4, 8, 64, 4, 2, False),
        _WIDE_ROWS,
        _cfg(1, 8, 8, 64, 4, 2, False),  # single-frame grids (images); also the fallback
    ]


def _fits(c, args) -> bool:
    """Whether config ``c`` suits this launch: a sliced walk needs the halo's h x w slice to fit
    one block; tiles much larger than the grid gain nothing (BT=4 on a T=1 grid), and BT=1
    tiles are kept for single-frame grids; big tiles spill at head dims over 128, and fp32 rows
    over 128 elements take ``_WIDE_ROWS`` only (shared memory). Launches of intra heads only use
    tiles of 64+ tokens where frames are that long: smaller ones compile to Ampere-style MMAs
    instead of Hopper's wgmma at 4 warps, and dQ spills with them."""
    bt, bh, bw = c.kwargs["BT"], c.kwargs["BH"], c.kwargs["BW"]
    if c.kwargs["SLICED"] and (bh + 2 * args["RH"]) * (bw + 2 * args["RW"]) > c.kwargs["BLOCK_N"]:
        return False
    # fp32 inputs (the only ones computed with "ieee" dots) in rows over 512 bytes: one config
    wide = args["DOT_PREC"] == "ieee" and args["BLOCK_D"] > 128 and not INTERPRET
    if wide or c == _WIDE_ROWS:
        return wide and c == _WIDE_ROWS
    t, h, w = args["T"], args["H"], args["W"]
    if bt > triton.next_power_of_2(t) or bh > 2 * triton.next_power_of_2(h) or bw > 2 * triton.next_power_of_2(w):
        return False
    if bt == 1 and t > 1 and not INTERPRET:
        return False
    if args["n_window"] == 0 and bt * bh * bw < 64 <= h * w and not INTERPRET:
        return False
    return not (args["BLOCK_D"] > 128 and bt * bh * bw > 64)


def _fitting(configs, args):
    """The configs that suit the launch (see ``_fits``), or else the last general-walk config of
    the list (a 64-query single-frame tile, correct for any launch, if slow on odd grids)."""
    kept = [c for c in configs if _fits(c, args)]
    if not kept and _fits(_WIDE_ROWS, args):  # fp32 rows over 128 elements, a list without it
        kept = [_WIDE_ROWS]
    if not kept:
        kept = [c for c in configs if not c.kwargs["SLICED"]][-1:]
    if not kept:
        raise ValueError(f"no Triton config of {configs} can run T, H, W = {args['T']}, {args['H']}, {args['W']} "
                         f"with radii {args['RT']}, {args['RH']}, {args['RW']}")
    return kept


def _prune(configs, named_args, **kwargs):
    return _fitting(configs, {**named_args, **kwargs})


_KEY = ["T", "H", "W", "RT", "RH", "RW", "n_local", "n_window", "BLOCK_D"]


def _no_launch_hooks() -> bool:
    """No launch hook (e.g. Triton's profiler) is registered: the direct path calls none."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return all(h is None or not getattr(h, "calls", True) for h in hooks)


def _spec_key(args, kwargs) -> tuple:
    """Everything Triton specializes a launch on, and more: each tensor's dtype and 16-byte
    alignment, every int and constexpr by value (floats are plain runtime arguments)."""
    key = [a if type(a) is int else (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a
           for a in args]
    key.extend(v for v in kwargs.values() if type(v) is not float)
    return tuple(key)


_GENERATIONS = itertools.count()


class _Tuned:
    """A kernel launched with Triton's autotuner over ``configs``, or, without autotuning (tests,
    the interpreter), with the first config that fits; ``chosen`` records either choice.

    Direct launches: Triton's launch path (autotuner lookup, argument binding and
    specialization, cache key) costs 40-130 us of host time per launch here, more than the GPU
    time of the kernels at small shapes (docs/PERF.md). The first launch of each
    :func:`_spec_key` goes through it; the compiled kernel it returns, the config and the grid
    are kept, and later launches with the same key call the compiled kernel's launcher
    directly with the arguments in signature order, as ``JITFunction.run`` does (with no launch
    metadata or hooks: the direct path is off while a launch hook is registered). The key holds
    every value Triton specializes on, so a hit launches exactly the kernel Triton would pick.
    """

    def __init__(self, kernel, configs, key=_KEY, fitting=None):
        self.kernel = kernel
        self.configs = configs
        self.key = key
        self.fitting = fitting or _fitting  # configs, launch kwargs -> the configs that suit it
        self.manual: dict = {}
        # the tile kernels are autotuned; a kernel with its own ``fitting`` (the delta kernel's one
        # config) is not
        self.tuned = (triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _prune})(kernel)
                      if AUTOTUNE and fitting is None else None)
        self.direct: dict = {}

    # setting the config list or the autotuner (tests and benchmarks swap them) starts a new
    # tuning generation, which keys the launches that fastpath.py replays
    @property
    def configs(self):
        return self._configs

    @configs.setter
    def configs(self, value):
        self._configs = value
        self.generation = next(_GENERATIONS)

    @property
    def tuned(self):
        return self._tuned

    @tuned.setter
    def tuned(self, value):
        self._tuned = value
        self.generation = next(_GENERATIONS)

    def launcher(self, grid, config=None, grid_key=()):
        """What ``kernel[grid]`` would be: autotuned, or with ``config`` (a ``triton.Config``) or,
        without autotuning, the first config that fits. ``grid_key``: the values ``grid`` reads
        beyond the kernel's arguments (a direct launch reuses the grid of its first launch)."""

        def run(*args, **kwargs):
            key = None
            if DIRECT_LAUNCH and _no_launch_hooks():
                # with the device (a compiled kernel's function handle belongs to one), Triton's
                # debug switches, the tuning generation (the config list and autotuner in use:
                # tests swap them) and the forced config (the entry holds it, so its id cannot
                # be reused while the entry exists)
                key = (driver.active.get_current_device(), self.generation, knobs.runtime.debug,
                       knobs.compilation.instrumentation_mode, id(config), grid_key, _spec_key(args, kwargs))
                hit = self.direct.get(key)
                if hit is not None and hit[4] is config:
                    _record(self.kernel, hit, args, kwargs)
                    return self._direct_launch(hit, args, kwargs)
            if config is None and self.tuned is not None:
                compiled = self.tuned[grid](*args, **kwargs)
                cfg = self.tuned.best_config
            else:
                cfg = config or self.fitting(self.configs, kwargs)[0]
                if config is None:
                    self.manual[(*(kwargs[k] for k in self.key), kwargs.get("DOT_PREC"))] = cfg
                launch = grid({**kwargs, **cfg.kwargs}) if callable(grid) else grid
                compiled = self.kernel[launch](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps,
                                               num_stages=cfg.num_stages)
            if key is not None and compiled is not None:
                self._remember(key, compiled, cfg, grid, args, kwargs, config)
            _record(self.kernel, None if key is None else self.direct.get(key), args, kwargs)
            return compiled

        return run

    def _remember(self, key, compiled, cfg, grid, args, kwargs, config):
        names = self.kernel.arg_names[len(args):]
        fixed = {**kwargs, **cfg.kwargs}
        if not all(n in fixed for n in names):  # an argument left to its default: keep Triton's path
            return
        launch = grid(fixed) if callable(grid) else grid
        launch = tuple(launch) + (1,) * (3 - len(launch))
        if len(self.direct) > 256:
            self.direct.clear()
        self.direct[key] = (compiled, launch, names, cfg.kwargs, config)

    @staticmethod
    def _direct_launch(hit, args, kwargs):
        compiled, (g0, g1, g2), names, cfg_kwargs = hit[:4]
        tail = [kwargs[n] if n in kwargs else cfg_kwargs[n] for n in names]
        stream = driver.active.get_current_stream(driver.active.get_current_device())
        compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *tail)
        return compiled

    def chosen(self) -> dict:
        cache = self.tuned.cache if self.tuned is not None else self.manual
        return {str(k): str(v) for k, v in cache.items()}


_RECORDING = threading.local()


@contextlib.contextmanager
def recording():
    """Collect every launch of this thread made in the block, for :mod:`oasis_kernels.fastpath`:
    a list of :class:`Launch`, or ``None`` for a launch that went through Triton's own path
    (no direct-launch entry: launch hooks, ``OASIS_TRITON_DIRECT_LAUNCH=0``)."""
    launches: list = []
    previous = getattr(_RECORDING, "launches", None)
    _RECORDING.launches = launches
    try:
        yield launches
    finally:
        _RECORDING.launches = previous


@dataclass(frozen=True)
class Launch:
    """One launch as Triton's launcher made it: the compiled kernel, the grid, and every
    argument by name in the kernel's order (constexprs included)."""

    compiled: object
    grid: tuple
    arguments: tuple

    def parameters(self):
        """``[(name, Triton type, value)]`` of the kernel's parameters, constexprs left out, in
        the order the compiled kernel takes them (Triton appends two scratch pointers)."""
        signature = self.compiled.src.signature
        return [(name, signature[name], value) for name, value in self.arguments if signature[name] != "constexpr"]


def _record(kernel, hit, args, kwargs) -> None:
    launches = getattr(_RECORDING, "launches", None)
    if launches is None:
        return
    if hit is None:
        launches.append(None)
        return
    compiled, launch, names, cfg_kwargs = hit[:4]
    tail = [kwargs[n] if n in kwargs else cfg_kwargs[n] for n in names]
    launches.append(Launch(compiled, launch, tuple(zip(kernel.arg_names, (*args, *tail)))))


_fwd_tuned = _Tuned(_fwd_kernel, _FWD_CONFIGS)
_dq_tuned = _Tuned(_bwd_dq_kernel, _BWD_CONFIGS)
_dkdv_tuned = _Tuned(_bwd_dkdv_kernel, _BWD_CONFIGS)
_bwd_tuned = _Tuned(_bwd_kernel, _BWD_CONFIGS)
# a row reduction: one config, nothing to tune
_delta_tuned = _Tuned(_bwd_delta_kernel, [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1)],
                      key=["BLOCK_D"], fitting=lambda configs, kwargs: configs)


def tuning_state() -> tuple:
    """What a launch's choice of config and kernels depends on besides its arguments: each
    kernel's tuning generation (a new one whenever its config list or autotuner is set), and
    which backward runs (``CONCURRENT_BWD``)."""
    return (_fwd_tuned.generation, _dq_tuned.generation, _dkdv_tuned.generation, _bwd_tuned.generation,
            _delta_tuned.generation, CONCURRENT_BWD)


def chosen_configs() -> dict[str, dict]:
    """The config chosen per kernel and key, for debugging (``{kernel: {key: config}}``)."""
    return {name: fn.chosen() for name, fn in (("fwd", _fwd_tuned), ("bwd_dq", _dq_tuned), ("bwd_dkdv", _dkdv_tuned),
                                               ("bwd", _bwd_tuned), ("bwd_delta", _delta_tuned))}


def _launch_grid(n_tiles_fn, batch, n_local):
    return lambda meta: (n_tiles_fn(meta["BT"], meta["BH"], meta["BW"]), batch * n_local)


def _tiles_fn(grid, has_window, has_intra):
    t, h, w = grid

    def count(bt, bh, bw):
        n = 0
        if has_window:
            n = max(n, triton.cdiv(t, bt) * triton.cdiv(h, bh) * triton.cdiv(w, bw))
        if has_intra:
            n = max(n, t * triton.cdiv(h * w, bt * bh * bw))
        return n

    return count


def _common(q, grid, radii, table, n_window):
    return _common_args(q.dtype, q.shape[-1], tuple(grid), tuple(radii), table.shape[0], n_window)


def _block_d(d):
    """The head dim ``D`` and the power-of-two row width the kernels load it in."""
    block_d = max(16, triton.next_power_of_2(d))
    return dict(D=d, BLOCK_D=block_d, EVEN_D=block_d == d)


@functools.lru_cache(maxsize=256)
def _common_args(dtype, d, grid, radii, n_local, n_window):
    # per layer shape, not per call: the launch path is host-bound at small shapes
    return dict(
        T=grid[0], H=grid[1], W=grid[2], RT=radii[0], RH=radii[1], RW=radii[2],
        n_local=n_local, n_window=n_window, **_block_d(d),
        # a launch of intra heads only walks whole frames: no mask but at each frame's end
        INTRA_ONLY=n_window == 0,
        DOT_PREC="ieee" if dtype == torch.float32 else "tf32",
        UPCAST=INTERPRET and dtype == torch.bfloat16,
    )


LOG2E = 1.4426950408889634


def _launch(tuned, q, table, n_window, grid, config, kinds=1):
    """``kinds``: programs per tile (``_bwd_kernel``: a dQ and a dK/dV program)."""
    count = _tiles_fn(grid, n_window > 0, n_window < table.shape[0])
    programs = count if kinds == 1 else lambda bt, bh, bw: kinds * count(bt, bh, bw)
    return tuned.launcher(_launch_grid(programs, q.shape[0], table.shape[0]), config, grid_key=q.shape[0])


def local_attention_forward(q, k, v, out, lse, table, n_window, grid, radii, scale, config=None):
    """Launch the forward for the heads in ``table`` (int32 ``[n_local]``: window heads, then intra).

    ``q, k, v, out``: ``[B, N, heads, D]`` with unit stride on D; ``lse``: ``[B, heads, N]``.
    ``config``: a ``triton.Config`` instead of the autotuner's choice (benchmarks/local_bench.py).
    """
    _launch(_fwd_tuned, q, table, n_window, grid, config)(
        q, k, v, out, lse, table,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        qk_scale=scale * LOG2E, POS_SCALE=scale > 0, **_common(q, grid, radii, table, n_window),
    )


def local_attention_backward_dq(dout, q, k, v, out, lse, dq, table, n_window, grid, radii, scale, config=None):
    """dQ, and ``delta = rowsum(dO * O)`` (returned, ``[B, n_local, N]`` float32) for dK/dV."""
    delta = torch.empty(q.shape[0], table.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
    _launch(_dq_tuned, q, table, n_window, grid, config)(
        q, k, v, out, dout, dq, lse, delta, table,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        lse.stride(0), lse.stride(1), delta.stride(0), delta.stride(1),
        qk_scale=scale * LOG2E, sm_scale=scale, **_common(q, grid, radii, table, n_window),
    )
    return delta


def local_attention_backward_dkdv(dout, q, k, v, lse, delta, dk, dv, table, n_window, grid, radii, scale,
                                  config=None):
    """dK and dV, from the ``delta`` of :func:`local_attention_backward_dq`."""
    _launch(_dkdv_tuned, q, table, n_window, grid, config)(
        q, k, v, dout, dk, dv, lse, delta, table,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        lse.stride(0), lse.stride(1), delta.stride(0), delta.stride(1),
        qk_scale=scale * LOG2E, sm_scale=scale, **_common(q, grid, radii, table, n_window),
    )


def local_attention_backward_delta(dout, out, table):
    """``delta = rowsum(dO * O)`` of the heads in ``table`` (``[B, n_local, N]`` float32)."""
    b, n = out.shape[:2]
    delta = torch.empty(b, table.shape[0], n, dtype=torch.float32, device=out.device)
    _delta_tuned.launcher(lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * table.shape[0]), grid_key=(b, n))(
        out, dout, delta, table, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
        dout.stride(2), delta.stride(0), delta.stride(1), n, table.shape[0], **_block_d(out.shape[-1]))
    return delta


def local_attention_backward_concurrent(dout, q, k, v, out, lse, dq, dk, dv, table, n_window, grid, radii, scale,
                                        config=None):
    """``delta`` by its own small kernel, then dQ and dK/dV in one launch (``_bwd_kernel``)."""
    delta = local_attention_backward_delta(dout, out, table)
    _launch(_bwd_tuned, q, table, n_window, grid, config, kinds=2)(
        q, k, v, out, dout, dq, dk, dv, lse, delta, table,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        lse.stride(0), lse.stride(1), delta.stride(0), delta.stride(1),
        qk_scale=scale * LOG2E, sm_scale=scale, **_common(q, grid, radii, table, n_window),
    )


def local_attention_backward(dout, q, k, v, out, lse, dq, dk, dv, table, n_window, grid, radii, scale):
    """:func:`local_attention_backward_concurrent` (the default), or with ``OASIS_CONCURRENT_BWD=0``
    dQ (and ``delta``) first, then dK/dV, which reads ``delta``."""
    if CONCURRENT_BWD:
        local_attention_backward_concurrent(dout, q, k, v, out, lse, dq, dk, dv, table, n_window, grid, radii, scale)
        return
    delta = local_attention_backward_dq(dout, q, k, v, out, lse, dq, table, n_window, grid, radii, scale)
    local_attention_backward_dkdv(dout, q, k, v, lse, delta, dk, dv, table, n_window, grid, radii, scale)
