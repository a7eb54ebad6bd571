"""The Wan2.1 VAE, our own: the same numbers as diffusers' ``AutoencoderKLWan``, computed over many
frames per call instead of one latent frame at a time.

diffusers runs the encoder on the first frame, then on chunks of 4, and the decoder on one latent
frame at a time,
each causal 3D convolution carrying the last two frames of its input to the next call. Every temporal
operation is causal, so the same result comes from running each layer over a whole run of frames with
that cache in front; only the temporal resamplers treat the sequence's first frame apart (the
decoder's upsamplers upsample it in space only and start their time convolution, zero-padded, at the
second frame; the encoder's downsamplers pass it through and start their stride-2 time convolution on
it). :class:`WanEncoder3d` and :class:`WanDecoder3d` do exactly that on chunks of any number of latent
frames (``chunk``), the cache handed from chunk to chunk: all frames at once is one call per layer,
and a small chunk bounds the memory.

On the GPU the pair ``SiLU(RMSNorm(x))`` in front of every convolution is one Triton pass
(:mod:`oasis.vae_kernels`) that writes straight into the buffer the convolution reads, behind the
cached frames; the convolutions pad in space themselves. :meth:`WanVAE.channels_last` keeps every
activation channels-last (NDHWC), the layout cuDNN's implicit-GEMM convolutions read.

Tensor names are diffusers' (``decoder.up_blocks.0.resnets.1.conv2.weight``, ...), so a diffusers
VAE folder loads as it is; :func:`oasis.vae.wan_to_diffusers_names` maps Wan2.1's ``.pth``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import vae_conv, vae_cuda
from .vae_conv import conv, upsample2x_conv3x3
from .vae_kernels import add_bias_, attention_usable, attention_wide, norm_silu, norm_silu_reference

__all__ = ["WanVAEConfig", "WanVAE", "WanVAEDecoder", "WanEncoder3d", "WanDecoder3d"]


@dataclass(frozen=True)
class WanVAEConfig:
    """Wan2.1's VAE (diffusers' ``AutoencoderKLWan`` defaults)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = field(default=(
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921))
    latents_std: tuple[float, ...] = field(default=(
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160))

    @classmethod
    def from_dict(cls, d: dict) -> "WanVAEConfig":
        if d.get("is_residual") or d.get("patch_size") not in (None, 1):
            raise ValueError("only Wan2.1's VAE is supported (is_residual/patch_size are Wan2.2's)")
        if d.get("attn_scales"):
            raise ValueError(f"attn_scales={d['attn_scales']!r}: attention outside the middle block is not supported")
        keys = {"base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample", "in_channels",
                "out_channels", "latents_mean", "latents_std"}
        out = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in keys}
        if d.get("decoder_base_dim") not in (None, d.get("base_dim", 96)):
            raise ValueError("decoder_base_dim differing from base_dim is not supported")
        return cls(**out)

    def __post_init__(self):
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "num_res_blocks" else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not self.dim_mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.dim_mult):
            raise ValueError(f"dim_mult must be positive ints, got {self.dim_mult!r}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs one entry per resampling stage ({len(self.dim_mult) - 1} "
                             f"for dim_mult {self.dim_mult}), got {self.temperal_downsample!r}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim = {self.z_dim} values, got "
                             f"{len(self.latents_mean)} and {len(self.latents_std)}")

    def to_dict(self) -> dict:
        """diffusers' ``config.json`` keys."""
        return {"_class_name": "AutoencoderKLWan", "base_dim": self.base_dim, "z_dim": self.z_dim,
                "dim_mult": list(self.dim_mult), "num_res_blocks": self.num_res_blocks,
                "temperal_downsample": list(self.temperal_downsample), "in_channels": self.in_channels,
                "out_channels": self.out_channels, "attn_scales": [], "latents_mean": list(self.latents_mean),
                "latents_std": list(self.latents_std)}

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


def _format(x: torch.Tensor) -> torch.memory_format:
    """The layout ``x`` is in: channels-last (its channels are the innermost dim) or channels-first."""
    if x.shape[1] > 1 and x.stride(1) == 1:
        return torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return torch.contiguous_format


def _frames_like(x: torch.Tensor, frames: int) -> torch.Tensor:
    """An uninitialised ``[B, C, frames, H, W]`` in ``x``'s dtype, device and layout."""
    b, c, _, h, w = x.shape
    return torch.empty((b, c, frames, h, w), dtype=x.dtype, device=x.device, memory_format=_format(x))


def _cat_frames(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts, dim=2)`` into a buffer in the first part's layout."""
    if len(parts) == 1:
        return parts[0]
    out = _frames_like(parts[0], sum(p.shape[2] for p in parts))
    t = 0
    for p in parts:
        out[:, :, t:t + p.shape[2]].copy_(p)
        t += p.shape[2]
    return out


