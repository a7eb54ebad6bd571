"""The Wan2.1 VAE decoder, our own: the same numbers as diffusers' ``AutoencoderKLWan.decode``,
computed over many frames per call instead of one latent frame at a time.

diffusers decodes latent frame by latent frame, each causal 3D convolution carrying the last two
frames of its input to the next call. Every temporal operation is causal, so the same result comes
from running each convolution over a whole run of frames with that cache in front; only the
temporal upsamplers treat the first latent frame apart (it is upsampled in space only, and their
time convolution starts, zero-padded, at the second frame). :class:`WanDecoder3d` does exactly that,
on chunks of any number of latent frames (``chunk``), with the cache handed from chunk to chunk:
all frames at once is one call per layer, and a small chunk bounds the memory.

Tensor names are diffusers' (``decoder.up_blocks.0.resnets.1.conv2.weight``, ...), so a diffusers
VAE folder loads as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WanVAEConfig", "WanDecoder3d", "WanVAEDecoder"]


@dataclass(frozen=True)
class WanVAEConfig:
    """Wan2.1's VAE (diffusers' ``AutoencoderKLWan`` defaults)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
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
        keys = {"base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample", "out_channels",
                "latents_mean", "latents_std"}
        out = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in keys}
        if d.get("decoder_base_dim") not in (None, d.get("base_dim", 96)):
            raise ValueError("decoder_base_dim differing from base_dim is not supported")
        return cls(**out)


class CausalConv3d(nn.Conv3d):
    """A 3D convolution padded in front in time only, continuing a sequence across calls.

    ``cache`` (a dict shared by the layers of one decode) holds each layer's last ``kt - 1`` input
    frames; without an entry the sequence starts with zeros, as diffusers' first call does.
    """

    def __init__(self, cin: int, cout: int, kernel, padding=0):
        super().__init__(cin, cout, kernel, padding=0)
        kt = self.kernel_size[0]
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.space_pad = (p[2], p[2], p[1], p[1])
        self.time_pad = 2 * p[0]
        assert self.time_pad == kt - 1 or kt == 1

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        if self.time_pad:
            prev = None if cache is None else cache.get(self)
            if prev is None:
                prev = x.new_zeros(x.shape[0], x.shape[1], self.time_pad, *x.shape[3:])
            x = torch.cat([prev, x], dim=2)
            if cache is not None:  # a copy: a view would keep the whole concatenated input alive
                cache[self] = x[:, :, -self.time_pad:].clone()
        if any(self.space_pad):
            x = F.pad(x, self.space_pad)
        return super().forward(x)


class RMSNorm(nn.Module):
    """L2-normalise over channels (float32 for 16-bit inputs), times sqrt(C) * gamma."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return F.normalize(wide, dim=1).to(x.dtype) * self.scale * self.gamma


def norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """SiLU(RMSNorm(x)): the pair every residual block and the output run (one pass when compiled)."""
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return F.silu(F.normalize(wide, dim=1).to(x.dtype) * scale * gamma)


class ResidualBlock(nn.Module):
    fused_norm_silu = None  # set by WanVAEDecoder.compile_norms: a compiled norm_silu

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = RMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x, cache):
        act = self.fused_norm_silu or norm_silu
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(act(x, self.norm1.gamma, self.norm1.scale), cache)
        x = self.conv2(act(x, self.norm2.gamma, self.norm2.scale), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 3 * c, h * w).transpose(1, 2)
        q, k, v = qkv[:, None].chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b * t, c, h, w)
        return x + self.proj(y).view(b, t, c, h, w).transpose(1, 2)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x, cache):
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class Upsample(nn.Module):
    """2x in space (nearest-exact, then a 3x3 conv to ``dim // 2`` channels); with ``temporal``, first
    2x in time by a causal (3,1,1) conv to twice the channels, interleaved as two frames."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                      nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def _space(self, x):
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        up = self.resample[1](F.interpolate(frames.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype))
        return up.view(b, t, *up.shape[1:]).transpose(1, 2)

    def forward(self, x, cache, starts: bool):
        """``starts``: ``x`` begins with the sequence's first frame, which is upsampled in space only."""
        if self.time_conv is None:
            return self._space(x)
        head, x = (x[:, :, :1], x[:, :, 1:]) if starts else (None, x)
        if x.shape[2]:
            b, c, t, h, w = x.shape
            x = self.time_conv(x, cache).view(b, 2, c, t, h, w)
            x = torch.stack([x[:, 0], x[:, 1]], dim=3).reshape(b, c, 2 * t, h, w)
        if head is not None:
            x = torch.cat([head, x], dim=2)
        return self._space(x)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, upsample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_res_blocks + 1))
        self.upsamplers = None if upsample is None else nn.ModuleList([Upsample(cout, upsample == "3d")])

    def forward(self, x, cache, starts):
        for r in self.resnets:
            x = r(x, cache)
        return x if self.upsamplers is None else self.upsamplers[0](x, cache, starts)


class WanDecoder3d(nn.Module):
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

    def forward(self, z, cache: dict, starts: bool):
        x = self.mid_block(self.conv_in(z, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache, starts)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class WanVAEDecoder(nn.Module):
    """Raw latents ``[B, z_dim, T, H, W]`` -> video ``[B, 3, 1 + 4(T-1), 8H, 8W]`` clamped to [-1, 1].

    ``chunk`` latent frames go through each layer per call (``None``: all of them); the causal cache
    makes every choice give the same result.
    """

    def __init__(self, cfg: WanVAEConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or WanVAEConfig()
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = WanDecoder3d(cfg)

    def channels_last(self, enabled: bool = True) -> "WanVAEDecoder":
        """Store the 3D convolutions' weights channels-last (NDHWC), the layout cuDNN's fast kernels read."""
        fmt = torch.channels_last_3d if enabled else torch.contiguous_format
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
        return self

    def compile_norms(self, enabled: bool = True) -> "WanVAEDecoder":
        """torch.compile the RMSNorm + SiLU pairs (one compiled function for every block and shape)."""
        fused = torch.compile(norm_silu, dynamic=True) if enabled else None
        for m in self.modules():
            if isinstance(m, ResidualBlock):
                m.fused_norm_silu = fused
        return self

    def forward(self, z: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.dim() != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"latents must be [B, {self.config.z_dim}, T, H, W], got "
                             f"{getattr(z, 'shape', type(z).__name__)}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
            raise ValueError(f"chunk must be a positive number of latent frames or None, got {chunk!r}")
        x = self.post_quant_conv(z)
        t = x.shape[2]
        step = t if chunk is None else chunk
        cache: dict = {}
        out = [self.decoder(x[:, :, s:s + step], cache, starts=s == 0) for s in range(0, t, step)]
        return torch.cat(out, dim=2).clamp_(-1.0, 1.0)
