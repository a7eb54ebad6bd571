"""Loading the Wan2.1 VAE decoder, and :class:`WanDecoder`, the pipeline's decoding stage.

Two decoders compute the same numbers: ours (:mod:`oasis.wan_vae`, the default) and diffusers'
``AutoencoderKLWan`` (``backend="diffusers"``, the reference). Both read a VAE folder in diffusers'
layout (``config.json`` + safetensors) or Wan2.1's ``Wan2.1_VAE.pth`` (whose tensor names are
mapped with diffusers' converter, so that file needs diffusers installed).

The DiT works on normalised latents ``(z - mean) / std`` (Wan2.1's convention); the decoder takes
raw latents, so :class:`WanDecoder` undoes the normalisation with the VAE's ``latents_mean`` /
``latents_std`` before decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import CheckpointError, check_state, read_safetensors, write_safetensors
from .wan_vae import WanVAEConfig, WanVAEDecoder

__all__ = ["WanDecoder", "load_vae", "find_vae", "save_vae", "WAN_VAE_FILE"]

WAN_VAE_FILE = "Wan2.1_VAE.pth"
_DECODER_PREFIXES = ("decoder.", "post_quant_conv.")
_ENCODER_PREFIXES = ("encoder.", "quant_conv.")  # present in a full VAE; the decoder leaves them


def _diffusers_vae_class():
    try:
        from diffusers import AutoencoderKLWan
    except ImportError:
        raise ImportError("this needs diffusers' AutoencoderKLWan: pip install 'oasis-kernels[vsr]'") from None
    return AutoencoderKLWan


def find_vae(path) -> Path:
    """The VAE of a checkpoint folder: ``vae/`` (diffusers' layout), or Wan2.1's ``Wan2.1_VAE.pth``."""
    path = Path(path)
    for candidate in (path / "vae", path):
        cfg = candidate / "config.json"
        if cfg.is_file() and any(candidate.glob("*.safetensors")) and "AutoencoderKLWan" in cfg.read_text():
            return candidate
    if (path / WAN_VAE_FILE).is_file():
        return path / WAN_VAE_FILE
    raise CheckpointError(f"{path}: no Wan VAE (expected vae/ with config.json + safetensors, or {WAN_VAE_FILE})")


def _wan_pth_state(path: Path) -> dict:
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    _diffusers_vae_class()
    return convert_wan_vae_to_diffusers(torch.load(path, map_location="cpu", weights_only=True))


def load_vae(path, *, dtype=torch.float32, device="cpu", backend: str = "oasis"):
    """The decoder of a VAE folder or ``.pth``: ours (``backend="oasis"``) or diffusers' whole VAE."""
    if backend not in ("oasis", "diffusers"):
        raise ValueError(f"backend must be 'oasis' or 'diffusers', got {backend!r}")
    path = Path(path)
    if backend == "diffusers":
        cls = _diffusers_vae_class()
        if path.suffix == ".pth":
            vae = cls()  # diffusers' default config is Wan2.1's VAE
            missing, unexpected = vae.load_state_dict(_wan_pth_state(path), strict=False)
            if missing or unexpected:
                raise CheckpointError(f"{path}: not a Wan2.1 VAE ({len(missing)} missing tensors, e.g. {missing[:3]}; "
                                      f"{len(unexpected)} unknown, e.g. {unexpected[:3]})")
        else:
            from diffusers.utils import logging as diffusers_logging

            level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # its notes about `accelerate` are not the user's business
            try:
                vae = cls.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
            finally:
                diffusers_logging.set_verbosity(level)
        return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if path.suffix == ".pth":
        config, state = WanVAEConfig(), _wan_pth_state(path)
    else:
        try:
            config = WanVAEConfig.from_dict(json.loads((path / "config.json").read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read config.json ({exc})") from None
        state = read_safetensors(path)
    state = {k: v for k, v in state.items() if not k.startswith(_ENCODER_PREFIXES)}
    with torch.device("meta"):
        decoder = WanVAEDecoder(config)
    check_state(state, decoder, path)
    decoder.load_state_dict(state, assign=True)
    return decoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_vae(vae, path) -> None:
    """Write a VAE folder in diffusers' layout (ours: the decoder's tensors only)."""
    path = Path(path)
    if not isinstance(vae, WanVAEDecoder):
        vae.save_pretrained(str(path))
        return
    cfg = vae.config
    config = {"_class_name": "AutoencoderKLWan", "base_dim": cfg.base_dim, "z_dim": cfg.z_dim,
              "dim_mult": list(cfg.dim_mult), "num_res_blocks": cfg.num_res_blocks,
              "temperal_downsample": list(cfg.temperal_downsample), "out_channels": cfg.out_channels,
              "attn_scales": [], "latents_mean": list(cfg.latents_mean), "latents_std": list(cfg.latents_std),
              "oasis_decoder_only": True}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    write_safetensors(vae.state_dict(), path, "diffusion_pytorch_model")


class WanDecoder:
    """Normalised latents ``[B, 16, T, H, W]`` -> video ``[B, 3, 1 + 4(T-1), 8H, 8W]`` in [-1, 1].

    ``vae``: our :class:`~oasis.wan_vae.WanVAEDecoder` (decoding ``chunk`` latent frames per call) or
    diffusers' ``AutoencoderKLWan``.
    """

    def __init__(self, vae, *, chunk: int | None = 1):
        self.vae, self.chunk = vae, chunk
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.temporal = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        self.spatial = 2 ** (len(cfg.dim_mult) - 1)
        self.z_dim = int(cfg.z_dim)
        self.width = int(cfg.base_dim)  # channels of its last, full-resolution stage

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
        raw = self.raw_latents(z).to(self.dtype)
        if isinstance(self.vae, WanVAEDecoder):
            return self.vae(raw, chunk=self.chunk)
        return self.vae.decode(raw).sample
