"""Triton kernels for Attention Specialization Routing statistics (O(N) memory, exact).

The statistics (see :mod:`oasis_kernels.routing.stats`) need, per query and head: the global
log-sum-exp ``lse_g`` and the global expectation of the score ``E_g[s]`` (a pass over all keys),
the log-sum-exps of the two local supports (the routed attention kernels give those), and for
each local support ``S`` the sum ``sum_{k in S} p_g(k) * log M_eps(k)`` (a pass over ``S`` only).
Two kernels here:

* ``_stats_global_kernel``: one streaming pass over all keys for ``lse_g`` and ``E_g[s]``, with
  the probabilities and ``p * s`` in float32 (an FA-style ``P @ K`` in bf16 would round ``p``
  to 8 bits). No masks on the hot path: whole key blocks first, the ragged tail apart.
* ``_stats_local_kernel``: the local-support sums, on the geometry of the local attention
  kernels (:mod:`.tile_geometry`): window "heads" walk their tile's halo, intra ones their frame,
  all in one launch. Per score: two exp2, one log2, one FMA.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .tile_configs import INTERPRET
from .tile_geometry import (NO_SPECIALIZE, block_d, frame_block, frame_walk, full_block, head_setup, load_block,
                            load_rows, masked_scores, mm, primary_tile, tile_count, window_block, window_setup)

__all__ = ["routing_stats_global", "routing_stats_local", "CONFIG"]

LOG2E = 1.4426950408889634


@triton.jit
def _global_block(q, k_base, skn, start, N, d, dmask, m, l, e, qk_scale, BLOCK_N: tl.constexpr,
                  EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, TAIL: tl.constexpr,
                  POS_SCALE: tl.constexpr):
    """Keys ``start .. start+BLOCK_N``: online log-sum-exp (base 2) and the running sum of ``p * s``."""
    j = start + tl.arange(0, BLOCK_N)
    kvalid = j < N
    if TAIL:
        k = load_rows(k_base, tl.where(kvalid, j, 0), skn, kvalid, d, dmask, EVEN_D)
        s, c = masked_scores(mm(q, tl.trans(k), DOT_PREC, UPCAST), kvalid[None, :], qk_scale, POS_SCALE)
    else:
        if EVEN_D:
            k = tl.load(k_base + j[:, None] * skn + d[None, :])
        else:
            k = tl.load(k_base + j[:, None] * skn + d[None, :], mask=dmask[None, :], other=0.0)
        s = mm(q, tl.trans(k), DOT_PREC, UPCAST)  # a whole block: nothing to mask
        if POS_SCALE:
            c = qk_scale
        else:
            s = s * qk_scale
            c = 1.0
    # every whole block has a finite score per row, and m starts finite: no row shifts by -inf
    m_new = tl.maximum(m, tl.max(s, 1) * c)
    p = tl.math.exp2(s * c - m_new[:, None])
    alpha = tl.math.exp2(m - m_new)
    l = l * alpha + tl.sum(p, 1)
    if TAIL:
        s = tl.where(kvalid[None, :], s, 0.0)
    # e sums p * s: raw scores with a positive scale, scaled (log2 units) otherwise
    e = e * alpha + tl.sum(p * s, 1)
    return m_new, l, e


@triton.jit(do_not_specialize=["N", "M", "q_stride", "D", "n_heads"])
def _stats_global_kernel(
    Q, K, OUT, sqb, sqn, sqh, skb, skn, skh, so0, sob, soh,
    N, M, q_stride, D, n_heads, qk_scale, e_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, POS_SCALE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    head = pid_bh % n_heads
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qvalid = i < M
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = load_rows(Q + b * sqb + head * sqh, tl.where(qvalid, i * q_stride, 0), sqn, qvalid, d, dmask, EVEN_D)
    k_base = K + b * skb + head * skh

    m = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: the first block's alpha is then 0, not NaN
    l = tl.zeros([BLOCK_M], tl.float32)
    e = tl.zeros([BLOCK_M], tl.float32)  # sum of exp2(scaled score - m) * s, see _global_block
    n_full = N // BLOCK_N
    for blk in range(0, n_full):
        m, l, e = _global_block(q, k_base, skn, blk * BLOCK_N, N, d, dmask, m, l, e, qk_scale, BLOCK_N, EVEN_D,
                                DOT_PREC, UPCAST, False, POS_SCALE)
    if n_full * BLOCK_N < N:
        m, l, e = _global_block(q, k_base, skn, n_full * BLOCK_N, N, d, dmask, m, l, e, qk_scale, BLOCK_N, EVEN_D,
                                DOT_PREC, UPCAST, True, POS_SCALE)
    base = OUT + b * sob + head * soh + tl.where(qvalid, i, 0)
    tl.store(base, (m + tl.math.log2(l)) * 0.6931471805599453, mask=qvalid)
    tl.store(base + so0, e / l * e_scale, mask=qvalid)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2 on the special-function unit (``lg2.approx``, relative error ~2^-22) instead of
    libdevice's polynomial (~15 FMAs per score here); the interpreter takes the math one."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.math.log2(x)


@triton.jit
def _local_block(q, k_base, ktok, kvalid, mask, skn, d, dmask, lse_g, lse_l, acc, qk_scale, one_m_eps, eps_n,
                 MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                 FAST_LOG: tl.constexpr):
    """One key block of the local-support sums; ``MASKED`` false: every key visible to every row."""
    k = load_block(k_base, ktok, skn, kvalid, d, dmask, MASKED, EVEN_D)
    s = mm(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
    p_g = tl.math.exp2(s - lse_g[:, None])
    # log2 M_eps = log2((1 - eps) * M_local + eps / N); M_local <= 1 inside the support
    log_m = _log2(one_m_eps * tl.math.exp2(s - lse_l[:, None]) + eps_n, FAST_LOG)
    if MASKED:
        return acc + tl.sum(tl.where(mask, p_g * log_m, 0.0), 1)
    return acc + tl.sum(p_g * log_m, 1)


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _stats_local_kernel(
    Q, K, LSE_G, LSE_L, OUT, HEADS,
    sqb, sqn, sqh, skb, skn, skh, sgb, sgh, sl0, slb, slh, so0, sob, soh,
    T, H, W, n_local, n_window, D, qk_scale, one_m_eps, eps_n,
    RT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, SLICED: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    FAST_LOG: tl.constexpr,
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
    # base-2 LSEs; rows without a global LSE (unsampled queries) get +inf, so p_g = 0 there
    lse_g = tl.load(LSE_G + b * sgb + head * sgh + qtok, mask=qvalid, other=float("inf")) * 1.4426950408889634
    mode = tl.where(is_window, 1, 0)
    lse_l = tl.load(LSE_L + mode * sl0 + b * slb + head * slh + qtok, mask=qvalid, other=0.0) * 1.4426950408889634

    BLOCK_M: tl.constexpr = BT * BH * BW
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    # one branch per program into its mode's walk (as in the attention kernels)
    if is_window:
        it_lo, it_hi, wa, wb, wc, wd, we = window_setup(t0, h0, w0, lo, hi, T, H, W, RT, RH, RW, BT, BH, BW, BLOCK_N,
                                                         SLICED)
        for it in range(it_lo, it_hi):
            ktok, kvalid, mask = window_block(it, wa, wb, wc, wd, we, T, H, W, RT, RH, RW, BT, BH, BW, BLOCK_N,
                                               SLICED)
            acc = _local_block(q, k_base, ktok, kvalid, mask, skn, d, dmask, lse_g, lse_l, acc, qk_scale, one_m_eps,
                               eps_n, True, EVEN_D, DOT_PREC, UPCAST, FAST_LOG)
    else:
        n_full, tail = frame_walk(H, W, BLOCK_N)
        for it in range(0, n_full):
            ktok = full_block(wf, it, BLOCK_N)
            acc = _local_block(q, k_base, ktok, ktok, ktok, skn, d, dmask, lse_g, lse_l, acc, qk_scale, one_m_eps,
                               eps_n, False, EVEN_D, DOT_PREC, UPCAST, FAST_LOG)
        if tail < H * W:
            ktok, kvalid = frame_block(tail, wf, H * W, BLOCK_N)
            acc = _local_block(q, k_base, ktok, kvalid, kvalid[None, :], skn, d, dmask, lse_g, lse_l, acc, qk_scale,
                               one_m_eps, eps_n, True, EVEN_D, DOT_PREC, UPCAST, FAST_LOG)
    tl.store(OUT + mode * so0 + b * sob + head * soh + qtok, acc * 0.6931471805599453, mask=qvalid)


#: tile config of the global pass; benchmarks/routing_bench.py compares alternatives through it
CONFIG = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
#: tile config of the local pass (a local-attention tile and walk, see tile_geometry); the sliced
#: walk is used where the window's halo slice fits a block, else the general one
LOCAL_CONFIG = dict(BT=4, BH=4, BW=4, BLOCK_N=64, num_warps=4, num_stages=2)


def _interp(cfg, **small):
    # the interpreter runs each program in numpy: small tiles keep CPU tests fast
    return {**cfg, **small, "num_warps": 1, "num_stages": 1} if INTERPRET else dict(cfg)


def _precision(q):
    return dict(DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                UPCAST=INTERPRET and q.dtype == torch.bfloat16)


def routing_stats_global(q, k, scale, q_stride):
    """``[2, B, heads, M]`` float32 for every ``q_stride``-th query: the global log-sum-exp and
    ``E_global[score]`` (natural-log units, scores scaled)."""
    b, n, nh, d = q.shape
    m = triton.cdiv(n, q_stride)
    out = torch.empty(2, b, nh, m, dtype=torch.float32, device=q.device)
    cfg = _interp(CONFIG, BLOCK_M=32)
    launch = (triton.cdiv(m, cfg["BLOCK_M"]), b * nh)
    _stats_global_kernel[launch](
        q, k, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), N=n, M=m, q_stride=q_stride, n_heads=nh,
        qk_scale=scale * LOG2E, POS_SCALE=scale > 0, e_scale=scale if scale > 0 else 1.0 / LOG2E,
        **block_d(d), **_precision(q), **cfg,
    )
    return out


def routing_stats_local(q, k, lse_g, lse_local, grid, radii, scale, eps):
    """``[2, B, heads, N]`` float32: ``sum_{k in S} p_global(k) * log M_eps(k)`` for the intra (0) and
    window (1) supports. ``lse_g``: ``[B, heads, N]`` (+inf where not needed); ``lse_local``:
    ``[2, B, heads, N]``, the intra and window log-sum-exps."""
    b, n, nh, d = q.shape
    # every head twice: as a window head, then as an intra head (made per call: statistics are
    # gathered once per calibration batch, and one small kernel is nothing beside this one)
    table = torch.arange(nh, dtype=torch.int32, device=q.device).repeat(2)
    out = torch.empty(2, b, nh, n, dtype=torch.float32, device=q.device)
    t, h, w = grid
    # single-frame grids: 64-query tiles within the frame instead of 3/4 padding rows
    cfg = _interp(LOCAL_CONFIG if t > 1 else {**LOCAL_CONFIG, "BT": 1, "BH": 8, "BW": 8}, BT=1)
    cfg["SLICED"] = (cfg["BH"] + 2 * radii[1]) * (cfg["BW"] + 2 * radii[2]) <= cfg["BLOCK_N"]
    n_tiles = max(triton.cdiv(t, cfg["BT"]) * triton.cdiv(h, cfg["BH"]) * triton.cdiv(w, cfg["BW"]),
                  t * triton.cdiv(h * w, cfg["BT"] * cfg["BH"] * cfg["BW"]))
    _stats_local_kernel[(n_tiles, b * 2 * nh)](
        q, k, lse_g, lse_local, out, table,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        lse_g.stride(0), lse_g.stride(1), *lse_local.stride()[:3],
        out.stride(0), out.stride(1), out.stride(2),
        T=t, H=h, W=w, n_local=2 * nh, n_window=nh, qk_scale=scale * LOG2E, one_m_eps=1.0 - eps, eps_n=eps / n,
        RT=radii[0], RH=radii[1], RW=radii[2], FAST_LOG=not INTERPRET, **block_d(d), **_precision(q), **cfg,
    )
    return out
