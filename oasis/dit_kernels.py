"""Fused row passes of the DiT block, in Triton, for inference on CUDA.

Each block's compiled regions (``WanBlock.attention_inputs`` / ``after_attention``) hold four passes
that reduce over a token's 1536 channels: the modulated LayerNorm before self-attention, q's and k's
RMSNorm with the RoPE, the gated residual with the cross-attention's LayerNorm, and the residual with
the modulated LayerNorm before the FFN. Inductor lowers each to a looped reduction that reads the row
once for its statistics and again for its output (docs/PERF.md entry 19: 1.0-1.4 TB/s at A, where a
copy runs at ~4 TB/s; at A's 32,400 tokens the rows do not stay in L2 between the two reads). Here a
program holds whole rows in registers: one read, one write.

The math and its roundings are the torch expressions' in ``oasis/dit.py`` (float32 inside, results
rounded to the activations' dtype where they round; the modulation vectors float32, as the time
projection is outside autocast: the regions take these passes only then); :func:`row_norm_reference` and
:func:`qk_norm_rope_reference` are those expressions, and tests/test_oasis_dit_kernels.py compares
the kernels against them (under ``TRITON_INTERPRET=1`` on the CPU). The regions call the fused form
only for CUDA tensors without autograd (``fused_rows_apply``); training keeps Inductor's kernels,
which have a backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the torch expressions are used
    triton = None

__all__ = ["row_norm", "row_norm_reference", "qk_norm_rope", "qk_norm_rope_reference", "fused_rows_apply"]

# what the residual input does: none; x + residual * gate in float32 (the gated residual of the
# self-attention's output); x + residual in the activations' dtype (the cross-attention's)
NO_RESIDUAL, GATED, PLAIN = 0, 1, 2


def fused_rows_apply(x: torch.Tensor) -> bool:
    """Whether the regions take the Triton passes for ``x``: CUDA, 16-bit, no autograd."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and not torch.is_grad_enabled())


def row_norm_reference(x, eps: float, residual=None, gate=None, residual_kind: int = NO_RESIDUAL,
                       weight=None, bias=None, shift=None, scale=None):
    """The torch expression: ``x [B, N, C]`` (with the residual first, ``gate [B, 1, C]`` float32 for
    GATED), LayerNorm in float32 (``weight``, ``bias``: affine), then ``* (1 + scale) + shift``
    (``[B, 1, C]`` float32) where given; returns ``(x after the residual, normed)`` in ``x.dtype``."""
    dtype = x.dtype
    if residual_kind == GATED:
        x = (x.float() + residual * gate).to(dtype)
    elif residual_kind == PLAIN:
        x = x + residual
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.layer_norm(x.float(), x.shape[-1:], w, b, eps)
    if scale is not None:
        y = y * (1 + scale) + shift
    return x, y.to(dtype)


