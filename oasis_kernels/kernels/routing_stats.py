"""Triton kernels for Attention Specialization Routing statistics (O(N) memory).

For every (sampled) query and head, two streaming passes over keys, never an ``N x N`` map:

* ``_stats_lse_kernel``: one pass over all keys. Online log-sum-exp of the global row, and of
  its restrictions to the intra-frame and the window support, plus the global expectation of
  the score ``E_g[s]``. Key blocks outside the frames a query tile can see locally update the
  global sums only (one exp per score instead of three).
* ``_stats_kl_kernel``: one pass over the local frames only, accumulating
  ``sum_{k in S} p_g(k) * log M_eps(k)`` for both local supports ``S``, where
  ``M_eps = (1 - eps) * M_local + eps / N``.

The KL divergence and the masses follow in closed form (see :mod:`oasis_kernels.routing.stats`).
Query tiles are ``BLOCK_M`` consecutive sampled queries (every ``q_stride``-th token); keys are
walked in contiguous blocks of ``BLOCK_N`` tokens (t-major order makes the local frames one
contiguous token range).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .local_attention import INTERPRET, _mm

__all__ = ["routing_stats_lse", "routing_stats_kl"]

LOG2E = 1.4426950408889634


@triton.jit
def _query_tile(pid_m, M, q_stride, T, H, W, RT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sampled queries of tile ``pid_m`` and the key-block range of the frames they see locally."""
    HW = H * W
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qvalid = i < M
    tok = tl.where(qvalid, i * q_stride, 0)
    qt = tok // HW
    qh = (tok // W) % H
    qw = tok % W
    last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1
    t_first = (pid_m * BLOCK_M * q_stride) // HW
    t_last = (last * q_stride) // HW
    f0 = tl.maximum(t_first - RT, 0)
    f1 = tl.minimum(t_last + RT, T - 1)
    blk_lo = (f0 * HW) // BLOCK_N
    blk_hi = tl.cdiv((f1 + 1) * HW, BLOCK_N)
    return tok, qt, qh, qw, qvalid, blk_lo, blk_hi


@triton.jit
def _program_setup(Q, K, sqb, sqn, sqh, skb, skh, n_heads, M, q_stride, T, H, W, RT, D,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Batch, head, the query tile (loaded) and the key base pointer of this program."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    head = pid_bh % n_heads
    tok, qt, qh, qw, qvalid, blk_lo, blk_hi = _query_tile(pid_m, M, q_stride, T, H, W, RT, BLOCK_M, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(Q + b * sqb + head * sqh + tok[:, None] * sqn + d[None, :], mask=qvalid[:, None] & dmask[None, :],
                other=0.0)
    return b, head, tok, qt, qh, qw, qvalid, blk_lo, blk_hi, d, dmask, q, K + b * skb + head * skh


@triton.jit
def _key_block(start, N, H, W, BLOCK_N: tl.constexpr):
    j = start + tl.arange(0, BLOCK_N)
    kvalid = j < N
    HW = H * W
    return j, j // HW, (j // W) % H, j % W, kvalid


@triton.jit
def _online(m, l, s):
    """One block of an online log-sum-exp (base 2); rows with nothing visible yet stay at -inf."""
    m_new = tl.maximum(m, tl.max(s, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - shift[:, None])
    l = l * tl.math.exp2(m - shift) + tl.sum(p, 1)
    return m_new, l, p, shift


@triton.jit
def _lse_block(q, k_base, skn, d, dmask, blk, blk_lo, blk_hi, qt, qh, qw, m_g, l_g, e_g, m_i, l_i, m_w, l_w,
               N, H, W, RT, RH, RW, qk_scale, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
               UPCAST: tl.constexpr, TAIL: tl.constexpr):
    """One key block of the LSE pass: global sums always, local ones inside the local frames."""
    j, kt, kh, kw, kvalid = _key_block(blk * BLOCK_N, N, H, W, BLOCK_N)
    if TAIL:
        k = tl.load(k_base + j[:, None] * skn + d[None, :], mask=kvalid[:, None] & dmask[None, :], other=0.0)
    else:
        k = tl.load(k_base + j[:, None] * skn + d[None, :], mask=dmask[None, :], other=0.0)
    s = _mm(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
    if TAIL:
        s = tl.where(kvalid[None, :], s, float("-inf"))
    m_new, l_g, p, shift = _online(m_g, l_g, s)
    if TAIL:
        ps = tl.sum(p * tl.where(kvalid[None, :], s, 0.0), 1)
    else:
        ps = tl.sum(p * s, 1)
    e_g = e_g * tl.math.exp2(m_g - shift) + ps
    m_g = m_new
    if (blk >= blk_lo) & (blk < blk_hi):
        dt = qt[:, None] - kt[None, :]
        dh = qh[:, None] - kh[None, :]
        dw = qw[:, None] - kw[None, :]
        s_i = tl.where(dt == 0, s, float("-inf"))
        in_w = (dt <= RT) & (dt >= -RT) & (dh <= RH) & (dh >= -RH) & (dw <= RW) & (dw >= -RW)
        s_w = tl.where(in_w, s, float("-inf"))
        m_i, l_i, _, _ = _online(m_i, l_i, s_i)
        m_w, l_w, _, _ = _online(m_w, l_w, s_w)
    return m_g, l_g, e_g, m_i, l_i, m_w, l_w


@triton.jit(do_not_specialize=["T", "H", "W", "RT", "RH", "RW", "N", "M", "q_stride", "D", "n_heads"])
def _stats_lse_kernel(
    Q, K, OUT, sqb, sqn, sqh, skb, skn, skh, so0, sob, soh,
    T, H, W, RT, RH, RW, N, M, q_stride, D, n_heads, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    b, head, tok, qt, qh, qw, qvalid, blk_lo, blk_hi, d, dmask, q, k_base = _program_setup(
        Q, K, sqb, sqn, sqh, skb, skh, n_heads, M, q_stride, T, H, W, RT, D, BLOCK_M, BLOCK_N, BLOCK_D)

    m_g = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_g = tl.zeros([BLOCK_M], tl.float32)
    e_g = tl.zeros([BLOCK_M], tl.float32)  # sum of exp2(s - m_g) * s: gives E_g[s]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_w = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_w = tl.zeros([BLOCK_M], tl.float32)
    # whole blocks first (no bounds mask on the hot path), then the ragged tail
    n_full = N // BLOCK_N
    for blk in range(0, n_full):
        m_g, l_g, e_g, m_i, l_i, m_w, l_w = _lse_block(
            q, k_base, skn, d, dmask, blk, blk_lo, blk_hi, qt, qh, qw, m_g, l_g, e_g, m_i, l_i, m_w, l_w,
            N, H, W, RT, RH, RW, qk_scale, BLOCK_N, DOT_PREC, UPCAST, False)
    if n_full * BLOCK_N < N:
        m_g, l_g, e_g, m_i, l_i, m_w, l_w = _lse_block(
            q, k_base, skn, d, dmask, n_full, blk_lo, blk_hi, qt, qh, qw, m_g, l_g, e_g, m_i, l_i, m_w, l_w,
            N, H, W, RT, RH, RW, qk_scale, BLOCK_N, DOT_PREC, UPCAST, True)

    # padding rows (not stored) have l = 0; keep their log finite
    l_g = tl.where(qvalid, l_g, 1.0)
    l_i = tl.where(qvalid, l_i, 1.0)
    l_w = tl.where(qvalid, l_w, 1.0)
    base = OUT + b * sob + head * soh + tl.where(qvalid, tok // q_stride, 0)
    tl.store(base, (m_g + tl.math.log2(l_g)) * 0.6931471805599453, mask=qvalid)
    tl.store(base + so0, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=qvalid)
    tl.store(base + 2 * so0, (m_w + tl.math.log2(l_w)) * 0.6931471805599453, mask=qvalid)
    tl.store(base + 3 * so0, e_g / l_g * 0.6931471805599453, mask=qvalid)


@triton.jit(do_not_specialize=["T", "H", "W", "RT", "RH", "RW", "N", "M", "q_stride", "D", "n_heads"])
def _stats_kl_kernel(
    Q, K, LSE, OUT, sqb, sqn, sqh, skb, skn, skh, sl0, slb, slh, so0, sob, soh,
    T, H, W, RT, RH, RW, N, M, q_stride, D, n_heads, qk_scale, log1m_eps, log_eps_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    b, head, tok, qt, qh, qw, qvalid, blk_lo, blk_hi, d, dmask, q, k_base = _program_setup(
        Q, K, sqb, sqn, sqh, skb, skh, n_heads, M, q_stride, T, H, W, RT, D, BLOCK_M, BLOCK_N, BLOCK_D)
    idx = tl.where(qvalid, tok // q_stride, 0)
    lbase = LSE + b * slb + head * slh + idx
    # log2-unit LSEs: scores below are in log2 units too
    lse_g = tl.load(lbase, mask=qvalid, other=0.0) * 1.4426950408889634
    lse_i = tl.load(lbase + sl0, mask=qvalid, other=0.0) * 1.4426950408889634
    lse_w = tl.load(lbase + 2 * sl0, mask=qvalid, other=0.0) * 1.4426950408889634

    acc_i = tl.zeros([BLOCK_M], tl.float32)
    acc_w = tl.zeros([BLOCK_M], tl.float32)
    for blk in range(blk_lo, blk_hi):
        j, kt, kh, kw, kvalid = _key_block(blk * BLOCK_N, N, H, W, BLOCK_N)
        k = tl.load(k_base + j[:, None] * skn + d[None, :], mask=kvalid[:, None] & dmask[None, :], other=0.0)
        s = _mm(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        p_g = tl.math.exp2(s - lse_g[:, None])
        dt = qt[:, None] - kt[None, :]
        dh = qh[:, None] - kh[None, :]
        dw = qw[:, None] - kw[None, :]
        in_i = (dt == 0) & kvalid[None, :]
        in_w = (dt <= RT) & (dt >= -RT) & (dh <= RH) & (dh >= -RH) & (dw <= RW) & (dw >= -RW) & kvalid[None, :]
        # log M_eps = logaddexp(log(1-eps) + log M_local, log(eps/N)), natural log
        a_i = log1m_eps + (s - lse_i[:, None]) * 0.6931471805599453
        a_w = log1m_eps + (s - lse_w[:, None]) * 0.6931471805599453
        hi_i = tl.maximum(a_i, log_eps_n)
        hi_w = tl.maximum(a_w, log_eps_n)
        lm_i = hi_i + tl.log(1.0 + tl.exp(-tl.abs(a_i - log_eps_n)))
        lm_w = hi_w + tl.log(1.0 + tl.exp(-tl.abs(a_w - log_eps_n)))
        acc_i += tl.sum(tl.where(in_i, p_g * lm_i, 0.0), 1)
        acc_w += tl.sum(tl.where(in_w, p_g * lm_w, 0.0), 1)

    obase = OUT + b * sob + head * soh + idx
    tl.store(obase, acc_i, mask=qvalid)
    tl.store(obase + so0, acc_w, mask=qvalid)


#: tile config of both passes; benchmarks/routing_bench.py compares alternatives through it
CONFIG = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8)


def _cfg():
    # the interpreter runs each program in numpy: small tiles keep CPU tests fast
    return dict(BLOCK_M=32, BLOCK_N=64, num_warps=1) if INTERPRET else dict(CONFIG)


def _common(q, grid, radii):
    d = q.shape[-1]
    return dict(
        T=grid[0], H=grid[1], W=grid[2], RT=radii[0], RH=radii[1], RW=radii[2], N=q.shape[1], D=d,
        n_heads=q.shape[2], BLOCK_D=max(16, triton.next_power_of_2(d)),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=INTERPRET and q.dtype == torch.bfloat16,
    )


def routing_stats_lse(q, k, grid, radii, scale, q_stride):
    """``[4, B, heads, M]`` float32: lse_global, lse_intra, lse_window, E_global[score] (natural log units)."""
    b, n, nh, _ = q.shape
    m = triton.cdiv(n, q_stride)
    out = torch.empty(4, b, nh, m, dtype=torch.float32, device=q.device)
    cfg = _cfg()
    launch = (triton.cdiv(m, cfg["BLOCK_M"]), b * nh)
    _stats_lse_kernel[launch](
        q, k, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), M=m, q_stride=q_stride, qk_scale=scale * LOG2E,
        **_common(q, grid, radii), **cfg,
    )
    return out


def routing_stats_kl(q, k, lse, grid, radii, scale, q_stride, eps):
    """``[2, B, heads, M]`` float32: sum over each local support of ``p_global * log M_eps``."""
    b, n, nh, _ = q.shape
    m = lse.shape[-1]
    out = torch.empty(2, b, nh, m, dtype=torch.float32, device=q.device)
    cfg = _cfg()
    launch = (triton.cdiv(m, cfg["BLOCK_M"]), b * nh)
    _stats_kl_kernel[launch](
        q, k, lse, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2), out.stride(0), out.stride(1), out.stride(2),
        M=m, q_stride=q_stride, qk_scale=scale * LOG2E, log1m_eps=math.log1p(-eps), log_eps_n=math.log(eps / n),
        **_common(q, grid, radii), **cfg,
    )
    return out
