"""The Wan2.1 VAE decoder, through diffusers' ``AutoencoderKLWan`` (the optional ``vsr`` extra).

The DiT works on normalised latents ``(z - mean) / std`` (Wan2.1's convention); the decoder
takes raw latents, so :class:`WanDecoder` undoes the normalisation with the VAE's own
``latents_mean`` / ``latents_std`` before decoding.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["WanDecoder", "load_vae", "find_vae"]

WAN_VAE_FILE = "Wan2.1_VAE.pth"


def _diffusers_vae_class():
    try:
        from diffusers import AutoencoderKLWan
    except ImportError:
        raise ImportError("decoding needs diffusers' AutoencoderKLWan: pip install 'oasis-kernels[vsr]'") from None
    return AutoencoderKLWan


def find_vae(path) -> Path:
    """The VAE of a checkpoint folder: ``vae/`` (diffusers' layout), or Wan2.1's ``Wan2.1_VAE.pth``."""
    path = Path(path)
    for candidate in (path / "vae", path):
        if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
            cfg = candidate / "config.json"
            if "AutoencoderKLWan" in cfg.read_text():
                return candidate
    if (path / WAN_VAE_FILE).is_file():
        return path / WAN_VAE_FILE
    raise ValueError(f"{path}: no Wan VAE (expected vae/ with config.json + safetensors, or {WAN_VAE_FILE})")


def load_vae(path, *, dtype=torch.float32, device="cpu"):
    """diffusers' ``AutoencoderKLWan`` from a folder in diffusers' layout or Wan2.1's ``.pth``."""
    cls = _diffusers_vae_class()
    path = Path(path)
    if path.suffix == ".pth":
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        state = torch.load(path, map_location="cpu", weights_only=True)
        vae = cls()  # diffusers' default config is Wan2.1's VAE
        missing, unexpected = vae.load_state_dict(convert_wan_vae_to_diffusers(state), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: not a Wan2.1 VAE checkpoint ({len(missing)} missing tensors, e.g. "
                             f"{missing[:3]}; {len(unexpected)} unknown, e.g. {unexpected[:3]})")
    else:
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its notes about `accelerate` are not the user's business
        try:
            vae = cls.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
        finally:
            diffusers_logging.set_verbosity(level)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


class WanDecoder:
    """Normalised latents ``[B, 16, T, H, W]`` -> video ``[B, 3, 1 + 4(T-1), 8H, 8W]`` in [-1, 1]."""

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.temporal = int(getattr(cfg, "scale_factor_temporal", 4) or 4)
        self.spatial = int(getattr(cfg, "scale_factor_spatial", 8) or 8)
        self.z_dim = int(cfg.z_dim)
        self.width = int(getattr(cfg, "decoder_base_dim", None) or cfg.base_dim)  # channels of its last stage

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def raw_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() * self.std.to(z.device) + self.mean.to(z.device)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.raw_latents(z).to(self.dtype)).sample
