"""Triton kernels for the local heads (intra-frame and clipped 3D window), and their launchers.

One launch serves every local head of a layer (the tile geometry, the walks and the visibility
test are in :mod:`.tile_geometry`; the tile configurations and their fit rules in
:mod:`.tile_configs`; autotuning, the direct launch and the launch record in :mod:`.launching`).

Kernels
-------
* ``_fwd_kernel``: online softmax (FlashAttention-2), writes ``out`` in place into the routed
  output and the natural-log LSE.
* ``_bwd_delta_kernel``: ``delta = rowsum(dO * O)`` per query row, a small kernel of its own.
* ``_bwd_kernel``: one launch whose programs are dQ's query tiles and dK/dV's key tiles side by
  side, so dK/dV does not wait for dQ's last wave (docs/PERF.md, entry 16). A dK/dV tile walks
  the queries that see it: its halo, since visibility is symmetric. Shared memory is the larger
  of the two tiles' (the branches reuse it), registers and spills dK/dV's. No atomics: the
  backward is deterministic. (A one-pass backward adding dQ atomically, as FlashAttention-2
  does, measured slower on the H200 at every shape tried: docs/PERF.md, entry 12.)

Each program branches once on its head's mode into that mode's loop: intra-frame tiles walk
their frame in full blocks with no mask and mask only the frame's last, partial block; window
tiles walk their halo. Nothing selects between modes per score. A launch of intra heads only
(``INTRA_ONLY``, a compile-time flag) compiles the frame loop alone.

Kernel arguments come per tensor: the pointer, then its batch, token and head strides (``[B, N,
heads, D]`` tensors, unit stride on D) or its batch and head strides (``[B, heads, N]`` ones).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launching import Tuned
from .tile_configs import BWD_CONFIGS, FWD_CONFIGS, INTERPRET
from .tile_geometry import (LOG2E, MAX_RADIUS, NO_SPECIALIZE, block_d, frame_block, frame_walk, full_block,
                            head_setup, load_block, load_rows, masked_scores, mm, narrow, primary_tile, store_rows,
                            tile_count, window_block, window_setup)

__all__ = ["local_attention_forward", "local_attention_backward", "local_attention_backward_delta",
           "chosen_configs", "tuning_state", "INTERPRET", "MAX_RADIUS"]


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------

@triton.jit
def _fwd_step(s, c, v, m_i, l_i, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key block of the online softmax on masked scores ``s`` whose scaled value is ``s * c``
    (see ``masked_scores``)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * c)
    # a row that has seen no visible key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    pr = tl.math.exp2(s * c - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(pr, 1)
    acc = acc * alpha[:, None] + mm(narrow(pr, v.dtype, UPCAST), v, DOT_PREC, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _fwd_block(q, k_base, v_base, ktok, kvalid, mask, skn, svn, d, dmask, m_i, l_i, acc, qk_scale,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
               POS_SCALE: tl.constexpr):
    """One key block of the forward; ``MASKED`` false: every key of it is visible to every row."""
    k = load_block(k_base, ktok, skn, kvalid, d, dmask, MASKED, EVEN_D)
    v = load_block(v_base, ktok, svn, kvalid, d, dmask, MASKED, EVEN_D)
    qk = mm(q, tl.trans(k), DOT_PREC, UPCAST)
    if MASKED:
        s, c = masked_scores(qk, mask, qk_scale, POS_SCALE)
    elif POS_SCALE:
        s, c = qk, qk_scale
    else:
        s, c = qk * qk_scale, 1.0
    return _fwd_step(s, c, v, m_i, l_i, acc, DOT_PREC, UPCAST)


@triton.jit
def _fwd_frame(q, k_base, v_base, f_base, H, W, skn, svn, d, dmask, m_i, l_i, acc, qk_scale, BLOCK_N: tl.constexpr,
               EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, POS_SCALE: tl.constexpr):
    """The forward's walk of an intra-frame tile: the frame's full key blocks unmasked, then its tail."""
    n_full, tail = frame_walk(H, W, BLOCK_N)
    for it in range(0, n_full):
        ktok = full_block(f_base, it, BLOCK_N)
        m_i, l_i, acc = _fwd_block(q, k_base, v_base, ktok, ktok, ktok, skn, svn, d, dmask, m_i, l_i, acc, qk_scale,
                                   False, EVEN_D, DOT_PREC, UPCAST, POS_SCALE)
    if tail < H * W:
        ktok, kvalid = frame_block(tail, f_base, H * W, BLOCK_N)
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
    it_lo, it_hi, wa, wb, wc, wd, we = window_setup(t0, h0, w0, lo, hi, T, H, W, RT, RH, RW, BT, BH, BW,
                                                     BLOCK_N, SLICED)
    for it in range(it_lo, it_hi):
        ktok, kvalid, mask = window_block(it, wa, wb, wc, wd, we, T, H, W, RT, RH, RW, BT, BH, BW, BLOCK_N,
                                           SLICED)
        m_i, l_i, acc = _fwd_block(q, k_base, v_base, ktok, kvalid, mask, skn, svn, d, dmask, m_i, l_i, acc, qk_scale,
                                   True, EVEN_D, DOT_PREC, UPCAST, POS_SCALE)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _fwd_kernel(
    Q, sqb, sqn, sqh, K, skb, skn, skh, V, svb, svn, svh, O, sob, son, soh, LSE, slb, slh, HEADS,
    T, H, W, n_local, n_window, D, qk_scale,
    RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, SLICED: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    INTRA_ONLY: tl.constexpr, POS_SCALE: tl.constexpr,
):
    p = tl.program_id(0)
    b, j, head, is_window = head_setup(HEADS, tl.program_id(1), n_local, n_window)
    if p >= tile_count(is_window, T, H, W, BT, BH, BW):
        return
    qtok, qvalid, t0, h0, w0, lo, hi, wf = primary_tile(p, is_window, T, H, W, RT, RH, RW, BT, BH, BW)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = load_rows(Q + b * sqb + head * sqh, qtok, sqn, qvalid, d, dmask, EVEN_D)
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
    store_rows(O + b * sob + head * soh, qtok, son, qvalid, d, dmask, acc / l_safe[:, None], EVEN_D, UPCAST)
    # natural-log LSE: m and l are in base 2 (qk_scale carries log2(e))
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + b * slb + head * slh + qtok, lse, mask=qvalid)



# ---------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------



@triton.jit
def _dq_step(pr, do, k, v, delta, dq, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``dq += dS @ K`` for one key block, given the masked probabilities ``pr``."""
    dp = mm(do, tl.trans(v), DOT_PREC, UPCAST)
    ds = pr * (dp - delta[:, None])
    return dq + mm(narrow(ds, k.dtype, UPCAST), k, DOT_PREC, UPCAST)


