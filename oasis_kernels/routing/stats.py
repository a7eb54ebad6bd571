"""Per-head routing statistics (paper Sec. 3.3.2, Algorithm 1 line 6) with O(N) memory.

For query ``q`` of one head let ``M_g`` be its global attention row over all ``N`` keys,
``M_i`` / ``M_w`` its intra-frame / window rows (softmax over the local support ``S``, zero
outside). ``KL(M_g || M_local)`` is infinite whenever ``M_g`` puts mass outside ``S``, so the
local map is smoothed with the uniform distribution over all keys:

    M_eps = (1 - eps) * M_local + eps / N                      (eps = 1e-6 by default)

    KL_eps = sum_k M_g(k) * (log M_g(k) - log M_eps(k))
           = (E_g[s] - lse_g)                                  # sum_k M_g log M_g, s = scaled scores
             - sum_{k in S} M_g(k) * log((1-eps) exp(s_k - lse_S) + eps/N)
             - (1 - mass_S) * log(eps / N)

with ``lse_g``, ``lse_S`` the log-sum-exps of the scores over all keys and over ``S``, and
``mass_S = exp(lse_S - lse_g)`` the global attention mass inside ``S``. Why smoothing rather
than dropping the outside mass: the divergence must stay finite and keep penalising the mass a
local pattern cannot represent. Each unit of missing mass costs about ``log(N/eps)`` nats
(~24 at N = 32,400), so ranking heads by KL_eps ranks them first by the mass they would lose,
then by how well the local pattern reproduces the distribution inside its support. A
local map that covers the whole grid gives KL_eps = -log(1 - eps) ~ eps.

Two implementations: :func:`head_statistics` on the Triton kernels (``backend="triton"``,
CUDA, or CPU under ``TRITON_INTERPRET=1``; the local log-sum-exps come from the routed
attention op, on its ``auto`` backends) and the chunked torch reference
(``backend="reference"``), which computes the formula above directly from log-softmax rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..api import attention_lse
from ..inputs import unit_stride
from ..backends.triton_local import input_limits
from ..masks import WindowMask, grid_coords
from ..plan import Mode, RoutingPlan, normalize_grid, normalize_window

__all__ = ["HeadStatistics", "head_statistics", "head_statistics_reference"]

FIELDS = ("lse_global", "lse_intra", "lse_window", "mass_intra", "mass_window", "kl_intra", "kl_window")


@dataclass
class HeadStatistics:
    """Per-query statistics, each ``[B, heads, M]`` float32 (``M`` sampled queries).

    ``mean()`` averages over batch and queries: ``{field: [heads]}``.
    """

    lse_global: torch.Tensor
    lse_intra: torch.Tensor
    lse_window: torch.Tensor
    mass_intra: torch.Tensor
    mass_window: torch.Tensor
    kl_intra: torch.Tensor
    kl_window: torch.Tensor

    def mean(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f).double().mean(dim=(0, 2)) for f in FIELDS}

    @property
    def num_queries(self) -> int:
        return self.kl_intra.shape[0] * self.kl_intra.shape[2]


def _radii(grid, window):
    return tuple(min(p // 2, s - 1) for p, s in zip(window, grid))


def _check(q, k, grid, query_stride):
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise TypeError("q and k must be torch.Tensors")
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be [batch, tokens, heads, head_dim] of one shape, got {q.shape=}, {k.shape=}")
    if q.dtype != k.dtype or not q.dtype.is_floating_point:
        raise TypeError(f"q and k must share a floating dtype, got {q.dtype=}, {k.dtype=}")
    t, h, w = grid
    if q.shape[1] != t * h * w:
        raise ValueError(f"{q.shape=} has N={q.shape[1]} tokens but {grid=} holds T*H*W={t * h * w}")
    if isinstance(query_stride, bool) or not isinstance(query_stride, int) or query_stride < 1:
        raise ValueError(f"query_stride must be a positive int, got {query_stride=}")


def _assemble(lse_g, lse_i, lse_w, es_g, t_i, t_w, n, eps) -> HeadStatistics:
    mass_i = torch.exp(lse_i - lse_g)
    mass_w = torch.exp(lse_w - lse_g)
    neg_entropy = es_g - lse_g
    log_eps_n = math.log(eps / n)
    kl_i = neg_entropy - t_i - (1.0 - mass_i) * log_eps_n
    kl_w = neg_entropy - t_w - (1.0 - mass_w) * log_eps_n
    return HeadStatistics(lse_g, lse_i, lse_w, mass_i, mass_w, kl_i, kl_w)


def head_statistics(q, k, grid, window=(3, 5, 5), *, eps: float = 1e-6, query_stride: int = 1,
                    scale: float | None = None, backend: str = "auto") -> HeadStatistics:
    """Routing statistics of every head of one attention layer.

    Args:
        q, k: ``[B, N, heads, D]`` as fed to attention (after any q/k norm and RoPE).
        grid: ``(T, H, W)`` with ``N = T*H*W``; window: the window pattern's size.
        eps: smoothing of the local maps (module docstring). query_stride: use every k-th query.
        backend: ``"triton"``, ``"reference"`` or ``"auto"`` (Triton on CUDA, else the reference).
    """
    grid = normalize_grid(grid)
    window = normalize_window(window)
    _check(q, k, grid, query_stride)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps=}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # the kernels read the head dim as contiguous rows
    q, k = unit_stride(q), unit_stride(k)
    unsupported = input_limits(_radii(grid, window), q=q, k=k) if backend != "reference" else []
    if backend == "auto":
        backend = "triton" if q.is_cuda and q.dtype != torch.float64 and not unsupported else "reference"
    if backend == "triton" and unsupported:
        raise NotImplementedError(f"the Triton statistics kernels cannot take this input: {'; '.join(unsupported)}; "
                                  f"use backend='reference'")
    if backend == "reference":
        return head_statistics_reference(q, k, grid, window, eps=eps, query_stride=query_stride, scale=scale)
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r} for head_statistics; use 'auto', 'triton' or 'reference'")
    if q.dtype == torch.float64:
        raise NotImplementedError(f"the Triton statistics kernels take fp16/bf16/fp32, got {q.dtype=}; "
                                  f"use backend='reference'")
    from ..kernels.routing_stats import routing_stats_global, routing_stats_local

    radii = _radii(grid, window)
    heads, n = q.shape[2], q.shape[1]
    lse_g, es_g = routing_stats_global(q, k, scale, query_stride)
    # the local log-sum-exps come from the routed attention kernels themselves (v = k). On CUDA
    # the intra heads take auto's choice (cuDNN on large frames, docs/PERF.md entry 7); without
    # CUDA "triton" means the interpreter for every part: auto would pick PyTorch's CPU flash
    # kernel, whose LSE from bf16 inputs is ~10x less accurate (4-6e-6 relative vs 5e-7)
    local_backend = "auto" if q.is_cuda else "triton"
    lse_local = torch.stack([
        attention_lse(q, k, RoutingPlan.uniform(grid, heads, Mode.INTRA), scale=scale, backend=local_backend),
        attention_lse(q, k, RoutingPlan.uniform(grid, heads, Mode.WINDOW, window), scale=scale,
                      backend=local_backend),
    ]).float()
    if query_stride == 1:
        lse_g_all = lse_g
    else:  # +inf: the local pass then gives 0 for the queries that are not sampled
        lse_g_all = torch.full_like(lse_local[0], float("inf"))
        lse_g_all[..., ::query_stride] = lse_g
    local = routing_stats_local(q, k, lse_g_all, lse_local, grid, radii, scale, eps)[..., ::query_stride]
    lse_local = lse_local[..., ::query_stride]
    return _assemble(lse_g, lse_local[0], lse_local[1], es_g, local[0], local[1], n, eps)


def head_statistics_reference(q, k, grid, window=(3, 5, 5), *, eps: float = 1e-6, query_stride: int = 1,
                              scale: float | None = None, budget_bytes: int = 256 << 20) -> HeadStatistics:
    """The statistics straight from their definition, chunked over queries (float32, or float64
    for float64 inputs): log-softmax rows, smoothed local maps, ``sum p (log p - log M_eps)``."""
    grid = normalize_grid(grid)
    window = normalize_window(window)
    _check(q, k, grid, query_stride)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, n, nh, _ = q.shape
    ct, ch, cw = grid_coords(grid, q.device)
    rt, rh, rw = WindowMask(grid, window).radii
    queries = torch.arange(0, n, query_stride, device=q.device)
    rows = max(1, budget_bytes // (b * nh * n * 8 * 4))
    log1m_eps, log_eps_n = math.log1p(-eps), math.log(eps / n)
    out = {f: [] for f in FIELDS}
    kc = k.to(cdt)
    for start in range(0, queries.numel(), rows):
        idx = queries[start:start + rows]
        s = torch.einsum("bqhd,bkhd->bhqk", q[:, idx].to(cdt), kc) * scale
        logp = torch.log_softmax(s, dim=-1)
        p = logp.exp()
        dt = ct[idx, None] - ct[None, :]
        supports = {
            "intra": dt == 0,
            "window": (dt.abs() <= rt) & ((ch[idx, None] - ch[None, :]).abs() <= rh)
            & ((cw[idx, None] - cw[None, :]).abs() <= rw),
        }
        out["lse_global"].append(torch.logsumexp(s, dim=-1))
        for name, sup in supports.items():
            s_loc = s.masked_fill(~sup, float("-inf"))
            lse_loc = torch.logsumexp(s_loc, dim=-1)
            log_m = torch.log_softmax(s_loc, dim=-1)  # -inf outside the support
            log_m_eps = torch.logaddexp(log1m_eps + log_m, torch.full_like(log_m, log_eps_n))
            out[f"lse_{name}"].append(lse_loc)
            out[f"mass_{name}"].append((p * sup).sum(-1))
            out[f"kl_{name}"].append((p * (logp - log_m_eps)).sum(-1))
    return HeadStatistics(**{f: torch.cat(v, dim=-1).float() for f, v in out.items()})