def _split_frames(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``x``'s frames in runs of ``n`` (the last may be shorter), each a copy of its own: a run's frames are freed
    once its reader is done with it, not when the last run is (views would hold all of ``x``)."""
    t = x.shape[2]
    return [_frames_like(x, min(n, t - s)).copy_(x[:, :, s:s + n]) for s in range(0, t, n)]


def _take(handed: list) -> torch.Tensor:
    """The tensor a caller handed over as ``[x]``, the list emptied. A plain argument stays referenced
    until the call returns (the caller's variable, ``nn.Module.__call__``'s arguments); handed over
    this way it is freed as soon as the callee drops it: at 720p each stage input is ~0.33 GB that
    would otherwise outlive its use (docs/PERF.md entry 18e)."""
    return handed.pop()


def _per_frame(x: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` on each frame of ``[B, C, T, H, W]`` as a batch of images (views both ways in either layout)."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    y = y.view(b, t, *y.shape[1:]).transpose(1, 2)
    return y if _format(y) == torch.channels_last_3d else y.contiguous()


class PendingSum:
    """A residual block's output ``conv + bias + residual``, not yet summed: the pass that reads it next (the next
    block's or the output convolution's norm pass) adds it as it reads ``conv``, instead of a pass of its own over
    the output first (docs/PERF.md entry 18t). With ``keep`` that pass also writes the sum over ``conv`` (the next
    block's residual); :meth:`tensor` sums it in a pass of its own, for every other reader."""

    def __init__(self, conv: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor):
        self.conv, self.bias, self.residual, self.keep = conv, bias, residual, True

    @property
    def shape(self) -> torch.Size:
        return self.conv.shape

    def take(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(conv, bias, residual), the residual no longer held here (freed once its one reader is done)."""
        parts = self.conv, self.bias, self.residual
        self.bias = self.residual = None
        return parts

    def tensor(self) -> torch.Tensor:
        """The sum, written over ``conv``."""
        conv, bias, residual = self.take()
        return add_bias_(conv, bias, residual)


def _summed(x):
    """``x`` itself, or a :class:`PendingSum` summed."""
    return x.tensor() if isinstance(x, PendingSum) else x


def _norm_into(x, norm: "RMSNorm", out: torch.Tensor, x_bias: torch.Tensor | None,
               tail: torch.Tensor | None) -> None:
    """``SiLU(norm(x + x_bias))`` into ``out`` (and its last frames into ``tail``); ``x`` a tensor, or a
    :class:`PendingSum` summed in the same pass (and written over its ``conv`` where it is kept)."""
    if isinstance(x, PendingSum):
        conv, bias, residual = x.take()
        norm_silu(conv, norm.gamma, norm.scale, out=out, bias=bias, tail=tail, residual=residual,
                  sum_out=conv if x.keep else None)
    else:
        norm_silu(x, norm.gamma, norm.scale, out=out, bias=x_bias, tail=tail)


def _last_use(x):
    """``x`` for a reader after which nothing needs its sum (the output convolution's norm pass): a
    :class:`PendingSum` is then summed in that pass without being written back."""
    if isinstance(x, PendingSum):
        x.keep = False
    return x


def _frames_of(x) -> torch.Tensor:
    """The tensor whose shape, dtype, device and layout ``x`` has (a :class:`PendingSum`'s ``conv``)."""
    return x.conv if isinstance(x, PendingSum) else x


class CausalConv3d(nn.Conv3d):
    """A 3D convolution padded in front in time only, continuing a sequence across calls.

    ``cache`` (a dict shared by the layers of one pass) holds each layer's last ``kt - 1`` input
    frames; without an entry the sequence starts with zeros, as diffusers' first call does. The
    spatial padding is the convolution's own (zeros, as diffusers' explicit pad; same numbers).
    """

    def __init__(self, cin: int, cout: int, kernel, padding=0, stride=1):
        super().__init__(cin, cout, kernel, stride=stride, padding=0)
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.space_pad = (p[1], p[2])
        self.time_pad = 2 * p[0]
        assert self.time_pad in (0, self.kernel_size[0] - 1)

    def _bias(self, bias: bool | torch.Tensor) -> torch.Tensor | None:
        """The bias a call adds: its own (``True``), another (a tensor) or none (``False``: the caller folds it
        into its next pass)."""
        return self.bias if bias is True else (None if bias is False else bias)

    def _conv(self, x: torch.Tensor, bias: bool | torch.Tensor = True,
              residual: torch.Tensor | None = None, *, zero_front: bool = False) -> torch.Tensor:
        """The convolution plus :meth:`_bias` of ``bias``, plus ``residual``: :func:`oasis.vae_conv.conv`.
        ``zero_front``: ``x``'s first ``time_pad`` frames are the zeros a sequence starts with."""
        weight = self.weight
        if zero_front and self.time_pad and x.shape[2] == self.time_pad + 1 and self.stride[0] == 1:
            # the sequence's first frame alone (each chunked clip's first call): the taps on the zeros in front
            # add nothing, so only the last one runs, on that frame (a third of the multiply-adds)
            x, weight = x[:, :, -1:], self._last_tap()
        return conv(x, weight, self._bias(bias), residual, stride=self.stride, padding=(0, *self.space_pad))

    def _last_tap(self) -> torch.Tensor:
        """The weight's last temporal tap ``[Co, Ci, 1, kh, kw]``, dense in the weight's layout: made per call (a
        third of one layer's weight, once per clip), not kept beside the weights."""
        w = self.weight
        fmt = torch.channels_last_3d if w.stride(1) == 1 and w.shape[1] > 1 else torch.contiguous_format
        return w[:, :, -1:].contiguous(memory_format=fmt)

    def _history(self, x: torch.Tensor, cache: dict | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A buffer ``[B, C, time_pad + T, H, W]`` holding the cached frames (or zeros) in front, and the
        tensor this call's last frames are to be kept in: the cache entry just copied into the buffer,
        overwritten in place where its shape allows (so a layer never holds two entries at once), else
        None (a new one is made)."""
        buf = _frames_like(x, self.time_pad + x.shape[2])
        prev = None if cache is None else cache.get(self)
        if prev is None:
            buf[:, :, :self.time_pad].zero_()
        else:
            buf[:, :, :self.time_pad].copy_(prev)
        # (not under autograd: there the entry is part of the graph)
        last = buf[:, :, -self.time_pad:]
        reusable = (prev is not None and not prev.requires_grad and prev.shape == last.shape
                    and prev.dtype == last.dtype and prev.device == last.device)
        return buf, prev if reusable else None

    def _remember(self, buf: torch.Tensor, keep: torch.Tensor | None, cache: dict | None) -> None:
        """The buffer's last frames as this layer's cache entry: into ``keep``, else a copy (a view
        would keep the whole buffer alive)."""
        if cache is not None:
            last = buf[:, :, -self.time_pad:]
            cache[self] = last.clone() if keep is None else keep.copy_(last)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        fresh = cache is None or cache.get(self) is None
        if self.time_pad:
            buf, keep = self._history(x, cache)
            buf[:, :, self.time_pad:].copy_(x)
            self._remember(buf, keep, cache)
            x = buf
        return self._conv(x, zero_front=fresh)

    def normed_input(self, x, norm: "RMSNorm", cache: dict | None, *,
                     x_bias: torch.Tensor | None = None) -> torch.Tensor:
        """``SiLU(norm(x + x_bias))`` written once, straight behind the cached frames: the buffer this
        convolution reads (:meth:`_conv`); ``x_bias``: the bias of the convolution that made ``x``, left
        out there; ``x`` may be a :class:`PendingSum`. The caller may drop ``x`` before the convolution (its
        output then takes x's place)."""
        buf, keep = self._history(_frames_of(x), cache)
        # the next call's cache (this call's last frames) written by the norm pass itself where the
        # new frames cover it, instead of copied out of the buffer after it
        covered = cache is not None and 0 < self.time_pad <= x.shape[2]
        tail = (keep if keep is not None else _frames_like(_frames_of(x), self.time_pad)) if covered else None
        _norm_into(x, norm, buf[:, :, self.time_pad:], x_bias, tail)
        if tail is None:
            self._remember(buf, keep, cache)
        else:
            cache[self] = tail
        return buf

    def forward_normed(self, x, norm: "RMSNorm", cache: dict | None, *,
                       x_bias: torch.Tensor | None = None, bias: bool | torch.Tensor = True,
                       residual: torch.Tensor | None = None) -> torch.Tensor:
        """``conv(SiLU(norm(x + x_bias))) + bias + residual`` (:meth:`normed_input`; ``bias`` as in
        :meth:`_conv`)."""
        return self.conv_normed([x], norm, cache, x_bias=x_bias, bias=bias, residual=residual)

    def conv_normed(self, handed: list, norm: "RMSNorm", cache: dict | None, *,
                    x_bias: torch.Tensor | None = None, bias: bool | torch.Tensor = True,
                    residual: torch.Tensor | None = None, defer: bool = False):
        """:meth:`forward_normed` of the ``x`` handed over as ``[x]`` (a tensor or a :class:`PendingSum`): freed
        once normalised, before the convolution's output exists. Where a CUDA kernel takes the call (the output
        convolution's, :func:`oasis.vae_conv.few_out_kernel_takes`, or :func:`oasis.vae_conv.cuda_kernel_takes`)
        the normalised frames stay apart from the cached ones and the kernel reads both where they lie; else they
        are written behind them (:meth:`normed_input`), and with ``defer`` (and a residual) the result is a
        :class:`PendingSum`: the bias and the residual are left to the pass that reads it next."""
        x = _take(handed)
        prev = None if cache is None else cache.get(self)
        if residual is None and vae_conv.few_out_kernel_takes(_frames_of(x), self.weight, self.time_pad, prev=prev):
            # the decoder's output convolution (96 -> 3): its own kernel, under any conv_kernel
            normed = self._normed_frames(x, norm, cache, prev, x_bias)
            del x
            return vae_cuda.conv3d_few_out(normed, self.weight, self._bias(bias), prev=prev)
        if vae_conv.cuda_kernel_takes(_frames_of(x), self.weight, self.time_pad, prev=prev, residual=residual):
            normed = self._normed_frames(x, norm, cache, prev, x_bias)
            del x
            return vae_cuda.conv3d_k3(normed, self.weight, self._bias(bias), prev=prev, residual=residual)
        fresh = prev is None
        del prev
        buf = self.normed_input(x, norm, cache, x_bias=x_bias)
        del x
        if defer and residual is not None:
            return PendingSum(self._conv(buf, False, zero_front=fresh), self._bias(bias), residual)
        return self._conv(buf, bias, residual, zero_front=fresh)

    def _normed_frames(self, x, norm: "RMSNorm", cache: dict | None, prev: torch.Tensor | None,
                       x_bias: torch.Tensor | None) -> torch.Tensor:
        """``SiLU(norm(x + x_bias))`` in a tensor of its own, the cached frames ``prev`` (None where the
        sequence starts: zeros) left where they are. The cache entry becomes this call's last frames: written
        by the norm pass where ``x`` covers them, into a new tensor (the convolution still reads ``prev``)."""
        normed = _frames_like(_frames_of(x), x.shape[2])
        tail = self._new_entry(normed, cache)
        _norm_into(x, norm, normed, x_bias, tail)
        self._keep_entry(normed, tail, prev, cache)
        return normed

    def _new_entry(self, frames: torch.Tensor, cache: dict | None) -> torch.Tensor | None:
        """The tensor the pass writing this layer's input ``frames`` also writes its last ``time_pad`` frames
        into (the next call's cache entry), where there is a cache and ``frames`` covers it; else None."""
        covered = cache is not None and self.time_pad <= frames.shape[2]
        return _frames_like(frames, self.time_pad) if covered else None

    def _keep_entry(self, frames: torch.Tensor, tail: torch.Tensor | None, prev: torch.Tensor | None,
                    cache: dict | None) -> None:
        """This layer's cache entry after an input of ``frames`` (the cached ``prev`` before them, None: zeros):
        ``tail`` as written (:meth:`_new_entry`), or where ``frames`` does not cover it the newest old frames,
        then these."""
        if cache is None:
            return
        if tail is None:
            front = prev if prev is not None else _frames_like(frames, self.time_pad).zero_()
            tail = _cat_frames([front, frames])[:, :, -self.time_pad:].clone(memory_format=_format(frames))
        cache[self] = tail


class RMSNorm(nn.Module):
    """L2-normalise over channels (float32 for 16-bit inputs), times sqrt(C) * gamma."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_silu_reference(x, self.gamma, self.scale, silu=False)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = RMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x, cache, defer: bool = False):
        """``x``: a tensor or the previous block's :class:`PendingSum` (summed here by norm1's pass, which writes
        the sum over its ``conv``: this block's residual). ``defer``: return a :class:`PendingSum` where conv2
        runs on cuDNN, for a next block to sum."""
        # conv1's bias is added in the norm pass that reads its output (in conv1's own kernel where that
        # applies norm2: _conv2_input); conv2's and the shortcut's with the residual, in the one pass that
        # follows conv2 (oasis.vae_conv.conv), in the CUDA kernel's epilogue, or (defer) in the next norm pass
        if isinstance(x, PendingSum) and (self.conv_shortcut is not None or self._cuda_kernel_may_take(x, cache)):
            # the shortcut reads the sum; the CUDA kernel's paths take tensors (where this block stays on cuDNN,
            # the sum is left to norm1's pass: no pass of its own)
            x = x.tensor()
        bias = self.conv2.bias
        if self.conv_shortcut is None:
            h = _frames_of(x)  # (a pending sum's conv: the sum once conv1's norm pass has written it)
        else:
            h = self.conv_shortcut._conv(x, bias=False)
            wide = torch.promote_types(bias.dtype, torch.float32)  # summed once, in at least float32
            bias = bias.to(wide) + self.conv_shortcut.bias.to(wide)
        fused = None if isinstance(x, PendingSum) else self._conv2_input(x, cache, h)
        if fused is not None:
            normed, prev = fused
            return vae_cuda.conv3d_k3(normed, self.conv2.weight, bias, prev=prev, residual=h)
        # conv1's output handed straight to conv2: freed once normalised, before conv2's output is allocated
        return self.conv2.conv_normed([self.conv1.forward_normed(x, self.norm1, cache, bias=False)], self.norm2, cache,
                                      x_bias=self.conv1.bias, bias=bias, residual=h, defer=defer)

    def _cuda_kernel_may_take(self, x, cache: dict | None) -> bool:
        """Whether the CUDA kernel takes conv1 on input ``x`` (a tensor or a :class:`PendingSum`) by the setting,
        the device, the layout and the channel counts (:func:`oasis.vae_conv.cuda_kernel_takes`)."""
        c1 = self.conv1
        return vae_conv.cuda_kernel_takes(_frames_of(x), c1.weight, c1.time_pad,
                                          prev=None if cache is None else cache.get(c1))

    def _conv2_input(self, x: torch.Tensor, cache: dict | None, h: torch.Tensor):
        """``(SiLU(norm2(conv1(SiLU(norm1(x))) + bias1)), conv2's cached frames)``, norm2 applied by conv1's own
        CUDA kernel, where that holds a pixel's every output channel (96 or 192): no pass over conv1's
        output. None where the CUDA kernel does not take both convolutions so (the caller's path then)."""
        c1, c2 = self.conv1, self.conv2
        prev1 = None if cache is None else cache.get(c1)
        if not vae_conv.cuda_kernel_takes(x, c1.weight, c1.time_pad, prev=prev1, norm=True):
            return None
        prev2 = None if cache is None else cache.get(c2)
        out = torch.empty((x.shape[0], c1.out_channels, *x.shape[2:]), dtype=x.dtype, device=x.device,
                          memory_format=_format(x))
        if not vae_conv.cuda_kernel_takes(out, c2.weight, c2.time_pad, prev=prev2, residual=h):
            return None
        normed = c1._normed_frames(x, self.norm1, cache, prev1, None)
        # conv2's next cache entry: with more new frames than it holds, written by conv1's epilogue too; with
        # exactly as many, the output itself (no copy, and no tensor alive beyond what the unfused path holds:
        # a tail allocated here would be one more at the decoder's peak, docs/PERF.md entry 18l)
        tail = c2._new_entry(out, cache) if out.shape[2] > c2.time_pad else None
        vae_cuda.conv3d_k3(normed, c1.weight, c1.bias, prev=prev1, norm=(self.norm2.gamma, self.norm2.scale), tail=tail,
                           out=out)
        del normed, prev1
        if tail is None and out.shape[2] == c2.time_pad:
            tail = out
        c2._keep_entry(out, tail, prev2, cache)
        return out, prev2


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _frames(self, x):
        n, c, h, w = x.shape
        # [n, hw, 3c] contiguous, as diffusers lays it out (free when channels-last): SDPA's rounding
        # depends on the strides
        qkv = self.to_qkv(self.norm(x)).reshape(n, 3 * c, h * w).transpose(1, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        if attention_usable(q, k, v):  # one head of D = dim: a flash-attention pass for D up to 384
            y = attention_wide(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return self.proj(y.transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x):
        return x + _per_frame(x, self._frames)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x, cache, defer: bool = False):
        """``x``: a tensor or a :class:`PendingSum`; ``defer``: the second block's output may be one."""
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache, defer=defer)


class Upsample(nn.Module):
    """2x in space (nearest-exact, then a 3x3 conv to ``dim // 2`` channels); with ``temporal``, first
    2x in time by a causal (3,1,1) conv to twice the channels, interleaved as two frames."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                      nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def _space(self, frames):
        # the resize and the 3x3 convolution as the four phases' 2x2 convolutions of the frames themselves
        # (nearest-exact copies values: diffusers upcasts the resize to float32, the same values)
        c = self.resample[1]
        return upsample2x_conv3x3(frames, c.weight, c.bias)

    def forward(self, x, cache, starts: bool):
        """``starts``: ``x`` begins with the sequence's first frame, which is upsampled in space only."""
        if self.time_conv is not None:
            first = 1 if starts else 0
            b, c, t, h, w = x.shape
            y = _frames_like(x, first + 2 * (t - first))
            if first:
                y[:, :, :1].copy_(x[:, :, :1])
            if t > first:
                z = self.time_conv(x[:, :, first:], cache)  # [B, 2C, t - first, H, W]: two frames per input frame
                y[:, :, first::2].copy_(z[:, :c])
                y[:, :, first + 1::2].copy_(z[:, c:])
            x = y
        return _per_frame(x, self._space)


class Downsample(nn.Module):
    """2x down in space (zero pad right and bottom, 3x3 conv, stride 2); with ``temporal``, then 2x in
    time by a (3,1,1) conv of stride 2 whose windows start at the first frame, which passes through."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def _space(self, frames):
        # the right and bottom zeros as the convolution's own padding (no padded copy of the frames)
        c = self.resample[1]
        return conv(frames, c.weight, c.bias, stride=c.stride, padding=0, padding_after=1)

    def forward(self, x, cache, starts: bool):
        x = _per_frame(x, self._space)
        if self.time_conv is None:
            return x
        # windows (0,1,2), (2,3,4), ...: each chunk after the first starts from the last frame before it
        seq = x if starts else _cat_frames([cache[self], x])
        cache[self] = x[:, :, -1:].clone()
        t = seq.shape[2]
        head = [x[:, :, :1]] if starts else []
        body = [self.time_conv(seq)] if t >= 3 else []
        return _cat_frames(head + body)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, upsample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_res_blocks + 1))
        self.upsamplers = None if upsample is None else nn.ModuleList([Upsample(cout, upsample == "3d")])

    @property
    def temporal(self) -> bool:
        return self.upsamplers is not None and self.upsamplers[0].time_conv is not None

    def forward(self, handed: list, cache, starts, defer: bool = False):
        """``handed``: ``[x]`` (a tensor or a :class:`PendingSum`), emptied here (see :func:`_take`); ``defer``:
        without an upsampler, the output may be a :class:`PendingSum`. Each block's output but the last is
        summed by the next block's first norm pass."""
        handed.append(self.blocks(handed, cache, defer))
        return self.upsample(handed, cache, starts)

    def blocks(self, handed: list, cache, defer: bool = False):
        """The residual blocks alone (:meth:`forward` without the upsampler)."""
        x = _take(handed)
        for i, r in enumerate(self.resnets):
            last = i == len(self.resnets) - 1
            x = r(x, cache, defer=not last or (defer and self.upsamplers is None))
        return x

    def upsample(self, handed: list, cache, starts):
        """The upsampler alone on ``[x]`` (emptied), or ``x`` itself where there is none."""
        x = _take(handed)
        return x if self.upsamplers is None else self.upsamplers[0](x, cache, starts)


class WanEncoder3d(nn.Module):
    """Video ``[B, in_channels, T, H, W]`` -> ``[B, 2 z_dim, T', H/8, W/8]`` (mean and log-variance)."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        layers = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                layers.append(Downsample(cout, bool(cfg.temperal_downsample[i])))
        self.down_blocks = nn.ModuleList(layers)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def forward(self, x, cache: dict, starts: bool, piece_frames: int | None = None):
        """``piece_frames``: run the layers before the first temporal downsampler (those at the full
        frame rate, the two largest) on pieces of at most this many frames, one after the other (the
        same arithmetic as in one call, as in the decoder)."""
        return self.tail(self.head(x, cache, starts, piece_frames), cache)

    def _temporal_downsamplers(self) -> list[int]:
        return [i for i, m in enumerate(self.down_blocks) if isinstance(m, Downsample) and m.time_conv is not None]

    def head(self, x, cache: dict, starts: bool, piece_frames: int | None = None) -> torch.Tensor:
        """The layers up to the last temporal downsampler (:meth:`forward`'s first part): its output."""
        down = self._temporal_downsamplers()
        first = down[0] if down else len(self.down_blocks)
        last = down[-1] + 1 if down else len(self.down_blocks)

        def front(xp, st):
            return _summed(_down_layers(self.down_blocks[:first], self.conv_in(xp, cache), cache, st, False))

        t = x.shape[2]
        if piece_frames is not None and t > piece_frames:
            x = _cat_frames([front(x[:, :, s:s + piece_frames], starts and s == 0) for s in range(0, t, piece_frames)])
        else:
            x = front(x, starts)
        return _summed(_down_layers(self.down_blocks[first:last], x, cache, starts, False))

    def tail(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """The layers after the last temporal downsampler, the middle block and the output convolution on
        :meth:`head`'s output (any number of its frames at once: no layer here treats the first frame apart)."""
        down = self._temporal_downsamplers()
        layers = self.down_blocks[down[-1] + 1:] if down else []
        x = self.mid_block(_down_layers(layers, x, cache, False, True), cache, defer=True)
        return self.conv_out.forward_normed(_last_use(x), self.norm_out, cache)


def _down_layers(layers, x, cache, starts, defer_last: bool):
    """The encoder's ``layers`` on ``x``: each residual block followed by another (or, with ``defer_last``, the
    last one) leaves its output a :class:`PendingSum` for the next to sum."""
    for i, layer in enumerate(layers):
        if isinstance(layer, Downsample):
            x = layer(x, cache, starts)
        else:
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            x = layer(x, cache, defer=isinstance(nxt, ResidualBlock) or (nxt is None and defer_last))
    return x


class WanDecoder3d(nn.Module):
    """Latents ``[B, z_dim, T, H, W]`` -> video ``[B, out_channels, T', 8H, 8W]`` (unclamped)."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        mult = list(cfg.dim_mult)
        dims = [cfg.base_dim * m for m in [mult[-1]] + mult[::-1]]
        temporal = list(cfg.temperal_downsample)[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            cin = cin // 2 if i > 0 else cin  # each upsampler halves the channels
            last = i == len(mult) - 1
            blocks.append(UpBlock(cin, cout, cfg.num_res_blocks, None if last else ("3d" if temporal[i] else "2d")))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z, cache: dict, starts: bool, piece_frames: int | None = None):
        """``piece_frames``: once no temporal upsampler is left (the two largest stages of Wan2.1's
        decoder), run the rest on pieces of at most this many frames, one after the other: the causal
        cache makes that exact, and the working set of those stages shrinks with the piece. From
        ``up_blocks.1`` on: :meth:`head` runs ``up_blocks.0``'s blocks on the whole chunk (or group)."""
        return self.tail([self.head(z, cache)], cache, starts, piece_frames)

    def head(self, z, cache: dict):
        """The layers at the latents' own size: ``conv_in``, the middle block and ``up_blocks.0``'s residual
        blocks, on latents ``z``; their output (a :class:`PendingSum` where that block is the last, without an
        upsampler). No layer here treats the sequence's first frame apart."""
        handed = [self.mid_block(self.conv_in(z, cache), cache, defer=bool(len(self.up_blocks)))]
        if not self.up_blocks:
            return _take(handed)
        return self.up_blocks[0].blocks(handed, cache, defer=len(self.up_blocks) == 1)

    def tail(self, handed: list, cache: dict, starts: bool, piece_frames: int | None) -> torch.Tensor:
        """The rest, on :meth:`head`'s output handed over as ``[x]`` (emptied, :func:`_take`): ``up_blocks.0``'s
        upsampler, the other up blocks and the output convolution (``starts``, ``piece_frames`` as in
        :meth:`forward`)."""
        if self.up_blocks:
            handed.append(self.up_blocks[0].upsample(handed, cache, starts))
        return _cat_frames(self._stages(1 if self.up_blocks else 0, handed, cache, starts, piece_frames))

    def _stages(self, i, handed: list, cache, starts, piece) -> list[torch.Tensor]:
        """Stages ``i`` on of ``handed`` (``[x]``, emptied: each stage's input is freed as soon as the
        stage is done with it, :func:`_take`); the outputs, one per piece."""
        while i < len(self.up_blocks):
            t = handed[0].shape[2]
            if piece is not None and t > piece and not any(b.temporal for b in self.up_blocks[i:]):
                # each piece's frames freed once its first block has read them
                parts = _split_frames(_summed(_take(handed)), piece)
                outs = []
                for k in range(len(parts)):
                    one = [parts[k]]
                    parts[k] = None
                    outs += self._stages(i, one, cache, starts and k == 0, None)
                return outs
            handed.append(self.up_blocks[i](handed, cache, starts, defer=i == len(self.up_blocks) - 1))
            i += 1
        return [self.conv_out.forward_normed(_last_use(_take(handed)), self.norm_out, cache)]


#: the latent frames (at least: whole chunks) that the layers at the latents' own size take per call when a clip
#: runs in chunks: the decoder's head (``conv_in``, the middle block, ``up_blocks.0``'s residual blocks), the
#: encoder's tail (the layers after its last temporal downsampler, its middle block and output convolution: in
#: Wan2.1 all at the latents' size). One 90x160 frame a call leaves the card idle (its 384-channel convolutions at
#: ~330 TFLOP/s, docs/PERF.md entry 18m); the same arithmetic on more frames, the causal cache carried as ever.
#: Each holds one 384-channel frame of 90x160 per latent frame for the group's other chunks (11 MB at 720p): the
#: decoder its head's output for the chunks not yet decoded, the encoder its head's for those not yet through
#: its tail.
LATENT_STAGE_FRAMES = 3


#: the values of :attr:`WanVAE.conv_kernel`
CONV_KERNELS = ("auto", "cudnn", "cuda")


def _check_input(x: torch.Tensor, what: str, weight: torch.Tensor, min_side: int = 1) -> None:
    """Frames, height and width present, and the VAE's own dtype and device (a clear error, not a conv's)."""
    if min(x.shape[2:]) < 1 or min(x.shape[3:]) < min_side:
        raise ValueError(f"{what} must have at least 1 frame and {min_side}x{min_side} pixels, got {tuple(x.shape)}")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(f"{what} is {x.dtype} on {x.device} but the VAE is {weight.dtype} on {weight.device}; "
                         f"convert one of them")


def _check_positive(name, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _check_chunk(chunk) -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
        raise ValueError(f"chunk must be a positive number of latent frames or None, got {chunk!r}")


class WanVAE(nn.Module):
    """Wan2.1's VAE: :meth:`encode` video -> raw latents, :meth:`decode` raw latents -> video.

    ``encoder=False`` or ``decoder=False`` leaves that half out (a decoder-only VAE loads from a
    folder without the encoder's tensors). Both halves take ``chunk``: latent frames per call
    (``None``: all at once); the causal cache makes every choice give the same result.
    """

    def __init__(self, cfg: WanVAEConfig | None = None, *, encoder: bool = True, decoder: bool = True):
        super().__init__()
        self.config = cfg = cfg or WanVAEConfig()
        if encoder:
            self.encoder = WanEncoder3d(cfg)
            self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        if decoder:
            self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
            self.decoder = WanDecoder3d(cfg)
        self.memory_format = torch.contiguous_format
        #: True: time each convolution geometry's cuDNN engines once and run the fastest;
        #: "benchmark": PyTorch's cuDNN benchmark mode only; False: neither (see :meth:`_autotuned`)
        self.autotune = False
        #: "cudnn": every convolution through :func:`oasis.vae_conv.conv` (cuDNN, or PyTorch's); "cuda": the
        #: causal 3x3x3 ones that :func:`oasis.vae_conv.cuda_kernel_takes` on the CUDA kernel
        #: (:mod:`oasis.vae_cuda`: Hopper, bf16 channels-last, no gradients), the rest as with "cudnn";
        #: "auto" (the default): the CUDA kernel on those of :data:`oasis.vae_conv.AUTO_CUDA_WIDTHS` output channels
        #: only, where it was measured to win (192), the rest as with "cudnn"
        self.conv_kernel = "auto"

    @classmethod
    def from_pretrained(cls, path, *, dtype=torch.float32, device="cpu", encoder: bool | None = None) -> "WanVAE":
        """A VAE folder in diffusers' layout or Wan2.1's ``Wan2.1_VAE.pth`` (:func:`oasis.vae.load_vae`)."""
        from .vae import load_vae

        return load_vae(path, dtype=dtype, device=device, encoder=encoder)

    def save_pretrained(self, path) -> None:
        """A folder in diffusers' layout (:func:`oasis.vae.save_vae`)."""
        from .vae import save_vae

        save_vae(self, path)

    @property
    def has_encoder(self) -> bool:
        return hasattr(self, "encoder")

    @property
    def has_decoder(self) -> bool:
        return hasattr(self, "decoder")

    def channels_last(self, enabled: bool = True) -> "WanVAE":
        """Run channels-last (NDHWC activations and weights), the layout cuDNN's fast convolutions read."""
        self.memory_format = torch.channels_last_3d if enabled else torch.contiguous_format
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Conv2d)):
                fmt = (torch.channels_last_3d if isinstance(m, nn.Conv3d) else torch.channels_last) if enabled \
                    else torch.contiguous_format
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
        return self

    def decode(self, z: torch.Tensor, chunk: int | None = None, *, piece_frames: int | None = None,
               tile: int | None = None, tile_overlap: int = 8, clamp: bool = True) -> torch.Tensor:
        """Raw latents ``[B, z_dim, T, H, W]`` -> video ``[B, C, 1 + 4(T-1), 8H, 8W]`` clamped to [-1, 1].

        ``chunk``: latent frames per call (None: all); ``piece_frames``: output frames per call in the
        stages after the last temporal upsampler (None: the chunk's); both the same arithmetic as one
        call. ``tile``: decode square tiles of this many latent pixels, ``tile_overlap`` shared with
        each neighbour and cross-faded per output pixel with weights that add up to one (diffusers'
        tiling): bounds the memory of large frames, but is not exact: the middle block's attention
        spans each whole frame, so a tile's result differs from the whole frame's everywhere, most
        near its borders. ``clamp=False`` leaves the values outside [-1, 1] (training: a pixel loss
        then still has a gradient there).
        """
        if not self.has_decoder:
            raise ValueError("this VAE was built without its decoder")
        if not isinstance(z, torch.Tensor) or z.dim() != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"latents must be [B, {self.config.z_dim}, T, H, W], got "
                             f"{getattr(z, 'shape', type(z).__name__)}")
        _check_input(z, "latents", self.post_quant_conv.weight)
        _check_chunk(chunk)
        _check_positive("piece_frames", piece_frames)
        _check_positive("tile", tile)
        if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, int) or tile_overlap < 0 or \
                (tile is not None and tile_overlap >= tile):
            raise ValueError(f"tile_overlap must be an int in [0, tile), got {tile_overlap!r}")
        h, w = z.shape[-2:]
        with self._autotuned():
            if tile is None or (tile >= h and tile >= w):
                return self._decode_frames(z, chunk, piece_frames, clamp)
            return self._decode_tiles(z, chunk, piece_frames, tile, tile_overlap, clamp)

    def _decode_frames(self, z, chunk, piece_frames, clamp=True):
        x = self.post_quant_conv(z.contiguous(memory_format=self.memory_format))
        t, tf, sf = x.shape[2], self.config.temporal_factor, self.config.spatial_factor
        step = t if chunk is None else chunk
        b, _, _, h, w = x.shape
        out = torch.empty((b, self.config.out_channels, 1 + tf * (t - 1), sf * h, sf * w), dtype=x.dtype,
                          device=x.device)
        cache: dict = {}
        dec = self.decoder
        group = step * -(-LATENT_STAGE_FRAMES // step)  # latent frames the decoder's head takes per call
        ahead: list = []  # the head's output for the chunks of the group not yet decoded, one tensor each
        for s in range(0, t, step):
            if not ahead:
                y = dec.head(x[:, :, s:s + group], cache)
                # a copy per chunk: each one's frames freed once decoded, not with the group's last
                ahead = _split_frames(_summed(y), step) if y.shape[2] > step else [y]
                del y
            y = dec.tail([ahead.pop(0)], cache, starts=s == 0, piece_frames=piece_frames)
            f0 = 0 if s == 0 else 1 + tf * (s - 1)
            out[:, :, f0:f0 + y.shape[2]].copy_(y.clamp_(-1.0, 1.0) if clamp else y)
            del y  # not held through the next chunk
        return out

    def _decode_tiles(self, z, chunk, piece_frames, tile, overlap, clamp=True):
        from .tiling import span_weights, spans

        sf = self.config.spatial_factor
        b, _, t, h, w = z.shape
        hs, ws = spans(h, min(tile, h), overlap), spans(w, min(tile, w), overlap)
        acc = torch.float64 if z.dtype == torch.float64 else torch.float32  # the blend in at least float32
        # ramps over output pixels (not latent pixels repeated: that would fade in 8-pixel steps)
        hw = span_weights([(a * sf, b * sf) for a, b in hs], z.device, acc)
        ww = span_weights([(a * sf, b * sf) for a, b in ws], z.device, acc)
        out = torch.zeros((b, self.config.out_channels, 1 + self.config.temporal_factor * (t - 1), sf * h, sf * w),
                          dtype=acc, device=z.device)
        for (h0, h1), wh in zip(hs, hw):
            for (w0, w1), wv in zip(ws, ww):
                y = self._decode_frames(z[..., h0:h1, w0:w1], chunk, piece_frames, clamp)
                weight = wh[:, None] * wv[None]
                out[..., h0 * sf:h1 * sf, w0 * sf:w1 * sf] += y.to(acc) * weight
        return out.to(self.post_quant_conv.weight.dtype)

    @contextlib.contextmanager
    def _autotuned(self):
        """Per :attr:`conv_kernel` (the CUDA kernel's context, :func:`oasis.vae_conv.cuda_kernel`) and
        :attr:`autotune`: ``True``: each new convolution geometry is timed once over every engine
        configuration cuDNN's heuristic lists and runs on the fastest
        (:mod:`oasis.vae_conv`, with the cuDNN frontend installed; the convolutions that path does not
        take run in cuDNN's benchmark mode); ``"benchmark"``: cuDNN's benchmark mode through PyTorch
        alone; ``False``: neither. The global flag is restored after."""
        if not (isinstance(self.autotune, bool) or self.autotune == "benchmark"):
            raise ValueError(f"autotune must be True, False or 'benchmark', got {self.autotune!r}")
        if self.conv_kernel not in CONV_KERNELS:
            raise ValueError(f"conv_kernel must be one of {', '.join(map(repr, CONV_KERNELS))}, got {self.conv_kernel!r}")
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = before or bool(self.autotune)
        try:
            with vae_conv.tuning(self.autotune is True), vae_conv.cuda_kernel(
                    self.conv_kernel != "cudnn", vae_conv.AUTO_CUDA_WIDTHS if self.conv_kernel == "auto" else None):
                yield
        finally:
            torch.backends.cudnn.benchmark = before

    def encode(self, video: torch.Tensor, chunk: int | None = None, *, piece_frames: int | None = None,
               moments: bool = False):
        """Video ``[B, C, 1 + 4k, H, W]`` in [-1, 1] -> raw latents ``[B, z_dim, 1 + k, H/8, W/8]``: the
        posterior's mean (what Wan2.1 uses), or with ``moments=True`` the pair (mean, log-variance).

        ``chunk``: latent frames per call (None: all); ``piece_frames``: input frames per call in the
        layers before the first temporal downsampler (None: the chunk's); both exact."""
        if not self.has_encoder:
            raise ValueError("this VAE was built without its encoder")
        cfg = self.config
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != cfg.in_channels:
            raise ValueError(f"video must be [B, {cfg.in_channels}, F, H, W], got "
                             f"{getattr(video, 'shape', type(video).__name__)}")
        f, tf = video.shape[2], cfg.temporal_factor
        _check_input(video, "video", self.quant_conv.weight, min_side=cfg.spatial_factor)
        if (f - 1) % tf:
            raise ValueError(f"the encoder takes 1 + {tf}k frames, got {f} (diffusers would drop the last "
                             f"{(f - 1) % tf}); pad or cut the clip")
        _check_chunk(chunk)
        _check_positive("piece_frames", piece_frames)
        latents = 1 + (f - 1) // tf
        step = latents if chunk is None else chunk
        x = video.contiguous(memory_format=self.memory_format)
        cache: dict = {}
        parts, low = [], []  # the encoder's outputs; its head's outputs not yet through its tail
        group = step * -(-LATENT_STAGE_FRAMES // step)  # latent frames the tail takes per call: whole chunks
        with self._autotuned():
            for s in range(0, latents, step):  # latent frames s .. s+step come from these input frames
                f0 = 0 if s == 0 else 1 + tf * (s - 1)
                f1 = 1 + tf * (min(s + step, latents) - 1)
                low.append(self.encoder.head(x[:, :, f0:f1], cache, starts=s == 0, piece_frames=piece_frames))
                if s + step >= latents or (s + step) % group == 0:
                    tail_input = _cat_frames(low)
                    low.clear()  # (the parts not held beside their concatenation through the tail)
                    parts.append(self.encoder.tail(tail_input, cache))
                    del tail_input
        h = self.quant_conv(_cat_frames(parts))
        mean, logvar = h[:, :cfg.z_dim], h[:, cfg.z_dim:]
        # clamped as diffusers' DiagonalGaussianDistribution does
        return (mean, logvar.clamp(-30.0, 20.0)) if moments else mean

    def forward(self, z: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        return self.decode(z, chunk)


class WanVAEDecoder(WanVAE):
    """The decoder half alone (``post_quant_conv`` + ``decoder``); calling it decodes."""

    def __init__(self, cfg: WanVAEConfig | None = None):
        super().__init__(cfg, encoder=False)
