"""Loading and saving the Wan2.1 VAE, and :class:`WanDecoder`, the pipeline's decoding stage.

Two implementations compute the same numbers: ours (:class:`oasis.wan_vae.WanVAE`, the default) and
diffusers' ``AutoencoderKLWan`` (``backend="diffusers"``, the reference). Both read a VAE folder in
diffusers' layout (``config.json`` + safetensors) or Wan2.1's ``Wan2.1_VAE.pth``; ours maps that
file's tensor names itself (:func:`wan_to_diffusers_names`), diffusers' backend with its converter.

The DiT works on normalised latents ``(z - mean) / std`` (Wan2.1's convention); the VAE takes and
gives raw latents, so :class:`WanDecoder` undoes the normalisation with the VAE's ``latents_mean`` /
``latents_std`` before decoding (and :func:`normalise_latents` applies it after encoding).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, check_state, read_safetensors, write_safetensors
from .wan_vae import WanVAE, WanVAEConfig

__all__ = ["WanDecoder", "load_vae", "find_vae", "save_vae", "wan_to_diffusers_names", "normalise_latents",
           "WAN_VAE_FILE"]

WAN_VAE_FILE = "Wan2.1_VAE.pth"
_ENCODER_PREFIXES = ("encoder.", "quant_conv.")


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


_RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
             "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
             "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}


def wan_to_diffusers_names(state: dict, config: WanVAEConfig | None = None) -> dict:
    """Wan2.1's ``Wan2.1_VAE.pth`` tensor names -> diffusers' (and ours). Names already in diffusers'
    layout, and names neither knows, pass unchanged (so the shape check lists the unknown ones).

    Wan2.1 numbers its decoder's layers in one list (``decoder.upsamples.N``): per stage
    ``num_res_blocks + 1`` residual blocks, then the stage's upsampler (none after the last).
    """
    cfg = config or WanVAEConfig()
    per_stage = cfg.num_res_blocks + 2
    out = {}
    for key, value in state.items():
        new = key
        m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
        if key.startswith(("conv1.", "conv2.")):
            new = ("quant_conv." if key.startswith("conv1.") else "post_quant_conv.") + key.split(".", 1)[1]
        elif m:
            part, rest = m.groups()
            if rest.startswith("conv1."):
                rest = "conv_in." + rest[len("conv1."):]
            elif rest.startswith("head.0."):
                rest = "norm_out." + rest[len("head.0."):]
            elif rest.startswith("head.2."):
                rest = "conv_out." + rest[len("head.2."):]
            elif mm := re.fullmatch(r"middle\.([02])\.(.+)", rest):
                rest = f"mid_block.resnets.{int(mm[1]) // 2}.{_RESIDUAL.get(mm[2], mm[2])}"
            elif mm := re.fullmatch(r"middle\.1\.(.+)", rest):
                rest = f"mid_block.attentions.0.{mm[1]}"
            elif mm := re.fullmatch(r"downsamples\.(\d+)\.(.+)", rest):
                rest = f"down_blocks.{mm[1]}.{_RESIDUAL.get(mm[2], mm[2])}"
            elif mm := re.fullmatch(r"upsamples\.(\d+)\.(.+)", rest):
                stage, i = divmod(int(mm[1]), per_stage)
                if i == per_stage - 1:
                    rest = f"up_blocks.{stage}.upsamplers.0.{mm[2]}"
                else:
                    rest = f"up_blocks.{stage}.resnets.{i}.{_RESIDUAL.get(mm[2], mm[2])}"
            new = f"{part}.{rest}"
        out[new] = value
    return out


def _read_pth(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch's own errors for a corrupt or foreign file
        raise CheckpointError(f"{path}: cannot read the file ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def load_vae(path, *, dtype=torch.float32, device="cpu", backend: str = "oasis", encoder: bool | None = None):
    """The VAE of a folder in diffusers' layout or Wan2.1's ``.pth``: ours (``backend="oasis"``, a
    :class:`~oasis.wan_vae.WanVAE`) or diffusers' ``AutoencoderKLWan``.

    ``encoder``: ``None`` loads the encoder when the file has it, ``True`` requires it, ``False``
    leaves it out (diffusers' VAE then has ``encoder = None``).
    """
    if backend not in ("oasis", "diffusers"):
        raise ValueError(f"backend must be 'oasis' or 'diffusers', got {backend!r}")
    if encoder not in (None, True, False):
        raise ValueError(f"encoder must be None, True or False, got {encoder!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
    path = Path(path)
    if backend == "diffusers":
        cls = _diffusers_vae_class()
        if path.suffix == ".pth":
            from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

            vae = cls()  # diffusers' default config is Wan2.1's VAE
            missing, unexpected = vae.load_state_dict(convert_wan_vae_to_diffusers(_read_pth(path)), strict=False)
            if missing or unexpected:
                raise CheckpointError(f"{path}: not a Wan2.1 VAE ({len(missing)} missing tensors, e.g. {missing[:3]}; "
                                      f"{len(unexpected)} unknown, e.g. {unexpected[:3]})")
        else:
            from diffusers.utils import logging as diffusers_logging

            level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # its notes about `accelerate` are not the user's business
            # diffusers fills a missing encoder with random values: a decoder-only folder loads without one
            decoder_only = not any(k.startswith(_ENCODER_PREFIXES) for k in read_safetensors(path))
            if decoder_only and encoder:
                raise CheckpointError(f"{path}: no encoder tensors (encoder.*, quant_conv.*): a decoder-only VAE")
            try:
                vae = cls.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
            finally:
                diffusers_logging.set_verbosity(level)
            if decoder_only or encoder is False:
                vae.encoder = vae.quant_conv = None  # no random encoder left to call by mistake
        return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if path.suffix == ".pth":
        config = WanVAEConfig()
        state = wan_to_diffusers_names(_read_pth(path), config)
    else:
        try:
            config = WanVAEConfig.from_dict(json.loads((path / "config.json").read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read config.json ({exc})") from None
        state = read_safetensors(path)
    has_encoder = any(k.startswith(_ENCODER_PREFIXES) for k in state)
    if encoder and not has_encoder:
        raise CheckpointError(f"{path}: no encoder tensors (encoder.*, quant_conv.*): a decoder-only VAE")
    with_encoder = has_encoder if encoder is None else encoder
    if not with_encoder:
        state = {k: v for k, v in state.items() if not k.startswith(_ENCODER_PREFIXES)}
    with torch.device("meta"):
        vae = WanVAE(config, encoder=with_encoder)
    check_state(state, vae, path)
    vae.load_state_dict(state, assign=True)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_vae(vae, path) -> None:
    """Write a VAE folder in diffusers' layout (ours: the halves it has)."""
    path = Path(path)
    if not isinstance(vae, WanVAE):
        vae.save_pretrained(str(path))
        return
    config = vae.config.to_dict()
    if not vae.has_encoder:
        config["oasis_decoder_only"] = True
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}  # channels-last weights are stored plainly
    write_safetensors(state, path, "diffusion_pytorch_model")


