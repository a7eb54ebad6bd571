"""Fused elementwise passes of the Wan VAE, in Triton: ``SiLU(RMSNorm(x + bias))`` in one read and one
write (:func:`norm_silu`), a convolution's bias plus a residual in place (:func:`add_bias_`), and the
four phases of a 2x nearest resize followed by a 3x3 convolution woven into one image
(:func:`interleave_phases`); and the encoder's first
convolution, from 3 channels (:func:`conv3d_few_in`), and the middle block's one-head attention of
D = 384 (:func:`attention_wide`).

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

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the torch expression is used
    triton = None

__all__ = ["norm_silu", "norm_silu_reference", "norm_silu_triton", "add_bias_", "interleave_phases",
           "conv3d_few_in", "attention_usable", "attention_wide", "kept_per_tensor",
           "forget_kept"]

EPS = 1e-12  # F.normalize's


_KEPT = WeakIdKeyDictionary()  # tensor -> (its version, data pointer, tag, what was made of it), gone with the tensor


def kept_per_tensor(t: torch.Tensor, make, tag=None) -> torch.Tensor:
    """``make(t.detach())``, kept per tensor (and ``tag``) until it changes (its version counter or storage): a
    layer's weight in the form a kernel reads, converted once, not per call.

    Changes that bypass the version counter are not seen: writes through ``t.data`` (``p.data.copy_(...)``,
    ``p.data.mul_(...)``) leave the kept form stale; change weights in place under ``torch.no_grad()`` on the
    parameter itself (as ``load_state_dict`` does), or call :func:`forget_kept` after such writes. A tensor made
    under ``torch.inference_mode()`` has no version counter: its form is made anew at every call."""
    if t.is_inference():
        return make(t.detach())
    hit = _KEPT.get(t)
    if hit is not None and hit[:3] == (t._version, t.data_ptr(), tag):
        return hit[3]
    made = make(t.detach())
    _KEPT[t] = (t._version, t.data_ptr(), tag, made)
    return made


def forget_kept() -> None:
    """Drop every form :func:`kept_per_tensor` keeps (after weights were written through ``.data``, or to free
    the GPU copies of a model moved off the GPU: ~5 MB for Wan2.1's VAE)."""
    _KEPT.clear()


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(-1, *([1] * (ndim - 2)))


def norm_silu_reference(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool = True,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The torch expression (diffusers' ``WanRMS_norm`` then SiLU), rounding where it rounds; ``bias``
    (per channel) is the producing convolution's, added first as the convolution would."""
    if bias is not None:
        x = x + _per_channel(bias, x.dim())
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = F.normalize(wide, dim=1, eps=EPS).to(x.dtype) * scale * _per_channel(gamma, x.dim())
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


def on_triton_device(x: torch.Tensor) -> bool:
    """Where the Triton passes run: CUDA tensors (tests also route CPU tensors here under the interpreter)."""
    return triton is not None and x.is_cuda


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def usable(x: torch.Tensor, out: torch.Tensor | None = None, *others) -> bool:
    """Whether the Triton kernels run this case: on their device, 16/32-bit floats, strides that
    flatten, and no autograd needed (the kernels write raw memory; with gradients wanted, e.g.
    through the frozen decoder to the latents, the torch expressions run)."""
    return (on_triton_device(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and x.dim() >= 3 and _flat_stride(x) is not None and (out is None or _flat_stride(out) is not None)
            and not _needs_grad(x, out, *others))


def norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float, *, out: torch.Tensor | None = None,
              silu: bool = True, bias: torch.Tensor | None = None, tail: torch.Tensor | None = None,
              residual: torch.Tensor | None = None, sum_out: torch.Tensor | None = None) -> torch.Tensor:
    """``SiLU(y / max(||y||_C, eps) * scale * gamma)`` with ``y = x + bias`` over dim 1 of ``x [B, C, ...]``,
    into ``out`` (any strides that flatten, e.g. a time slice of a larger buffer) or a new tensor.

    ``tail``: ``[B, C, k, ...]``, also given the result's last ``k`` frames (the causal cache a
    convolution keeps for its next call, written in the same pass instead of copied after it).
    ``residual``: ``y`` is then ``x + bias + residual`` as :func:`add_bias_` would store it (rounded to
    ``x``'s dtype), the same bits as that pass followed by this one; ``sum_out`` (may be ``x`` itself) is given
    that ``y``: a residual block's output summed and normalised for the next block in one pass.
    One pass on CUDA: the CUDA kernel where :func:`oasis.vae_cuda.norm_why_not` allows (Hopper, channels-last 16-bit,
    docs/PERF.md entry 18y), else the Triton kernel; elsewhere the torch expression (:func:`norm_silu_reference`).
    """
    if sum_out is not None and residual is None:
        raise ValueError("sum_out is written only with a residual")
    for name, t in (("residual", residual), ("sum_out", sum_out)):
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} must be x's shape {tuple(x.shape)}, dtype and device, got {tuple(t.shape)} "
                             f"({t.dtype} on {t.device})")
    if x.is_cuda:  # the CUDA pass where it takes the call (Hopper, channels-last 16-bit), else Triton's
        from . import vae_cuda  # (here: vae_cuda imports this module)

        dest = torch.empty_like(x) if out is None else out
        if vae_cuda.norm_why_not(x, out=dest, residual=residual, sum_out=sum_out, tail=tail,
                                 inputs=(gamma, bias)) is None:
            if tail is not None:
                _check_tail(tail, dest)
            return vae_cuda._norm_silu_checked(x, gamma, scale, dest, silu, bias, tail, residual, sum_out, EPS)
    if (usable(x, out, gamma, bias, residual, sum_out) and (tail is None or _flat_stride(tail) is not None)
            and all(t is None or _flat_stride(t) is not None for t in (residual, sum_out))):
        return norm_silu_triton(x, gamma, scale, out=out, silu=silu, bias=bias, tail=tail, residual=residual,
                                sum_out=sum_out)
    if residual is not None:  # the sum first, as its own pass stores it
        x = add_bias_(x.clone() if sum_out is None else sum_out.copy_(x), bias, residual)
        bias = None
    y = norm_silu_reference(x, gamma, scale, silu, bias)
    if out is not None:
        out.copy_(y)
        y = out
    if tail is not None:
        _check_tail(tail, y)
        tail.copy_(y[:, :, y.shape[2] - tail.shape[2]:])
    return y


def _check_tail(tail: torch.Tensor, like: torch.Tensor) -> None:
    if (like.dim() < 3 or tail.dim() != like.dim() or tail.shape[:2] != like.shape[:2]
            or tail.shape[3:] != like.shape[3:] or not 0 < tail.shape[2] <= like.shape[2]
            or tail.dtype != like.dtype or tail.device != like.device):
        raise ValueError(f"tail must be [B, C, k, ...] with 0 < k <= {like.shape[2] if like.dim() > 2 else 0} frames "
                         f"of the output {tuple(like.shape)} ({like.dtype} on {like.device}), got "
                         f"{tuple(tail.shape)} ({tail.dtype} on {tail.device})")


if triton is not None:
    @triton.jit
    def _norm_silu_kernel(X, G, Bias, Y, T, R, Z, S, C, sxb, sxc, sxs, syb, syc, sys, tail_start, stb, stc, sts,
                          srb, src, srs, szb, szc, szs, scale, eps, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_TAIL: tl.constexpr, HAS_RES: tl.constexpr, HAS_SUM: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        pid_s = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        s = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
        c = tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (c[:, None] < C) & (s[None, :] < S)
        x = tl.load(X + b * sxb + c[:, None] * sxc + s[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x = tl.where(mask, x + tl.load(Bias + c, mask=c < C, other=0.0).to(tl.float32)[:, None], 0.0)
        if HAS_RES:  # add_bias_'s sum, rounded as that pass stores it
            x += tl.load(R + b * srb + c[:, None] * src + s[None, :] * srs, mask=mask, other=0.0).to(tl.float32)
            x = x.to(X.dtype.element_ty)
            if HAS_SUM:
                tl.store(Z + b * szb + c[:, None] * szc + s[None, :] * szs, x, mask=mask)
            x = x.to(tl.float32)
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=0)), eps)
        g = tl.load(G + c, mask=c < C, other=0.0).to(tl.float32) * scale
        y = x * inv[None, :] * g[:, None]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + b * syb + c[:, None] * syc + s[None, :] * sys, y.to(Y.dtype.element_ty), mask=mask)
        if HAS_TAIL:  # the last frames again, into the cache's tensor
            st = s - tail_start
            tl.store(T + b * stb + c[:, None] * stc + st[None, :] * sts, y.to(T.dtype.element_ty),
                     mask=mask & (st[None, :] >= 0))