@triton.jit
def _dq_block(q, do, lse2, delta, k_base, v_base, ktok, kvalid, mask, skn, svn, d, dmask, dq, qk_scale,
              MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key block of dQ; ``MASKED`` false: every key of it is visible to every row."""
    k = load_block(k_base, ktok, skn, kvalid, d, dmask, MASKED, EVEN_D)
    v = load_block(v_base, ktok, svn, kvalid, d, dmask, MASKED, EVEN_D)
    pr = tl.math.exp2(mm(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale - lse2[:, None])
    if MASKED:
        pr = tl.where(mask, pr, 0.0)
    return _dq_step(pr, do, k, v, delta, dq, DOT_PREC, UPCAST)


@triton.jit
def _dq_frame(q, do, lse2, delta, k_base, v_base, f_base, H, W, skn, svn, d, dmask, dq, qk_scale,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dQ's walk of an intra-frame tile (see ``_fwd_frame``)."""
    n_full, tail = frame_walk(H, W, BLOCK_N)
    for it in range(0, n_full):
        ktok = full_block(f_base, it, BLOCK_N)
        dq = _dq_block(q, do, lse2, delta, k_base, v_base, ktok, ktok, ktok, skn, svn, d, dmask, dq, qk_scale,
                       False, EVEN_D, DOT_PREC, UPCAST)
    if tail < H * W:
        ktok, kvalid = frame_block(tail, f_base, H * W, BLOCK_N)
        dq = _dq_block(q, do, lse2, delta, k_base, v_base, ktok, kvalid, kvalid[None, :], skn, svn, d, dmask, dq,
                       qk_scale, True, EVEN_D, DOT_PREC, UPCAST)
    return dq


@triton.jit
def _dq_halo(q, do, lse2, delta, k_base, v_base, t0, h0, w0, lo, hi, T, H, W, skn, svn, d, dmask,
             dq, qk_scale, RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
             BW: tl.constexpr, BLOCK_N: tl.constexpr, SLICED: tl.constexpr, EVEN_D: tl.constexpr,
             DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dQ's walk of a window tile (see ``_fwd_halo``)."""
    it_lo, it_hi, wa, wb, wc, wd, we = window_setup(t0, h0, w0, lo, hi, T, H, W, RT, RH, RW, BT, BH, BW,
                                                     BLOCK_N, SLICED)
    for it in range(it_lo, it_hi):
        ktok, kvalid, mask = window_block(it, wa, wb, wc, wd, we, T, H, W, RT, RH, RW, BT, BH, BW, BLOCK_N,
                                           SLICED)
        dq = _dq_block(q, do, lse2, delta, k_base, v_base, ktok, kvalid, mask, skn, svn, d, dmask, dq, qk_scale,
                       True, EVEN_D, DOT_PREC, UPCAST)
    return dq


@triton.jit
def _dq_tile(p, b, j, head, is_window, Q, K, V, DO, DQ, LSE, DELTA,
             sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
             sdob, sdon, sdoh, sdqb, sdqn, sdqh, slb, slh, sdlb, sdlh,
             T, H, W, D, qk_scale, sm_scale,
             RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
             BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, SLICED: tl.constexpr,
             BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
             INTRA_ONLY: tl.constexpr):
    """dQ of query tile ``p``, with ``delta = rowsum(dO * O)`` from ``_bwd_delta_kernel``."""
    qtok, qvalid, t0, h0, w0, lo, hi, wf = primary_tile(p, is_window, T, H, W, RT, RH, RW, BT, BH, BW)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = load_rows(Q + b * sqb + head * sqh, qtok, sqn, qvalid, d, dmask, EVEN_D)
    do = load_rows(DO + b * sdob + head * sdoh, qtok, sdon, qvalid, d, dmask, EVEN_D)
    delta = tl.load(DELTA + b * sdlb + j * sdlh + qtok, mask=qvalid, other=0.0)
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
    store_rows(DQ + b * sdqb + head * sdqh, qtok, sdqn, qvalid, d, dmask, dq * sm_scale, EVEN_D, UPCAST)



@triton.jit
def _dkdv_block(k, v, q_base, do_base, lse_base, delta_base, qtok, qvalid, mask, sqn, sdon, d, dmask, dk, dv,
                qk_scale, MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One query block for a key tile, transposed (rows are keys); ``MASKED`` false: every query
    of the block sees every key of the tile."""
    q = load_block(q_base, qtok, sqn, qvalid, d, dmask, MASKED, EVEN_D)
    do = load_block(do_base, qtok, sdon, qvalid, d, dmask, MASKED, EVEN_D)
    if MASKED:
        lse2 = tl.load(lse_base + qtok, mask=qvalid, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + qtok, mask=qvalid, other=0.0)
    else:
        lse2 = tl.load(lse_base + qtok) * 1.4426950408889634
        delta = tl.load(delta_base + qtok)
    p_t = tl.math.exp2(mm(k, tl.trans(q), DOT_PREC, UPCAST) * qk_scale - lse2[None, :])
    if MASKED:
        p_t = tl.where(mask, p_t, 0.0)
    dv += mm(narrow(p_t, do.dtype, UPCAST), do, DOT_PREC, UPCAST)
    dp_t = mm(v, tl.trans(do), DOT_PREC, UPCAST)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += mm(narrow(ds_t, q.dtype, UPCAST), q, DOT_PREC, UPCAST)
    return dk, dv


@triton.jit
def _dkdv_frame(k, v, q_base, do_base, lse_base, delta_base, f_base, H, W, sqn, sdon, d, dmask, dk, dv, qk_scale,
                BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dK/dV's walk of an intra-frame key tile over the frame's queries (see ``_fwd_frame``)."""
    n_full, tail = frame_walk(H, W, BLOCK_N)
    for it in range(0, n_full):
        qtok = full_block(f_base, it, BLOCK_N)
        dk, dv = _dkdv_block(k, v, q_base, do_base, lse_base, delta_base, qtok, qtok, qtok, sqn, sdon, d, dmask, dk,
                             dv, qk_scale, False, EVEN_D, DOT_PREC, UPCAST)
    if tail < H * W:
        qtok, qvalid = frame_block(tail, f_base, H * W, BLOCK_N)
        dk, dv = _dkdv_block(k, v, q_base, do_base, lse_base, delta_base, qtok, qvalid, qvalid[None, :], sqn, sdon,
                             d, dmask, dk, dv, qk_scale, True, EVEN_D, DOT_PREC, UPCAST)
    return dk, dv


@triton.jit
def _dkdv_halo(k, v, q_base, do_base, lse_base, delta_base, t0, h0, w0, lo, hi, T, H, W, sqn, sdon,
               d, dmask, dk, dv, qk_scale, RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, BT: tl.constexpr,
               BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, SLICED: tl.constexpr, EVEN_D: tl.constexpr,
               DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dK/dV's walk of a window key tile over the queries of its halo (see ``_fwd_halo``)."""
    it_lo, it_hi, wa, wb, wc, wd, we = window_setup(t0, h0, w0, lo, hi, T, H, W, RT, RH, RW, BT, BH, BW,
                                                     BLOCK_N, SLICED)
    for it in range(it_lo, it_hi):
        qtok, qvalid, mask = window_block(it, wa, wb, wc, wd, we, T, H, W, RT, RH, RW, BT, BH, BW, BLOCK_N,
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
    ktok, kvalid, t0, h0, w0, lo, hi, wf = primary_tile(p, is_window, T, H, W, RT, RH, RW, BT, BH, BW)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    k = load_rows(K + b * skb + head * skh, ktok, skn, kvalid, d, dmask, EVEN_D)
    v = load_rows(V + b * svb + head * svh, ktok, svn, kvalid, d, dmask, EVEN_D)
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
    store_rows(DK + b * sdkb + head * sdkh, ktok, sdkn, kvalid, d, dmask, dk * sm_scale, EVEN_D, UPCAST)
    store_rows(DV + b * sdvb + head * sdvh, ktok, sdvn, kvalid, d, dmask, dv, EVEN_D, UPCAST)



@triton.jit(do_not_specialize=["N", "n_local", "D"])
def _bwd_delta_kernel(O, sob, son, soh, DO, sdob, sdon, sdoh, DELTA, sdlb, sdlh, HEADS, N, n_local, D,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """``delta = rowsum(dO * O)`` of ``BLOCK_M`` rows of one local head, for ``_bwd_kernel``."""
    b, j, head, _ = head_setup(HEADS, tl.program_id(1), n_local, 0)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < N
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    o = load_rows(O + b * sob + head * soh, rows, son, valid, d, dmask, EVEN_D)
    do = load_rows(DO + b * sdob + head * sdoh, rows, sdon, valid, d, dmask, EVEN_D)
    tl.store(DELTA + b * sdlb + j * sdlh + rows, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=valid)



@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _bwd_kernel(
    Q, sqb, sqn, sqh, K, skb, skn, skh, V, svb, svn, svh, DO, sdob, sdon, sdoh,
    DQ, sdqb, sdqn, sdqh, DK, sdkb, sdkn, sdkh, DV, sdvb, sdvn, sdvh, LSE, slb, slh, DELTA, sdlb, sdlh, HEADS,
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
    b, j, head, is_window = head_setup(HEADS, tl.program_id(1), n_local, n_window)
    n_tiles = tile_count(is_window, T, H, W, BT, BH, BW)
    if p < half:
        if p < n_tiles:
            _dq_tile(p, b, j, head, is_window, Q, K, V, DO, DQ, LSE, DELTA,
                     sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
                     sdob, sdon, sdoh, sdqb, sdqn, sdqh, slb, slh, sdlb, sdlh,
                     T, H, W, D, qk_scale, sm_scale, RT, RH, RW, BT, BH, BW, BLOCK_N, SLICED, BLOCK_D, EVEN_D,
                     DOT_PREC, UPCAST, INTRA_ONLY)
    elif p - half < n_tiles:
        _dkdv_tile(p - half, b, j, head, is_window, Q, K, V, DO, DK, DV, LSE, DELTA,
                   sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh,
                   sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, slb, slh, sdlb, sdlh,
                   T, H, W, D, qk_scale, sm_scale, RT, RH, RW, BT, BH, BW, BLOCK_N, SLICED, BLOCK_D, EVEN_D,
                   DOT_PREC, UPCAST, INTRA_ONLY)


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------

_fwd = Tuned(_fwd_kernel, FWD_CONFIGS)
_bwd = Tuned(_bwd_kernel, BWD_CONFIGS)
# a row reduction: one config, nothing to tune
_delta = Tuned(_bwd_delta_kernel, [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1)],
               key=["BLOCK_D"], fitting_rule=lambda configs, kwargs: configs)


def tuning_state() -> tuple:
    """What a launch's choice of config and kernels depends on besides its arguments and the
    settings: each kernel's tuning generation (a new one whenever its config list or autotuner
    is set)."""
    return (_fwd.generation, _bwd.generation, _delta.generation)


def chosen_configs() -> dict[str, dict]:
    """The config chosen per kernel and key, for debugging (``{kernel: {key: config}}``)."""
    return {name: fn.chosen() for name, fn in (("fwd", _fwd), ("bwd", _bwd), ("bwd_delta", _delta))}


def _rows(x) -> tuple:
    """A ``[B, N, heads, D]`` tensor as kernel arguments: itself, its batch, token and head strides."""
    return x, x.stride(0), x.stride(1), x.stride(2)


def _per_head(x) -> tuple:
    """A ``[B, heads, N]`` float32 tensor (unit token stride) as kernel arguments: itself, its
    batch and head strides."""
    return x, x.stride(0), x.stride(1)


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


@functools.lru_cache(maxsize=256)
def _common_args(dtype, d, grid, radii, n_local, n_window):
    # per layer shape, not per call: the launch path is host-bound at small shapes
    return dict(
        T=grid[0], H=grid[1], W=grid[2], RT=radii[0], RH=radii[1], RW=radii[2],
        n_local=n_local, n_window=n_window, **block_d(d),
        # a launch of intra heads only walks whole frames: no mask but at each frame's end
        INTRA_ONLY=n_window == 0,
        DOT_PREC="ieee" if dtype == torch.float32 else "tf32",
        UPCAST=INTERPRET and dtype == torch.bfloat16,
    )


def _launch(tuned, q, table, n_window, grid, radii, config, autotune, kinds=1):
    """The launcher of ``tuned`` for these heads, and its shape arguments. ``kinds``: programs
    per tile (``_bwd_kernel``: a dQ and a dK/dV program)."""
    count = _tiles_fn(grid, n_window > 0, n_window < table.shape[0])
    batch, n_local = q.shape[0], table.shape[0]
    programs = lambda meta: (kinds * count(meta["BT"], meta["BH"], meta["BW"]), batch * n_local)  # noqa: E731
    common = _common_args(q.dtype, q.shape[-1], tuple(grid), tuple(radii), n_local, n_window)
    return tuned.launcher(programs, config, grid_key=batch, autotune=autotune), common


def local_attention_forward(q, k, v, out, lse, table, n_window, grid, radii, scale, config=None, autotune=None):
    """Launch the forward for the heads in ``table`` (int32 ``[n_local]``: window heads, then intra).

    ``q, k, v, out``: ``[B, N, heads, D]`` with unit stride on D; ``lse``: ``[B, heads, N]``.
    ``config``: a ``triton.Config`` instead of the autotuner's choice (benchmarks/local_bench.py);
    ``autotune``: a prepared call's setting (None: the settings in force).
    """
    launch, common = _launch(_fwd, q, table, n_window, grid, radii, config, autotune)
    launch(*_rows(q), *_rows(k), *_rows(v), *_rows(out), *_per_head(lse), table,
           qk_scale=scale * LOG2E, POS_SCALE=scale > 0, **common)


def local_attention_backward_delta(dout, out, table):
    """``delta = rowsum(dO * O)`` of the heads in ``table`` (``[B, n_local, N]`` float32)."""
    b, n = out.shape[:2]
    delta = torch.empty(b, table.shape[0], n, dtype=torch.float32, device=out.device)
    _delta.launcher(lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * table.shape[0]), grid_key=(b, n))(
        *_rows(out), *_rows(dout), *_per_head(delta), table, n, table.shape[0], **block_d(out.shape[-1]))
    return delta


def local_attention_backward(dout, q, k, v, out, lse, dq, dk, dv, table, n_window, grid, radii, scale, config=None,
                             autotune=None):
    """``delta`` by its own small kernel, then dQ and dK/dV in one launch (``_bwd_kernel``).

    ``dout, dq, dk, dv``: ``[B, N, heads, D]`` with unit stride on D; ``config``, ``autotune`` as
    in the forward.
    """
    delta = local_attention_backward_delta(dout, out, table)
    launch, common = _launch(_bwd, q, table, n_window, grid, radii, config, autotune, kinds=2)
    launch(*_rows(q), *_rows(k), *_rows(v), *_rows(dout), *_rows(dq), *_rows(dk), *_rows(dv), *_per_head(lse),
           *_per_head(delta), table, qk_scale=scale * LOG2E, sm_scale=scale, **common)
