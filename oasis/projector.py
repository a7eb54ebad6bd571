"""The encoder-free latent projector (OASIS eq. 3): pixel-unshuffle, then one linear map.

The Wan2.1 VAE compresses 4x in time and 8x in space, and OASIS super-resolves 4x, so the
latent grid of the high-quality output is the low-quality video's grid divided by 4 in time
and by 8/4 = 2 in space. The projector reads exactly that: each latent token gathers a block
of ``frames_per_latent x pixels x pixels`` LQ values (4 x 2 x 2 x RGB = 48 numbers) and maps
them linearly to the 16 latent channels.

Temporal grouping follows the causal VAE: latent frame 0 sees LQ frame 0 alone, latent frame
``i >= 1`` sees LQ frames ``4i-3 .. 4i``. Frame 0 is repeated 4 times to fill its group, so one
weight matrix serves every latent frame and a constant video maps to a constant latent.
``F = 4k + 1`` LQ frames give ``1 + k`` latent frames.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["ProjectorConfig", "LatentProjector"]


@dataclass(frozen=True)
class ProjectorConfig:
    latent_channels: int = 16
    in_channels: int = 3
    frames_per_latent: int = 4   # the VAE's temporal compression
    pixels_per_latent: int = 2   # the VAE's spatial compression (8) / the upscale factor (4)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ProjectorConfig.{name} must be a positive int, got {value!r}")

    @property
    def features(self) -> int:
        return self.in_channels * self.frames_per_latent * self.pixels_per_latent ** 2

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent ``(T, H, W)`` of an LQ clip; raises ValueError when the clip does not fit the grid."""
        ft, s = self.frames_per_latent, self.pixels_per_latent
        if frames < 1 or (frames - 1) % ft:
            raise ValueError(f"the projector takes {ft}k+1 frames, got {frames}")
        if height % s or width % s or height <= 0 or width <= 0:
            raise ValueError(f"the projector takes frames whose sides are multiples of {s}, got {height}x{width}")
        return 1 + (frames - 1) // ft, height // s, width // s


class LatentProjector(nn.Module):
    """``video [B, 3, F, h, w]`` in [-1, 1] -> latents ``[B, 16, 1 + (F-1)/4, h/2, w/2]``."""

    def __init__(self, config: ProjectorConfig | None = None):
        super().__init__()
        self.config = config = config or ProjectorConfig()
        self.proj = nn.Linear(config.features, config.latent_channels)

    def unshuffle(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, h, w]`` -> ``[B, T, H, W, C*ft*s*s]`` (feature order: channel, frame, row, column)."""
        cfg = self.config
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != cfg.in_channels:
            raise ValueError(f"video must be [B, {cfg.in_channels}, F, h, w], got "
                             f"{getattr(video, 'shape', type(video).__name__)}")
        b, c, f, h, w = video.shape
        t, hh, ww = cfg.latent_shape(f, h, w)
        ft, s = cfg.frames_per_latent, cfg.pixels_per_latent
        video = torch.cat([video[:, :, :1].expand(b, c, ft - 1, h, w), video], dim=2)  # frame 0 fills its group
        x = video.reshape(b, c, t, ft, hh, s, ww, s)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, t, hh, ww, c * ft * s * s)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.unshuffle(video.to(self.proj.weight.dtype))
        return self.proj(x).permute(0, 4, 1, 2, 3)
