"""Triton kernels for the local heads: intra-frame and clipped 3D window, per-head routed.

Geometry
--------
Both patterns are boxes on the ``(T, H, W)`` grid (see :mod:`oasis_kernels.masks`): a key is
visible iff every coordinate offset is within the head's radii ``(rt, rh, rw)``; intra-frame
heads use ``(0, H, W)``. One launch serves every local head of a layer: program axis 1 runs
over ``(batch, local head)`` and reads the head's index and mode from a small int32 table,
axis 0 over the head's *primary tiles*:

* window heads tile the grid in 3D boxes of ``BT x BH x BW`` tokens, so the keys a tile needs
  (its box grown by the radii and clipped to the grid, the *halo*) are loaded once per tile;
* intra-frame heads tile each frame in runs of ``BT*BH*BW`` consecutive tokens, whose halo
  is the whole frame (a contiguous range of tokens).

The halo is walked in blocks of ``BLOCK_N`` tokens in t-major order. The mask is evaluated only
on blocks that need it: a block whose coordinate extents lie within the radii of every token
of the tile (always the case for intra-frame heads) skips it, as does every block but the
ragged last one.

Kernels
-------
* ``_fwd_kernel``: online softmax (FlashAttention-2), writes ``out`` in place into the routed
  output and the natural-log LSE.
* ``_bwd_dq_kernel``: per query tile, ``delta = rowsum(dO * O)`` (written for the next kernel)
  and ``dQ``, recomputing ``P`` from the LSE.
* ``_bwd_dkdv_kernel``: per key tile, walks the queries that see it. Visibility is symmetric
  (``|t - t'| <= rt`` either way), so the queries that see a key tile are its halo, and the same
  geometry code serves. Two kernels and no atomics: the backward is deterministic.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["local_attention_forward", "local_attention_backward", "chosen_configs", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: OASIS_TRITON_AUTOTUNE=0 uses the first config of each list (fast start for tests and sweeps)
AUTOTUNE = os.environ.get("OASIS_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET

# grid sizes, radii and head counts vary per layer and video; specializing on them (==1, %16)
# would recompile for every shape without making the code faster
_NO_SPECIALIZE = ["T", "H", "W", "RT", "RH", "RW", "n_local", "n_window", "D"]



# ---------------------------------------------------------------------------------------
# geometry helpers
# ---------------------------------------------------------------------------------------

@triton.jit
def _primary_tile(p, is_window, T, H, W, BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Tokens of primary tile ``p``: coordinates, validity and the extents of the valid ones."""
    BLOCK: tl.constexpr = BT * BH * BW
    HW = H * W
    i = tl.arange(0, BLOCK)
    # window: a BT x BH x BW box
    nbh = tl.cdiv(H, BH)
    nbw = tl.cdiv(W, BW)
    bt = p // (nbh * nbw)
    bh = (p // nbw) % nbh
    bw = p % nbw
    wt0 = bt * BT
    wh0 = bh * BH
    ww0 = bw * BW
    # intra-frame: BLOCK consecutive tokens of one frame
    tpf = tl.cdiv(HW, BLOCK)
    ft = p // tpf
    f0 = (p % tpf) * BLOCK
    f = f0 + i
    f1 = tl.minimum(f0 + BLOCK, HW) - 1  # last valid in-frame index
    one_row = (f0 // W) == (f1 // W)

    t = tl.where(is_window, wt0 + i // (BH * BW), ft)
    h = tl.where(is_window, wh0 + (i // BW) % BH, f // W)
    w = tl.where(is_window, ww0 + i % BW, f % W)
    valid = (t < T) & (h < H) & (w < W)

    t_lo = tl.where(is_window, wt0, ft)
    t_hi = tl.where(is_window, tl.minimum(wt0 + BT, T) - 1, ft)
    h_lo = tl.where(is_window, wh0, f0 // W)
    h_hi = tl.where(is_window, tl.minimum(wh0 + BH, H) - 1, f1 // W)
    w_lo = tl.where(is_window, ww0, tl.where(one_row, f0 % W, 0))
    w_hi = tl.where(is_window, tl.minimum(ww0 + BW, W) - 1, tl.where(one_row, f1 % W, W - 1))
    return t, h, w, valid, t_lo, t_hi, h_lo, h_hi, w_lo, w_hi


@triton.jit
def _halo(t_lo, t_hi, h_lo, h_hi, w_lo, w_hi, rt, rh, rw, T, H, W):
    """The tile's extents grown by the radii and clipped to the grid: ``(lo, size)`` per axis."""
    a_lo = tl.maximum(t_lo - rt, 0)
    b_lo = tl.maximum(h_lo - rh, 0)
    c_lo = tl.maximum(w_lo - rw, 0)
    na = tl.minimum(t_hi + rt, T - 1) - a_lo + 1
    nb = tl.minimum(h_hi + rh, H - 1) - b_lo + 1
    nc = tl.minimum(w_hi + rw, W - 1) - c_lo + 1
    return a_lo, b_lo, c_lo, na, nb, nc


@triton.jit
def _halo_block(start, a_lo, b_lo, c_lo, nb, nc, L, p_t_lo, p_t_hi, p_h_lo, p_h_hi, p_w_lo, p_w_hi,
                rt, rh, rw, BLOCK_N: tl.constexpr):
    """Tokens ``start .. start+BLOCK_N`` of the halo (t-major): coordinates, validity, and ``full``:
    True when the block is whole and each of its tokens is within the radii of every token of the
    primary tile whose extents are ``p_*`` (then no mask is needed)."""
    j = start + tl.arange(0, BLOCK_N)
    plane = nb * nc
    t = a_lo + j // plane
    h = b_lo + (j // nc) % nb
    w = c_lo + j % nc
    valid = j < L
    # conservative extents of the block's valid tokens, from its first and last index
    last = tl.minimum(start + BLOCK_N, L) - 1
    r0 = start % plane
    r1 = last % plane
    same_t = (start // plane) == (last // plane)
    same_row = same_t & ((r0 // nc) == (r1 // nc))
    t_lo = a_lo + start // plane
    t_hi = a_lo + last // plane
    h_lo = b_lo + tl.where(same_t, r0 // nc, 0)
    h_hi = b_lo + tl.where(same_t, r1 // nc, nb - 1)
    w_lo = c_lo + tl.where(same_row, r0 % nc, 0)
    w_hi = c_lo + tl.where(same_row, r1 % nc, nc - 1)
    full = ((tl.maximum(p_t_hi - t_lo, t_hi - p_t_lo) <= rt)
            & (tl.maximum(p_h_hi - h_lo, h_hi - p_h_lo) <= rh)
            & (tl.maximum(p_w_hi - w_lo, w_hi - p_w_lo) <= rw)
            & (start + BLOCK_N <= L))
    return t, h, w, valid, full


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
def _visible(qt, qh, qw, kt, kh, kw, kvalid, rt, rh, rw):
    """[M, N] visibility of keys (columns) from queries (rows); symmetric in the two sides."""
    dt = qt[:, None] - kt[None, :]
    dh = qh[:, None] - kh[None, :]
    dw = qw[:, None] - kw[None, :]
    return ((dt <= rt) & (dt >= -rt) & (dh <= rh) & (dh >= -rh) & (dw <= rw) & (dw >= -rw)
            & kvalid[None, :])


@triton.jit
def _head_setup(HEADS, pid_bh, n_local, n_window, T, H, W, RT, RH, RW):
    # the table lists window heads first, so a head's mode follows from its position; only the
    # head index is loaded (loop bounds then stay plain scalars, also in the interpreter)
    b = (pid_bh // n_local).to(tl.int64)
    j = pid_bh % n_local
    head = tl.load(HEADS + j)
    is_window = j < n_window
    rt = tl.where(is_window, RT, 0)
    rh = tl.where(is_window, RH, H)
    rw = tl.where(is_window, RW, W)
    return b, j, head, is_window, rt, rh, rw


@triton.jit
def _tile_count(is_window, T, H, W, BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    n_window = tl.cdiv(T, BT) * tl.cdiv(H, BH) * tl.cdiv(W, BW)
    n_intra = T * tl.cdiv(H * W, BT * BH * BW)
    return tl.where(is_window, n_window, n_intra)


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _fwd_kernel(
    Q, K, V, O, LSE, HEADS,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, slb, slh,
    T, H, W, RT, RH, RW, n_local, n_window, D, qk_scale,
    BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    p = tl.program_id(0)
    b, j, head, is_window, rt, rh, rw = _head_setup(HEADS, tl.program_id(1), n_local, n_window, T, H, W, RT, RH, RW)
    if p >= _tile_count(is_window, T, H, W, BT, BH, BW):
        return
    qt, qh, qw, qvalid, qt_lo, qt_hi, qh_lo, qh_hi, qw_lo, qw_hi = _primary_tile(p, is_window, T, H, W, BT, BH, BW)
    a_lo, b_lo, c_lo, na, nb, nc = _halo(qt_lo, qt_hi, qh_lo, qh_hi, qw_lo, qw_hi, rt, rh, rw, T, H, W)
    L = na * nb * nc

    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    qtok = (qt * H + qh) * W + qw
    q_ptrs = Q + b * sqb + head * sqh + qtok[:, None] * sqn + d[None, :]
    if EVEN_D:
        q = tl.load(q_ptrs, mask=qvalid[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=qvalid[:, None] & dmask[None, :], other=0.0)
    k_base = K + b * skb + head * skh
    v_base = V + b * svb + head * svh

    BLOCK_M: tl.constexpr = BT * BH * BW
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start in range(0, L, BLOCK_N):
        kt, kh, kw, kvalid, full = _halo_block(start, a_lo, b_lo, c_lo, nb, nc, L,
                                               qt_lo, qt_hi, qh_lo, qh_hi, qw_lo, qw_hi, rt, rh, rw, BLOCK_N)
        ktok = (kt * H + kh) * W + kw
        if EVEN_D:
            kmask = kvalid[:, None]
        else:
            kmask = kvalid[:, None] & dmask[None, :]
        k = tl.load(k_base + ktok[:, None] * skn + d[None, :], mask=kmask, other=0.0)
        v = tl.load(v_base + ktok[:, None] * svn + d[None, :], mask=kmask, other=0.0)
        s = _mm(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        if not full:
            s = tl.where(_visible(qt, qh, qw, kt, kh, kw, kvalid, rt, rh, rw), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        pr = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + _mm(pr.to(v.dtype), v, DOT_PREC, UPCAST)
        m_i = m_new

    # every valid query sees at least itself, so l_i > 0 there; padding rows are not stored
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = O + b * sob + head * soh + qtok[:, None] * son + d[None, :]
    if EVEN_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=qvalid[:, None])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=qvalid[:, None] & dmask[None, :])
    # natural-log LSE: m and l are in base 2 (qk_scale carries log2(e))
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + b * slb + head * slh + qtok, lse, mask=qvalid)


# ---------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, HEADS,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh,
    sdob, sdon, sdoh, sdqb, sdqn, sdqh, slb, slh, sdlb, sdlh,
    T, H, W, RT, RH, RW, n_local, n_window, D, qk_scale, sm_scale,
    BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    p = tl.program_id(0)
    b, j, head, is_window, rt, rh, rw = _head_setup(HEADS, tl.program_id(1), n_local, n_window, T, H, W, RT, RH, RW)
    if p >= _tile_count(is_window, T, H, W, BT, BH, BW):
        return
    qt, qh, qw, qvalid, qt_lo, qt_hi, qh_lo, qh_hi, qw_lo, qw_hi = _primary_tile(p, is_window, T, H, W, BT, BH, BW)
    a_lo, b_lo, c_lo, na, nb, nc = _halo(qt_lo, qt_hi, qh_lo, qh_hi, qw_lo, qw_hi, rt, rh, rw, T, H, W)
    L = na * nb * nc

    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    qtok = (qt * H + qh) * W + qw
    if EVEN_D:
        rmask = qvalid[:, None]
    else:
        rmask = qvalid[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + head * sqh + qtok[:, None] * sqn + d[None, :], mask=rmask, other=0.0)
    do = tl.load(DO + b * sdob + head * sdoh + qtok[:, None] * sdon + d[None, :], mask=rmask, other=0.0)
    o = tl.load(O + b * sob + head * soh + qtok[:, None] * son + d[None, :], mask=rmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + b * sdlb + j * sdlh + qtok, delta, mask=qvalid)
    lse2 = tl.load(LSE + b * slb + head * slh + qtok, mask=qvalid, other=0.0) * 1.4426950408889634
    k_base = K + b * skb + head * skh
    v_base = V + b * svb + head * svh

    BLOCK_M: tl.constexpr = BT * BH * BW
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, L, BLOCK_N):
        kt, kh, kw, kvalid, full = _halo_block(start, a_lo, b_lo, c_lo, nb, nc, L,
                                               qt_lo, qt_hi, qh_lo, qh_hi, qw_lo, qw_hi, rt, rh, rw, BLOCK_N)
        ktok = (kt * H + kh) * W + kw
        if EVEN_D:
            kmask = kvalid[:, None]
        else:
            kmask = kvalid[:, None] & dmask[None, :]
        k = tl.load(k_base + ktok[:, None] * skn + d[None, :], mask=kmask, other=0.0)
        v = tl.load(v_base + ktok[:, None] * svn + d[None, :], mask=kmask, other=0.0)
        s = _mm(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        pr = tl.math.exp2(s - lse2[:, None])
        if not full:
            pr = tl.where(_visible(qt, qh, qw, kt, kh, kw, kvalid, rt, rh, rw), pr, 0.0)
        dp = _mm(do, tl.trans(v), DOT_PREC, UPCAST)
        ds = pr * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, DOT_PREC, UPCAST)
    dq = dq * sm_scale
    dq_ptrs = DQ + b * sdqb + head * sdqh + qtok[:, None] * sdqn + d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=rmask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, HEADS,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh,
    sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, slb, slh, sdlb, sdlh,
    T, H, W, RT, RH, RW, n_local, n_window, D, qk_scale, sm_scale,
    BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    p = tl.program_id(0)
    b, j, head, is_window, rt, rh, rw = _head_setup(HEADS, tl.program_id(1), n_local, n_window, T, H, W, RT, RH, RW)
    if p >= _tile_count(is_window, T, H, W, BT, BH, BW):
        return
    # primary tile = keys; the queries that see them are its halo (visibility is symmetric)
    kt, kh, kw, kvalid, kt_lo, kt_hi, kh_lo, kh_hi, kw_lo, kw_hi = _primary_tile(p, is_window, T, H, W, BT, BH, BW)
    a_lo, b_lo, c_lo, na, nb, nc = _halo(kt_lo, kt_hi, kh_lo, kh_hi, kw_lo, kw_hi, rt, rh, rw, T, H, W)
    L = na * nb * nc

    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    ktok = (kt * H + kh) * W + kw
    if EVEN_D:
        rmask = kvalid[:, None]
    else:
        rmask = kvalid[:, None] & dmask[None, :]
    k = tl.load(K + b * skb + head * skh + ktok[:, None] * skn + d[None, :], mask=rmask, other=0.0)
    v = tl.load(V + b * svb + head * svh + ktok[:, None] * svn + d[None, :], mask=rmask, other=0.0)
    q_base = Q + b * sqb + head * sqh
    do_base = DO + b * sdob + head * sdoh

    BLOCK_M: tl.constexpr = BT * BH * BW
    dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, L, BLOCK_N):
        qt, qh, qw, qvalid, full = _halo_block(start, a_lo, b_lo, c_lo, nb, nc, L,
                                               kt_lo, kt_hi, kh_lo, kh_hi, kw_lo, kw_hi, rt, rh, rw, BLOCK_N)
        qtok = (qt * H + qh) * W + qw
        if EVEN_D:
            qmask = qvalid[:, None]
        else:
            qmask = qvalid[:, None] & dmask[None, :]
        q = tl.load(q_base + qtok[:, None] * sqn + d[None, :], mask=qmask, other=0.0)
        do = tl.load(do_base + qtok[:, None] * sdon + d[None, :], mask=qmask, other=0.0)
        lse2 = tl.load(LSE + b * slb + head * slh + qtok, mask=qvalid, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + b * sdlb + j * sdlh + qtok, mask=qvalid, other=0.0)
        s_t = _mm(k, tl.trans(q), DOT_PREC, UPCAST) * qk_scale  # [keys, queries]
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if not full:
            p_t = tl.where(_visible(kt, kh, kw, qt, qh, qw, qvalid, rt, rh, rw), p_t, 0.0)
        dv += _mm(p_t.to(do.dtype), do, DOT_PREC, UPCAST)
        dp_t = _mm(v, tl.trans(do), DOT_PREC, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _mm(ds_t.to(q.dtype), q, DOT_PREC, UPCAST)
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + head * sdkh + ktok[:, None] * sdkn + d[None, :], dk.to(DK.dtype.element_ty), mask=rmask)
    tl.store(DV + b * sdvb + head * sdvh + ktok[:, None] * sdvn + d[None, :], dv.to(DV.dtype.element_ty), mask=rmask)


# ---------------------------------------------------------------------------------------
# configs and launchers
# ---------------------------------------------------------------------------------------

def _cfg(bt, bh, bw, bn, warps, stages):
    return triton.Config({"BT": bt, "BH": bh, "BW": bw, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


if INTERPRET:
    # the interpreter runs each program in numpy: smallest legal tiles keep CPU tests fast
    _FWD_CONFIGS = [_cfg(1, 4, 8, 64, 1, 1)]
    _BWD_CONFIGS = [_cfg(1, 4, 8, 64, 1, 1)]
else:
    # first entry = the default when autotuning is off. 64-query tiles keep the halo small
    # (a (2,4,8) tile of a (3,5,5) window reads 4*8*12 = 384 keys per query, vs 576 for (2,8,8));
    # 128-query tiles suit intra-frame heads. Few configs: each costs a compile on first use.
    _FWD_CONFIGS = [
        _cfg(2, 4, 8, 64, 4, 2),
        _cfg(2, 4, 8, 64, 4, 3),
        _cfg(1, 8, 8, 64, 4, 2),
        _cfg(2, 8, 8, 64, 8, 2),
    ]
    _BWD_CONFIGS = [
        _cfg(2, 4, 8, 64, 4, 2),
        _cfg(1, 8, 8, 32, 4, 2),
        _cfg(2, 8, 8, 64, 8, 2),
    ]
    if not AUTOTUNE:
        _FWD_CONFIGS, _BWD_CONFIGS = _FWD_CONFIGS[:1], _BWD_CONFIGS[:1]


def _prune(configs, named_args, **kwargs):
    """Drop tiles much larger than the grid (a T=1 grid gains nothing from BT=2), and big
    tiles for head dims where their accumulators would spill."""
    args = {**named_args, **kwargs}
    t, h, w, block_d = args["T"], args["H"], args["W"], args["BLOCK_D"]
    kept = []
    for c in configs:
        bt, bh, bw = c.kwargs["BT"], c.kwargs["BH"], c.kwargs["BW"]
        if bt > triton.next_power_of_2(t) or bh > 2 * triton.next_power_of_2(h) or bw > 2 * triton.next_power_of_2(w):
            continue
        if block_d > 128 and bt * bh * bw > 64:
            continue
        kept.append(c)
    return kept or configs[:1]


_KEY = ["T", "H", "W", "RT", "RH", "RW", "n_local", "n_window", "BLOCK_D"]

_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(_fwd_kernel)
_dq_tuned = triton.autotune(_BWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(_bwd_dq_kernel)
_dkdv_tuned = triton.autotune(_BWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(_bwd_dkdv_kernel)


def chosen_configs() -> dict[str, dict]:
    """The autotuner's choice per kernel and key, for debugging (``{kernel: {key: config}}``)."""
    out = {}
    for name, fn in (("fwd", _fwd_tuned), ("bwd_dq", _dq_tuned), ("bwd_dkdv", _dkdv_tuned)):
        out[name] = {str(k): str(v) for k, v in fn.cache.items()}
    return out


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
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    return dict(
        T=grid[0], H=grid[1], W=grid[2], RT=radii[0], RH=radii[1], RW=radii[2],
        n_local=table.shape[0], n_window=n_window, D=d, BLOCK_D=block_d, EVEN_D=(block_d == d),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
    )


LOG2E = 1.4426950408889634


def local_attention_forward(q, k, v, out, lse, table, n_window, grid, radii, scale):
    """Launch the forward for the heads in ``table`` (int32 ``[n_local]``: window heads, then intra).

    ``q, k, v, out``: ``[B, N, heads, D]`` with unit stride on D; ``lse``: ``[B, heads, N]``.
    """
    b = q.shape[0]
    args = _common(q, grid, radii, table, n_window)
    launch = _launch_grid(_tiles_fn(grid, n_window > 0, n_window < table.shape[0]), b, table.shape[0])
    _fwd_tuned[launch](
        q, k, v, out, lse, table,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        qk_scale=scale * LOG2E, **args,
    )


def local_attention_backward(dout, q, k, v, out, lse, dq, dk, dv, table, n_window, grid, radii, scale):
    """dQ (and ``delta``) first, then dK/dV, which reads ``delta``."""
    b = q.shape[0]
    n = q.shape[1]
    args = _common(q, grid, radii, table, n_window)
    delta = torch.empty(b, table.shape[0], n, dtype=torch.float32, device=q.device)
    launch = _launch_grid(_tiles_fn(grid, n_window > 0, n_window < table.shape[0]), b, table.shape[0])
    _dq_tuned[launch](
        q, k, v, out, dout, dq, lse, delta, table,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        lse.stride(0), lse.stride(1), delta.stride(0), delta.stride(1),
        qk_scale=scale * LOG2E, sm_scale=scale, **args,
    )
    _dkdv_tuned[launch](
        q, k, v, dout, dk, dv, lse, delta, table,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        lse.stride(0), lse.stride(1), delta.stride(0), delta.stride(1),
        qk_scale=scale * LOG2E, sm_scale=scale, **args,
    )