def norm_silu_triton(x: torch.Tensor, gamma: torch.Tensor, scale: float, *, out: torch.Tensor | None = None,
                     silu: bool = True, bias: torch.Tensor | None = None, tail: torch.Tensor | None = None,
                     residual: torch.Tensor | None = None, sum_out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel itself (CUDA, or the CPU under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError("norm_silu_triton needs Triton")
    if out is None:
        out = torch.empty_like(x)
    if out.shape != x.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, x {tuple(x.shape)}")
    for name, v in (("gamma", gamma), ("bias", bias)):
        if v is not None and (v.numel() != x.shape[1] or v.device != x.device):
            raise ValueError(f"{name} must hold one value per channel ({x.shape[1]}) on {x.device}, got "
                             f"{v.numel()} on {v.device}")
    if sum_out is not None and residual is None:
        raise ValueError("sum_out is written only with a residual")
    for name, t in (("residual", residual), ("sum_out", sum_out)):
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype or _flat_stride(t) is None):
            raise ValueError(f"{name} must be x's shape {tuple(x.shape)} and dtype, flattening after the channel "
                             f"dim, got {tuple(t.shape)} ({t.dtype})")
    sx, so = _flat_stride(x), _flat_stride(out)
    if sx is None or so is None:
        raise ValueError("x and out must flatten after the channel dim (channels-first or channels-last)")
    if tail is not None:
        _check_tail(tail, out)
        if _flat_stride(tail) is None:
            raise ValueError("tail must flatten after the channel dim (channels-first or channels-last)")
    b, c = x.shape[:2]
    s = x[0, 0].numel()
    if x.numel() == 0:
        return out
    t = out if tail is None else tail
    r = x if residual is None else residual
    z = x if sum_out is None else sum_out
    block_c, block_s = _channel_tiles(c)
    grid = (triton.cdiv(s, block_s), b)
    _norm_silu_kernel[grid](x, gamma.reshape(-1), x if bias is None else bias, out, t, r, z, s, c, x.stride(0),
                            x.stride(1), sx, out.stride(0), out.stride(1), so, s - t[0, 0].numel(), t.stride(0),
                            t.stride(1), _flat_stride(t), r.stride(0), r.stride(1), _flat_stride(r), z.stride(0),
                            z.stride(1), _flat_stride(z), float(scale), EPS, SILU=silu, HAS_BIAS=bias is not None,
                            HAS_TAIL=tail is not None, HAS_RES=residual is not None, HAS_SUM=sum_out is not None,
                            BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_norm_warps(block_c))
    return out


def _norm_warps(block_c: int) -> int:
    """The norm pass's warps for a tile of ``block_c`` channels."""
    return 8 if block_c >= 256 else 4


def _channel_tiles(c: int) -> tuple[int, int]:
    """(channels, positions) of one program's ``[C, S]`` tile: all channels, and ~8k values in all: wide
    enough along S to coalesce channels-first loads, few enough registers."""
    block_c = triton.next_power_of_2(c)
    return block_c, max(16, min(256, 8192 // block_c))


def add_bias_(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x += bias[c] (+ residual)`` in place: a convolution's bias (computed without it) and a residual
    branch in one pass. PyTorch adds a convolution's bias as a broadcast that does not vectorise over
    channels-last outputs (0.1 s of a 0.85 s decode at 720p); this reads and writes ``x`` once."""
    if bias is None and residual is None:
        return x
    if usable(x, residual, bias) and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape)):
        b, c = x.shape[:2]
        s = x[0, 0].numel()
        if x.numel():
            block_c, block_s = _channel_tiles(c)
            r = x if residual is None else residual
            _add_bias_kernel[(triton.cdiv(s, block_s), b)](
                x, x if bias is None else bias, r, s, c, x.stride(0), x.stride(1), _flat_stride(x),
                r.stride(0), r.stride(1), _flat_stride(r), HAS_BIAS=bias is not None,
                HAS_RES=residual is not None, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
        return x
    if bias is not None:
        x.add_(_per_channel(bias, x.dim()))
    if residual is not None:
        x.add_(residual)
    return x


if triton is not None:
    @triton.jit
    def _add_bias_kernel(X, Bias, R, S, C, sxb, sxc, sxs, srb, src, srs,
                         HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        pid_s = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        s = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
        c = tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (c[:, None] < C) & (s[None, :] < S)
        ptr = X + b * sxb + c[:, None] * sxc + s[None, :] * sxs
        x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(Bias + c, mask=c < C, other=0.0).to(tl.float32)[:, None]
        if HAS_RES:
            x += tl.load(R + b * srb + c[:, None] * src + s[None, :] * srs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr, x.to(X.dtype.element_ty), mask=mask)


def _channels_last_image(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last)


def interleave_phases(o: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The four phases of a 2x nearest upsampling followed by a 3x3 convolution woven into one image, plus
    the convolution's bias: ``o [N, 4 Co, H + 1, W + 1]`` -> ``[N, Co, 2H, 2W]``.

    ``o`` is the 2x2 convolution of :func:`oasis.vae_conv.upsample2x_conv3x3`: channel ``(2a + b) Co + c`` at
    pixel ``(i + a, j + b)`` is output channel ``c`` at pixel ``(2i + a, 2j + b)``. One Triton pass on CUDA
    (channels-last ``o``; the bias added in float32 and rounded once, as :func:`add_bias_` does); elsewhere,
    or with gradients wanted, :func:`interleave_phases_reference`."""
    if (o.dim() != 4 or o.shape[1] % 4 or o.shape[2] < 2 or o.shape[3] < 2
            or (bias is not None and (bias.numel() != o.shape[1] // 4 or bias.device != o.device))):
        raise ValueError(f"interleave_phases takes [N, 4 Co, H + 1, W + 1] with H, W >= 1 and Co biases, got "
                         f"{tuple(o.shape)} and bias {None if bias is None else tuple(bias.shape)}")
    if _channels_last_image(o) and on_triton_device(o) and o.dtype in (torch.float16, torch.bfloat16, torch.float32) \
            and not _needs_grad(o, bias):
        return interleave_phases_triton(o, bias)
    return interleave_phases_reference(o, bias)


def interleave_phases_reference(o: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The torch expression of :func:`interleave_phases` (differentiable), in ``o``'s layout."""
    n, c4, h1, w1 = o.shape
    co, h, w = c4 // 4, h1 - 1, w1 - 1
    rows = [torch.stack([o[:, (2 * a + b) * co:(2 * a + b + 1) * co, a:a + h, b:b + w] for b in (0, 1)], dim=-1)
            for a in (0, 1)]
    y = torch.stack(rows, dim=3).reshape(n, co, 2 * h, 2 * w)  # [N, Co, H, a, W, b] -> rows 2i + a, columns 2j + b
    if bias is not None:
        y = y + _per_channel(bias, 4).to(y.dtype)
    fmt = torch.channels_last if _channels_last_image(o) else torch.contiguous_format
    return y.contiguous(memory_format=fmt)


def interleave_phases_triton(o: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel of :func:`interleave_phases` (channels-last ``o``; CUDA or the interpreter)."""
    if not _channels_last_image(o):
        raise ValueError(f"interleave_phases_triton takes a channels-last [N, 4 Co, H + 1, W + 1], got strides "
                         f"{o.stride()} for shape {tuple(o.shape)}")
    n, c4, h1, w1 = o.shape
    co, h, w = c4 // 4, h1 - 1, w1 - 1
    out = torch.empty((n, co, 2 * h, 2 * w), dtype=o.dtype, device=o.device, memory_format=torch.channels_last)
    pixels = n * h * w
    if pixels == 0 or co == 0:
        return out
    block_c = triton.next_power_of_2(co)
    block_p = max(1, min(64, 4096 // block_c))
    _interleave_phases_kernel[(triton.cdiv(pixels, block_p),)](
        o, o if bias is None else bias, out, pixels, h, w, co, HAS_BIAS=bias is not None, BLOCK_P=block_p,
        BLOCK_C=block_c, num_warps=4)
    return out


if triton is not None:
    @triton.jit
    def _interleave_phases_kernel(O, Bias, Y, P, H, W, C, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr,
                                  BLOCK_C: tl.constexpr):
        # one program: BLOCK_P low-resolution positions (img, i, j), each giving its four output pixels
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        c = tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (p[:, None] < P) & (c[None, :] < C)
        img = p // (H * W)
        i = (p // W) % H
        j = p % W
        if HAS_BIAS:
            bias = tl.load(Bias + c, mask=c < C, other=0.0).to(tl.float32)
        for a in tl.static_range(2):
            for b in tl.static_range(2):
                src = (img * (H + 1) + i + a) * (W + 1) + j + b
                v = tl.load(O + src[:, None] * (4 * C) + (2 * a + b) * C + c[None, :], mask=mask)
                if HAS_BIAS:
                    v = (v.to(tl.float32) + bias[None, :]).to(Y.dtype.element_ty)
                dst = (img * 2 * H + 2 * i + a) * (2 * W) + 2 * j + b
                tl.store(Y + dst[:, None] * C + c[None, :], v, mask=mask)


def conv3d_few_in(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 3D convolution from at most 4 input channels, for the encoder's first one (3 -> 96, 3x3x3):
    ``F.conv3d(x, weight, bias, padding=(0, kh // 2, kw // 2))`` (no time padding: ``x`` holds the
    causal cache's frames in front) for channels-last ``x [B, C, T, H, W]`` whose pixels follow each other
    (``x.stride(4) == C``; a time slice of a buffer is); the output channels-last.

    cuDNN runs this convolution at ~22 TFLOP/s on the H200 (2.3 ms for 4 frames at 720p, whose 96-channel
    output is 0.7 GB: ~0.2 ms to write): with 3 input channels its implicit GEMM has K = 81, which its
    tiles are not built for. Here each program takes a run of output pixels of one row and all output
    channels. For each of the kt * kh input rows a pixel reads, the kw * C values it needs lie side by side
    (the pixels are dense), so the program loads them as a [pixels, 16] tile of one base address plus a
    column offset (kw * C <= 16; the rest masked) and adds one ``tl.dot`` with that row's slice of the packed
    weight: kt * kh products with K = 16, float32 accumulation, the output written once.
    """
    b, c, t, h, w = x.shape
    co, cw, kt, kh, kw = weight.shape
    if cw != c or c > 4 or kh % 2 == 0 or kw % 2 == 0 or t < kt or kw * c > 16:
        raise ValueError(f"conv3d_few_in takes <= 4 input channels, odd spatial kernels of kw * C <= 16 values a "
                         f"row and at least kt frames; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if c > 1 and x.stride(1) != 1:
        raise ValueError(f"conv3d_few_in takes a channels-last x, got strides {x.stride()}")
    if w > 1 and x.stride(4) != c:
        raise ValueError(f"conv3d_few_in takes x with its pixels side by side (stride(4) == C = {c}), got strides "
                         f"{x.stride()}")
    to = t - kt + 1
    cfg = conv_few_in_config(co, w)
    block_n = cfg["BLOCK_N"]
    out = torch.empty((b, co, to, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    # the weight as [kt * kh rows, 16, N]: row (dt, dh), column dw * C + c, zero beyond kw * C and Co
    packed = torch.zeros((kt * kh, 16, block_n), dtype=x.dtype, device=x.device)
    packed[:, :kw * c, :co] = weight.permute(2, 3, 4, 1, 0).reshape(kt * kh, kw * c, co)
    bias_n = torch.zeros(block_n, dtype=torch.float32, device=x.device)
    if bias is not None:
        bias_n[:co] = bias.float()
    if out.numel():
        # the rows (b, t, h) on the grid's first axis (up to 2^31 - 1; the second stops at 65535)
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _conv_few_in_kernel[(b * to * h, triton.cdiv(w, cfg["BLOCK_W"]))](
                x, packed, bias_n, out, c, h, w, to, co, x.stride(0), x.stride(2), x.stride(3),
                out.stride(0), out.stride(2), out.stride(3), out.stride(4), KT=kt, KH=kh, KW=kw,
                IEEE=x.dtype == torch.float32, **cfg)
    return out


def conv_few_in_config(co: int, width: int) -> dict:
    """The launch of :func:`conv3d_few_in` for ``co`` output channels and rows of ``width`` pixels: 64 pixels
    a program, one warpgroup up to 128 output channels (the accumulator's 64 x 128 floats are 64 registers a
    thread). tests/test_vae_sm90_compile.py compiles it at 3 -> 96 channels: 166 registers, no spills, so three
    programs share an SM (the gather of the kernel before this one took 254 registers and 8 warps: one)."""
    block_n = max(16, triton.next_power_of_2(co))
    return dict(BLOCK_W=min(64, max(16, triton.next_power_of_2(width))), BLOCK_N=block_n,
                num_warps=4 if block_n <= 128 else 8)


if triton is not None:
    @triton.jit
    def _conv_few_in_kernel(X, Wp, Bias, Y, C, H, W, TO, CO, sxb, sxt, sxh, syb, syt, syh, syw,
                            KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK_W: tl.constexpr,
                            BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # (b, t, h) of the output
        h = row % H
        t = (row // H) % TO
        b = row // (H * TO)
        w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        # a row's tile: column j is input channel j % C of pixel w + j // C - KW // 2 (dense pixels: the
        # columns of one output pixel are consecutive values from its first tap on)
        j = tl.arange(0, 16)
        ww = w[:, None] + (j // C)[None, :] - KW // 2  # [BLOCK_W, 16]
        inside = (j[None, :] < KW * C) & (ww >= 0) & (ww < W)
        cols = ww.to(tl.int64) * C + (j % C)[None, :]
        n = tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        for r in tl.static_range(KT * KH):
            hh = h + (r % KH) - KH // 2
            base = X + b * sxb + (t + r // KH) * sxt + hh * sxh
            a = tl.load(base + cols, mask=inside & (hh >= 0) & (hh < H), other=0.0)
            wv = tl.load(Wp + r * 16 * BLOCK_N + j[:, None] * BLOCK_N + n[None, :])
            if IEEE:
                acc = tl.dot(a, wv, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, wv, acc)
        acc += tl.load(Bias + n)[None, :]
        dst = Y + b * syb + t * syt + h * syh + w[:, None].to(tl.int64) * syw + n[None, :]
        tl.store(dst, acc.to(Y.dtype.element_ty), mask=(w[:, None] < W) & (n[None, :] < CO))


def attention_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`attention_wide` runs ``softmax(q k^T / sqrt(D)) v`` for these ``[N, L, D]``
    operands: on the Triton device, 16-bit, D a multiple of 16 up to 384, unit column stride, no
    autograd (through the frozen decoder to the latents, SDPA runs)."""
    d = q.shape[-1]
    return (on_triton_device(q) and q.dim() == 3 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and k.dtype == q.dtype and v.dtype == q.dtype and k.shape == q.shape and v.shape == q.shape
            and d % 16 == 0 and 16 <= d <= 384 and all(t.stride(-1) == 1 for t in (q, k, v))
            and not _needs_grad(q, k, v))


#: frames of at least this many tokens take :func:`attention_by_products` in :func:`attention_wide` (16-bit
#: inputs): the VAE's middle attention at 720p has 14,400 (docs/PERF.md entry 18o)
PRODUCTS_MIN_TOKENS = 4096


def attention_wide(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` for ``[N, L, D]`` (one head; rows may be strided, as the VAE's
    q, k and v are slices of one ``[N, L, 3D]`` projection) -> ``[N, L, D]`` contiguous.

    The VAE's middle attention is one head of D = 384 over the 14,400 pixels of a 90x160 frame.
    FlashAttention's kernels stop at D = 256, so PyTorch runs it on its memory-efficient sm80 kernel
    (~120 TFLOP/s on the H200, 2.6 ms a frame). Here a flash-attention forward keeps D in up to three
    chunks of 128: the scores sum their three products, the output three accumulators; float32
    online softmax, one pass over K and V. That kernel runs at ~130 TFLOP/s (entry 18h): frames of
    PRODUCTS_MIN_TOKENS tokens or more in 16 bits go to :func:`attention_by_products` instead.
    """
    n, length, d = q.shape
    if d > 384:
        raise ValueError(f"attention_wide takes D <= 384, got {d}")
    if length >= PRODUCTS_MIN_TOKENS and q.dtype in (torch.float16, torch.bfloat16) and float32_products(q.device):
        return attention_by_products(q, k, v)
    cfg = attention_wide_config(d)
    out = torch.empty((n, length, d), dtype=q.dtype, device=q.device)
    if out.numel():
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            _attention_wide_kernel[(triton.cdiv(length, cfg["BLOCK_M"]), n)](
                q, k, v, out, length, d, d ** -0.5, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                v.stride(0), v.stride(1), out.stride(0), out.stride(1), IEEE=q.dtype == torch.float32, **cfg)
    return out


def attention_by_products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scores_bytes: int = 1 << 30) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` for ``[N, L, D]`` (as :func:`attention_wide`) by two matrix products
    and one pass over the scores: S = q k^T in float32 (cuBLAS, float32 accumulation), P = softmax(S / sqrt(D))
    split into two 16-bit parts, P = P_hi + P_lo (:func:`softmax_rows` with ``split``, one Triton program a
    row: it reads the row twice and writes the parts as pairs over the scores, each pair in its score's 4
    bytes), O = [P_hi0, P_lo0, P_hi1, ...] [v0; v0; v1; ...], one product of twice the depth. Frames go in
    groups whose scores and P fit ``scores_bytes`` (one frame at least: 829 MB at 14,400 tokens, P in the
    scores' bytes). Float32 inputs keep P in float32, a second buffer (one product, nothing to split).

    Why the split: P rounded once to bf16 doubled the error of SDPA in bf16 against float64 at 14,400 tokens
    (0.028-0.037 against 0.016-0.026 on an H100, 2026-12-05); P_hi + P_lo carry P to ~16 bits, and the error
    is then SDPA's, that of the output's own rounding. At the VAE's 14,400 tokens and D = 384 the products are
    0.16 and 0.32 TFLOP, ~0.6 ms at the card's matmul rate, and the pass ~0.75 ms at its memory rate: ~1.4 ms
    a frame, where the flash kernel takes ~2.4 ms.
    """
    n, length, d = q.shape
    out = torch.empty((n, length, d), dtype=q.dtype, device=q.device)
    group = max(1, scores_bytes // max(1, length * length * (8 if q.dtype == torch.float32 else 4)))
    for i in range(0, n, group):  # a group of frames' scores at a time, not a loop over frames
        j = min(n, i + group)
        scores = _scores_float32(q[i:j], k[i:j])
        if q.dtype == torch.float32:  # P in float32: nothing to split
            probs, values = softmax_rows(scores, d ** -0.5, q.dtype), v[i:j]
        else:  # [g, L, 2L] pairs over the scores' bytes, v's rows twice each
            probs, values = softmax_rows(scores, d ** -0.5, q.dtype, split=True), v[i:j].repeat_interleave(2, dim=1)
        torch.bmm(probs, values, out=out[i:j])
        del scores, probs, values  # before the next group's scores are allocated: one group alive, not two
    return out


_FLOAT32_PRODUCTS: dict = {}  # device -> whether torch has 16-bit products with float32 output there


def float32_products(device) -> bool:
    """Whether ``torch.bmm(..., out_dtype=torch.float32)`` of 16-bit operands runs on ``device`` (cuBLAS with
    float32 output; tried once per device). Without it :func:`attention_by_products` upcasts its operands, a
    float32 product at a fraction of the 16-bit rate, so :func:`attention_wide` keeps its flash kernel."""
    device = torch.device(device)
    if device not in _FLOAT32_PRODUCTS:
        a = torch.zeros(1, 16, 16, dtype=torch.bfloat16, device=device)
        try:
            _FLOAT32_PRODUCTS[device] = torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _FLOAT32_PRODUCTS[device] = False
    return _FLOAT32_PRODUCTS[device]


def _scores_float32(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q k^T`` in float32 for ``[N, L, D]`` operands: a 16-bit product with float32 output where torch has
    one for the device (:func:`float32_products`), else the operands upcast."""
    if q.dtype != torch.float32 and float32_products(q.device):
        return torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(q.float(), k.float().transpose(1, 2))


def softmax_rows(scores: torch.Tensor, scale: float, dtype: torch.dtype, split: bool = False) -> torch.Tensor:
    """``P = softmax(scores * scale, dim=-1)`` of float32 ``[..., L]`` rows, in ``dtype``: one Triton program a
    row on the Triton device (the row read twice, its max and sum in one online pass, then the probabilities
    written), else torch's.

    With ``split`` (``dtype`` float16 or bfloat16, ``scores`` contiguous) P is written **over** ``scores`` as
    pairs: column j's 4 bytes hold P_hi = P rounded to ``dtype``, then P_lo = what that rounding left out,
    rounded to ``dtype``. The result is ``scores``' memory viewed as ``[..., 2L]`` of ``dtype``; a product
    with v's rows each taken twice sees P to ~16 bits, and P costs no memory beyond the scores."""
    if split and (dtype not in (torch.float16, torch.bfloat16) or scores.dtype != torch.float32
                  or not scores.is_contiguous()):
        raise ValueError(f"softmax_rows(split=True) writes 16-bit pairs over contiguous float32 scores; got "
                         f"dtype {dtype} over {scores.dtype} scores (contiguous: {scores.is_contiguous()})")
    pairs = scores.view(dtype) if split else None
    if not (on_triton_device(scores) and scores.dtype == torch.float32 and scores.is_contiguous()):
        p = torch.softmax(scores * scale, dim=-1)
        if not split:
            return p.to(dtype)
        hi = p.to(dtype)
        pairs.copy_(torch.stack([hi, (p - hi.float()).to(dtype)], dim=-1).flatten(-2))
        return pairs
    length = scores.shape[-1]
    rows = scores.numel() // max(1, length)
    out = scores.view(torch.int32) if split else torch.empty(scores.shape, dtype=dtype, device=scores.device)
    if out.numel():
        with torch.cuda.device(scores.device) if scores.is_cuda else contextlib.nullcontext():
            _softmax_rows_kernel[(rows,)](scores, out, length, float(scale) * 1.4426950408889634, SPLIT=split,
                                          BF16=dtype == torch.bfloat16,
                                          BLOCK=min(4096, max(16, triton.next_power_of_2(length))), num_warps=8)
    return pairs if split else out


def attention_wide_config(d: int) -> dict:
    """The launch of :func:`attention_wide` for head dim ``d`` (tests/test_vae_sm90_compile.py
    compiles it: at D = 384, 241 registers and no spills; 128 query rows spill 752 B)."""
    block_d = min(128, max(16, triton.next_power_of_2(d)))
    chunks = triton.cdiv(d, block_d)
    return dict(CHUNKS=chunks, BLOCK_D=block_d, BLOCK_M=64, BLOCK_N=64 if chunks > 1 else 128,
                num_warps=8 if chunks > 1 else 4, num_stages=1 if chunks > 2 else 2)


if triton is not None:
    @triton.jit
    def _softmax_rows_kernel(S, P, L, scale_log2, SPLIT: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = S + row * L
        offs = tl.arange(0, BLOCK)
        m = tl.full((BLOCK,), float("-inf"), tl.float32)  # per lane: the running max and sum of its columns
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, L, BLOCK):
            x = tl.load(base + start + offs, mask=start + offs < L, other=float("-inf")) * scale_log2
            m_new = tl.maximum(m, x)
            ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane without a column yet keeps acc = 0
            acc = acc * tl.exp2(m - ref) + tl.exp2(x - ref)
            m = m_new
        mx = tl.max(m, axis=0)
        total = tl.sum(acc * tl.exp2(m - mx), axis=0)  # lanes without a column: acc = 0, exp2(-inf) = 0
        inv = 1.0 / total
        out = P + row * L
        for start in range(0, L, BLOCK):
            x = tl.load(base + start + offs, mask=start + offs < L, other=float("-inf")) * scale_log2
            p = tl.exp2(x - mx) * inv
            if SPLIT:
                # P is S's own memory (int32 words): word j, read above, takes P_hi in its low half (the
                # lower address) and what rounding left out, P_lo, in its high half. Only this program
                # touches this row, and its first pass has read the whole row before any word is written.
                hi = p.to(tl.bfloat16) if BF16 else p.to(tl.float16)
                lo = (p - hi.to(tl.float32)).to(hi.dtype)  # ptxas may fuse p's product into this subtraction
                word = hi.to(tl.uint16, bitcast=True).to(tl.uint32)
                word = word | (lo.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)
                tl.store(out + start + offs, word.to(tl.int32, bitcast=True), mask=start + offs < L)
            else:
                tl.store(out + start + offs, p.to(P.dtype.element_ty), mask=start + offs < L)

    @triton.jit
    def _scores_part(q, K, rows, kv_ok, cols, D, skb_row, IEEE: tl.constexpr):
        kt = tl.load(K + rows[None, :] * skb_row + cols[:, None], mask=kv_ok[None, :] & (cols[:, None] < D),
                     other=0.0)  # [BLOCK_D, BLOCK_N]
        if IEEE:
            return tl.dot(q, kt, input_precision="ieee")
        return tl.dot(q, kt)

    @triton.jit
    def _value_part(acc, p, V, rows, kv_ok, cols, D, svb_row, IEEE: tl.constexpr):
        vv = tl.load(V + rows[:, None] * svb_row + cols[None, :], mask=kv_ok[:, None] & (cols[None, :] < D),
                     other=0.0)  # [BLOCK_N, BLOCK_D]
        if IEEE:
            return acc + tl.dot(p.to(vv.dtype), vv, input_precision="ieee")
        return acc + tl.dot(p.to(vv.dtype), vv)

    @triton.jit
    def _attention_wide_kernel(Q, K, V, O, L, D, scale, sqb, sqr, skb, skr, svb, svr, sob, sor,
                               CHUNKS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(1).to(tl.int64)
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < L
        c0 = tl.arange(0, BLOCK_D)
        c1 = BLOCK_D + c0
        c2 = 2 * BLOCK_D + c0
        Qb, Kb, Vb = Q + b * sqb, K + b * skb, V + b * svb
        q_rows = m.to(tl.int64)[:, None] * sqr
        q0 = tl.load(Qb + q_rows + c0[None, :], mask=m_ok[:, None] & (c0[None, :] < D), other=0.0)
        acc0 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if CHUNKS > 1:
            q1 = tl.load(Qb + q_rows + c1[None, :], mask=m_ok[:, None] & (c1[None, :] < D), other=0.0)
            acc1 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if CHUNKS > 2:
            q2 = tl.load(Qb + q_rows + c2[None, :], mask=m_ok[:, None] & (c2[None, :] < D), other=0.0)
            acc2 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        qk_scale = scale * 1.4426950408889634  # exp2
        for start in range(0, L, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < L
            rows = n.to(tl.int64)
            s = _scores_part(q0, Kb, rows, n_ok, c0, D, skr, IEEE)
            if CHUNKS > 1:
                s += _scores_part(q1, Kb, rows, n_ok, c1, D, skr, IEEE)
            if CHUNKS > 2:
                s += _scores_part(q2, Kb, rows, n_ok, c2, D, skr, IEEE)
            s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
            acc0 = _value_part(acc0 * alpha[:, None], p, Vb, rows, n_ok, c0, D, svr, IEEE)
            if CHUNKS > 1:
                acc1 = _value_part(acc1 * alpha[:, None], p, Vb, rows, n_ok, c1, D, svr, IEEE)
            if CHUNKS > 2:
                acc2 = _value_part(acc2 * alpha[:, None], p, Vb, rows, n_ok, c2, D, svr, IEEE)
        inv = 1.0 / l_i
        o_rows = O + b * sob + m.to(tl.int64)[:, None] * sor
        tl.store(o_rows + c0[None, :], (acc0 * inv[:, None]).to(O.dtype.element_ty),
                 mask=m_ok[:, None] & (c0[None, :] < D))
        if CHUNKS > 1:
            tl.store(o_rows + c1[None, :], (acc1 * inv[:, None]).to(O.dtype.element_ty),
                     mask=m_ok[:, None] & (c1[None, :] < D))
        if CHUNKS > 2:
            tl.store(o_rows + c2[None, :], (acc2 * inv[:, None]).to(O.dtype.element_ty),
                     mask=m_ok[:, None] & (c2[None, :] < D))