def normalise_latents(z: torch.Tensor, config: WanVAEConfig) -> torch.Tensor:
    """Raw latents -> the DiT's ``(z - mean) / std`` (float32)."""
    mean = torch.tensor(config.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std, device=z.device).view(1, -1, 1, 1, 1)
    return (z.float() - mean) / std


class WanDecoder:
    """Normalised latents ``[B, 16, T, H, W]`` -> video ``[B, 3, 1 + 4(T-1), 8H, 8W]`` in [-1, 1].

    ``vae``: our :class:`~oasis.wan_vae.WanVAE` (decoding ``chunk`` latent frames per call, the two
    largest stages ``piece_frames`` output frames per call: the fastest setting measured at 720p and
    the smallest working set but one, docs/PERF.md entry 18b) or diffusers' ``AutoencoderKLWan``.
    """

    def __init__(self, vae, *, chunk: int | None = 1, piece_frames: int | None = 2):
        self.vae, self.chunk, self.piece_frames = vae, chunk, piece_frames
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.temporal = 2 ** sum(bool(t) for t in cfg.temperal_downsample)
        self.spatial = 2 ** (len(cfg.dim_mult) - 1)
        self.z_dim = int(cfg.z_dim)
        self.width = int(cfg.base_dim)  # channels of its last, full-resolution stage

    @property
    def working_values(self) -> int:
        """Activation values per output pixel of one frame while decoding (bf16, Wan2.1's width), for the
        memory plan: measured peaks at 720x1280 on an H200, rounded up (docs/PERF.md entry 18b)."""
        if isinstance(self.vae, WanVAE) and self.chunk == 1 and self.piece_frames is not None and self.piece_frames <= 2:
            return 3900  # ours, chunk 1 in pieces of <= 2 frames: 6.6 GiB above its inputs
        return 5700  # diffusers' (9.9 GiB) and ours at chunk 1 without pieces (8.3 GiB)

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
        if isinstance(self.vae, WanVAE):
            return self.vae.decode(raw, chunk=self.chunk, piece_frames=self.piece_frames)
        return self.vae.decode(raw).sample
