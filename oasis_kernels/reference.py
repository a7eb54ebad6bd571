"""Reference attention for routed heads.

Two implementations of the same function:

* :func:`dense_reference` materializes every head's ``[N, N]`` mask and runs plain
  softmax attention, by default in float64. It is obviously right and only fit for tests
  and small debugging cases (memory grows as ``N**2``).
* :func:`box_attention_forward` / :func:`box_attention_backward` compute one head group of
  a box-shaped pattern (global, intra-frame or window, see :mod:`oasis_kernels.masks`)
  chunk by chunk in float32 (float64 for float64 inputs), on any device, with memory
  bounded by ``budget_bytes``. Backward is explicit (FlashAttention's recomputation from
  the log-sum-exp) so it is memory-bounded too. This is the ``"reference"`` backend.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from .masks import BoxMask, grid_coords, plan_masks
from .plan import RoutingPlan

__all__ = ["dense_reference", "box_attention_forward", "box_attention_backward"]


def dense_reference(q, k, v, plan: RoutingPlan, scale: float | None = None, *, upcast: bool = True):
    """Dense masked attention, one materialized mask per head. Tests only.

    Args:
        q, k, v: ``[B, N, heads, D]``.
        upcast: compute in float64 (the ground truth); with False, compute in the input
            dtype the way plain PyTorch code would (scores and probabilities in the input
            dtype, softmax accumulated in float32 by PyTorch), which is the baseline error
            of the tolerance rule.

    Returns:
        ``(out [B, N, heads, D], lse [B, heads, N] float32/float64)``; differentiable.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dtype = torch.float64 if upcast else q.dtype
    qh, kh, vh = (rearrange(x.to(dtype), "b n h d -> b h n d") for x in (q, k, v))
    masks = torch.stack([m.materialize(q.device) for m in plan_masks(plan)])  # [heads, N, N]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~masks, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    out = rearrange(torch.matmul(probs.to(vh.dtype), vh), "b h n d -> b n h d")
    return out.to(q.dtype) if not upcast else out, lse


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every input dtype but float64 (math, log-sum-exp and accumulators)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _query_chunks(mask: BoxMask, batch_heads: int, budget_bytes: int, elt: int):
    """Yield ``(q0, q1, k0, k1, needs_mask)``: query token range, key token range.

    Query chunks never straddle frames, so their keys are a contiguous range of frames.
    """
    t_size, h_size, w_size = mask.grid
    rt, rh, rw = mask.radii
    hw = h_size * w_size
    for t in range(t_size):
        kf0, kf1 = max(0, t - rt), min(t_size, t + rt + 1)
        k0, k1 = kf0 * hw, kf1 * hw
        n_keys = k1 - k0
        rows = max(1, budget_bytes // max(1, batch_heads * n_keys * elt * 3))
        needs_mask = rh < h_size - 1 or rw < w_size - 1
        for q0 in range(t * hw, (t + 1) * hw, rows):
            yield q0, min(q0 + rows, (t + 1) * hw), k0, k1, needs_mask


def _chunk_mask(mask: BoxMask, q0, q1, k0, k1, device):
    ct, ch, cw = grid_coords(mask.grid, device)
    _, rh, rw = mask.radii
    # keys are whole frames within the time radius, so only h and w need testing
    return ((ch[q0:q1, None] - ch[None, k0:k1]).abs() <= rh) & ((cw[q0:q1, None] - cw[None, k0:k1]).abs() <= rw)


def box_attention_forward(q, k, v, mask: BoxMask, scale: float, budget_bytes: int = 256 << 20,
                          compute_dtype: torch.dtype | None = None):
    """Chunked forward of one head group. ``q, k, v``: ``[B, N, h, D]`` (any strides).

    ``compute_dtype`` defaults to float32 (float64 for float64 inputs); tests pass the input
    dtype to get plain low-precision PyTorch math at sizes the dense reference cannot reach.

    Returns ``(out [B, N, h, D] in q.dtype, lse [B, h, N] float32 or float64)``.
    """
    b, n, h, d = q.shape
    cdt = compute_dtype or accumulate_dtype(q.dtype)
    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, n, dtype=accumulate_dtype(q.dtype), device=q.device)
    elt = max(4, cdt.itemsize)
    for q0, q1, k0, k1, needs_mask in _query_chunks(mask, b * h, budget_bytes, elt):
        qc = q[:, q0:q1].to(cdt)
        kc = k[:, k0:k1].to(cdt)
        vc = v[:, k0:k1].to(cdt)
        s = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
        if needs_mask:
            s = s.masked_fill(~_chunk_mask(mask, q0, q1, k0, k1, q.device), float("-inf"))
        m = torch.logsumexp(s.float() if cdt.itemsize < 4 else s, dim=-1).to(cdt)  # finite: a query sees itself
        p = torch.exp(s - m[..., None])
        out[:, q0:q1] = torch.einsum("bhqk,bkhd->bqhd", p, vc).to(q.dtype)
        lse[:, :, q0:q1] = m.to(lse.dtype)
    return out, lse


def box_attention_backward(dout, q, k, v, out, lse, mask: BoxMask, scale: float, budget_bytes: int = 256 << 20,
                           compute_dtype: torch.dtype | None = None):
    """Chunked backward of :func:`box_attention_forward`: returns ``(dq, dk, dv)`` in q.dtype."""
    b, n, h, d = q.shape
    cdt = compute_dtype or accumulate_dtype(q.dtype)
    # accumulate across chunks in at least float32, as one dense matmul would
    acc = accumulate_dtype(cdt)
    dq = torch.empty(b, n, h, d, dtype=acc, device=q.device)
    dk = torch.zeros(b, n, h, d, dtype=acc, device=q.device)
    dv = torch.zeros(b, n, h, d, dtype=acc, device=q.device)
    elt = max(4, cdt.itemsize)
    # delta_i = sum_d dO_i * O_i: the softmax backward's row term
    delta = (dout.to(cdt) * out.to(cdt)).sum(-1).transpose(1, 2)  # [B, h, N]
    for q0, q1, k0, k1, needs_mask in _query_chunks(mask, b * h, budget_bytes, elt):
        qc, doc = q[:, q0:q1].to(cdt), dout[:, q0:q1].to(cdt)
        kc, vc = k[:, k0:k1].to(cdt), v[:, k0:k1].to(cdt)
        s = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
        if needs_mask:
            s = s.masked_fill(~_chunk_mask(mask, q0, q1, k0, k1, q.device), float("-inf"))
        p = torch.exp(s - lse[:, :, q0:q1, None].to(cdt))
        dp = torch.einsum("bqhd,bkhd->bhqk", doc, vc)
        ds = p * (dp - delta[:, :, q0:q1, None])
        dq[:, q0:q1] = torch.einsum("bhqk,bkhd->bqhd", ds, kc) * scale
        dk[:, k0:k1] += torch.einsum("bhqk,bqhd->bkhd", ds, qc) * scale
        dv[:, k0:k1] += torch.einsum("bhqk,bqhd->bkhd", p, doc)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)