def qk_norm_rope_reference(q, k, wq, wk, cos, sin, heads: int, eps: float):
    """q, k ``[B, N, C]`` (C = heads * D) -> their RMSNorm (float32, rounded, then times the weight in
    the input dtype) and RoPE in rotate-half order (``cos, sin [N, D/2]``, float32 inside), ``[B, N,
    heads, D]``: ``WanSelfAttention.project``'s expressions."""
    def one(x, w):
        b, n, c = x.shape
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w.to(x.dtype)
        y = y.view(b, n, heads, c // heads).float()
        a, bb = y.chunk(2, dim=-1)
        co, si = cos[None, :, None, :], sin[None, :, None, :]
        return torch.cat([a * co - bb * si, a * si + bb * co], dim=-1).to(x.dtype)

    return one(q, wq), one(k, wk)


if triton is not None:
    @triton.jit
    def _row_norm_kernel(X, R, G, W, Bias, Shift, Scale, XOut, Y, N, C, eps,
                         RESIDUAL: tl.constexpr, AFFINE: tl.constexpr, MODULATE: tl.constexpr,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        batch = row // N
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(X + row * C + cols, mask=mask, other=0.0)
        if RESIDUAL == 1:  # (x + r * gate) in float32, rounded to the activations' dtype
            r = tl.load(R + row * C + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(G + batch * C + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r * g).to(x.dtype)
            tl.store(XOut + row * C + cols, x, mask=mask)
        if RESIDUAL == 2:  # x + r in the activations' dtype
            r = tl.load(R + row * C + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(XOut + row * C + cols, x, mask=mask)
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=0) / C
        centred = tl.where(mask, xf - mean, 0.0)
        var = tl.sum(centred * centred, axis=0) / C
        y = centred * tl.rsqrt(var + eps)
        if AFFINE:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + \
                tl.load(Bias + cols, mask=mask, other=0.0).to(tl.float32)
        if MODULATE:
            y = y * (1 + tl.load(Scale + batch * C + cols, mask=mask, other=0.0)) + \
                tl.load(Shift + batch * C + cols, mask=mask, other=0.0)
        tl.store(Y + row * C + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_rope_one(X, W, Out, row, cos, sin, C, eps, HEADS: tl.constexpr, HALF: tl.constexpr,
                      HP: tl.constexpr, HALFP: tl.constexpr):
        h = tl.arange(0, HP)[:, None]  # heads and half-heads padded to powers of two, masked
        j = tl.arange(0, HALFP)[None, :]
        mask = (h < HEADS) & (j < HALF)
        first = h * (2 * HALF) + j  # channel of the first half of each head
        a = tl.load(X + row * C + first, mask=mask, other=0.0)
        b = tl.load(X + row * C + first + HALF, mask=mask, other=0.0)
        af, bf = a.to(tl.float32), b.to(tl.float32)
        r = tl.rsqrt((tl.sum(tl.sum(af * af, axis=1), axis=0) + tl.sum(tl.sum(bf * bf, axis=1), axis=0)) / C + eps)
        # rounded, times the weight in the input dtype (rounded again), then float32 for the RoPE
        wa = tl.load(W + first, mask=mask, other=0.0).to(a.dtype).to(tl.float32)
        wb = tl.load(W + first + HALF, mask=mask, other=0.0).to(a.dtype).to(tl.float32)
        a2 = ((af * r).to(a.dtype).to(tl.float32) * wa).to(a.dtype).to(tl.float32)
        b2 = ((bf * r).to(a.dtype).to(tl.float32) * wb).to(a.dtype).to(tl.float32)
        tl.store(Out + row * C + first, (a2 * cos - b2 * sin).to(a.dtype), mask=mask)
        tl.store(Out + row * C + first + HALF, (a2 * sin + b2 * cos).to(a.dtype), mask=mask)

    @triton.jit
    def _qk_norm_rope_kernel(Q, K, WQ, WK, Cos, Sin, QOut, KOut, N, C, eps,
                             HEADS: tl.constexpr, HALF: tl.constexpr, HP: tl.constexpr, HALFP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        n = row % N
        j = tl.arange(0, HALFP)[None, :]
        cos = tl.load(Cos + n * HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
        sin = tl.load(Sin + n * HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
        _rms_rope_one(Q, WQ, QOut, row, cos, sin, C, eps, HEADS, HALF, HP, HALFP)
        _rms_rope_one(K, WK, KOut, row, cos, sin, C, eps, HEADS, HALF, HP, HALFP)


def _warps(c: int) -> int:
    return 8 if c > 2048 else 4


def row_norm(x, eps: float, residual=None, gate=None, residual_kind: int = NO_RESIDUAL, weight=None,
             bias=None, shift=None, scale=None):
    """:func:`row_norm_reference` in one Triton pass (CUDA, or the CPU under ``TRITON_INTERPRET=1``);
    ``x``, ``residual`` contiguous ``[B, N, C]``; ``gate``, ``shift``, ``scale`` ``[B, 1, C]`` float32."""
    b, n, c = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    x_out = torch.empty_like(x) if residual_kind != NO_RESIDUAL else x
    dummy = x  # an unused pointer argument
    r = residual.contiguous() if residual is not None else dummy
    mod = scale is not None

    def per_batch(t):
        return t.float().expand(b, 1, c).contiguous() if t is not None else dummy

    _row_norm_kernel[(b * n,)](
        x, r, per_batch(gate), weight if weight is not None else dummy, bias if bias is not None else dummy,
        per_batch(shift), per_batch(scale), x_out, y, n, c, eps,
        RESIDUAL=residual_kind, AFFINE=weight is not None, MODULATE=mod,
        BLOCK=triton.next_power_of_2(c), num_warps=_warps(c))
    return x_out, y


def qk_norm_rope(q, k, wq, wk, cos, sin, heads: int, eps: float):
    """:func:`qk_norm_rope_reference` in one Triton pass over q's and k's rows (CUDA, or the CPU under
    ``TRITON_INTERPRET=1``); q, k contiguous ``[B, N, C]``; returns ``[B, N, heads, D]``."""
    b, n, c = q.shape
    d = c // heads
    if cos.shape != (n, d // 2) or sin.shape != (n, d // 2):
        raise ValueError(f"cos and sin must be [{n}, {d // 2}] (one row per token of q), got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    q, k = q.contiguous(), k.contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _qk_norm_rope_kernel[(b * n,)](q, k, wq, wk, cos.contiguous(), sin.contiguous(), q_out, k_out, n, c, eps,
                                   HEADS=heads, HALF=d // 2, HP=triton.next_power_of_2(heads),
                                   HALFP=triton.next_power_of_2(d // 2), num_warps=_warps(c))
    return q_out.view(b, n, heads, d), k_out.view(b, n, heads, d)
