"""Fused elementwise passes of the Wan VAE, in Triton: ``SiLU(RMSNorm(x))`` in one read and one write.

Every residual block of the VAE runs ``x -> RMSNorm over channels -> SiLU -> causal 3x3x3 conv`` twice.
In PyTorch that pair is five or more passes over the activation, two of them in float32 (the norm is
taken in float32 for 16-bit inputs); at 720p one full-resolution activation of 33 frames is 5.8 GB in
bf16. :func:`norm_silu` reads ``x`` once and writes the bf16 result once, straight into the buffer the
convolution reads (after the causal cache's frames), so neither the float32 copies nor the
concatenation with the cache exist.

``x`` is seen as ``[B, C, S]`` with ``S`` the frames and pixels flattened: that is one stride for
both layouts the VAE uses (channels-first ``NCDHW``, stride 1, and channels-last ``NDHWC``, stride
``C``), including time slices of either. The reduction over channels runs in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the torch expression is used
    triton = None

__all__ = ["norm_silu", "norm_silu_reference", "norm_silu_triton"]

EPS = 1e-12  # F.normalize's


def norm_silu_reference(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool = True) -> torch.Tensor:
    """The torch expression (diffusers' ``WanRMS_norm`` then SiLU), rounding where it rounds."""
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = F.normalize(wide, dim=1, eps=EPS).to(x.dtype) * scale * gamma.view(-1, *([1] * (x.dim() - 2)))
    return F.silu(y) if silu else y


def _flat_stride(x: torch.Tensor) -> int | None:
    """The one stride of ``x``'s dims after the channels when they flatten to one, else None."""
    stride = None
    for i in range(x.dim() - 1, 1, -1):
        if x.shape[i] == 1:
            continue
        if stride is None:
            stride = x.stride(i)
            expect = stride * x.shape[i]
        elif x.stride(i) != expect:
            return None
        else:
            expect *= x.shape[i]
    return 1 if stride is None else stride


def usable(x: torch.Tensor, out: torch.Tensor | None = None) -> bool:
    """Whether the Triton kernel runs this case (CUDA, 16/32-bit floats, flattenable strides)."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and x.dim() >= 3 and _flat_stride(x) is not None and (out is None or _flat_stride(out) is not None))


def norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float, *, out: torch.Tensor | None = None,
              silu: bool = True) -> torch.Tensor:
    """``SiLU(x / max(||x||_C, eps) * scale * gamma)`` over dim 1 of ``x [B, C, ...]``, into ``out``
    (any strides that flatten, e.g. a time slice of a larger buffer) or a new tensor like ``x``.

    One Triton pass on CUDA; elsewhere the torch expression (:func:`norm_silu_reference`).
    """
    if usable(x, out):
        return norm_silu_triton(x, gamma, scale, out=out, silu=silu)
    y = norm_silu_reference(x, gamma, scale, silu)
    if out is None:
        return y
    out.copy_(y)
    return out


if triton is not None:
    @triton.jit
    def _norm_silu_kernel(X, G, Y, S, C, sxb, sxc, sxs, syb, syc, sys, scale, eps,
                          SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        pid_s = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        s = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
        c = tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (c[:, None] < C) & (s[None, :] < S)
        x = tl.load(X + b * sxb + c[:, None] * sxc + s[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=0)), eps)
        g = tl.load(G + c, mask=c < C, other=0.0).to(tl.float32) * scale
        y = x * inv[None, :] * g[:, None]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + b * syb + c[:, None] * syc + s[None, :] * sys, y.to(Y.dtype.element_ty), mask=mask)


def norm_silu_triton(x: torch.Tensor, gamma: torch.Tensor, scale: float, *, out: torch.Tensor | None = None,
                     silu: bool = True) -> torch.Tensor:
    """The Triton kernel itself (CUDA, or the CPU under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError("norm_silu_triton needs Triton")
    if out is None:
        out = torch.empty_like(x)
    if out.shape != x.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, x {tuple(x.shape)}")
    sx, so = _flat_stride(x), _flat_stride(out)
    if sx is None or so is None:
        raise ValueError("x and out must flatten after the channel dim (channels-first or channels-last)")
    b, c = x.shape[:2]
    s = x[0, 0].numel()
    if x.numel() == 0:
        return out
    block_c = triton.next_power_of_2(c)
    # ~8k values per program: wide enough along S to coalesce channels-first loads, few enough registers
    block_s = max(16, min(256, 8192 // block_c))
    grid = (triton.cdiv(s, block_s), b)
    _norm_silu_kernel[grid](x, gamma.reshape(-1), out, s, c, x.stride(0), x.stride(1), sx,
                            out.stride(0), out.stride(1), so, float(scale), EPS,
                            SILU=silu, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=8 if block_c >= 256 else 4)
    return out
