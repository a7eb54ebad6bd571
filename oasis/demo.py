"""A tiny random-weight OASIS pipeline for demos and tests: it shows the pipeline work, it restores nothing."""

from __future__ import annotations

import torch

from .config import WanConfig
from .dit import WanDiT
from .pipeline import OasisVSR
from .projector import LatentProjector
from .vae import WanDecoder
from .wan_vae import WanVAEConfig, WanVAEDecoder

__all__ = ["TINY_DIT", "TINY_VAE", "tiny_pipeline"]

# 3 heads of 16 channels, 2 layers; routed global / intra / window in each layer
TINY_DIT = WanConfig(dim=48, ffn_dim=96, num_heads=3, num_layers=2, text_dim=32, text_len=8, freq_dim=32)
TINY_VAE = WanVAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
TINY_ROUTING = [["global", "intra", "window"], ["window", "global", "intra"]]


def tiny_pipeline(seed: int = 0, *, device="cpu", routing=TINY_ROUTING) -> OasisVSR:
    """Untrained: random DiT, projector, context and VAE of the right shapes (x4, 4x8x8 latents)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dit = WanDiT(TINY_DIT)
    vae = WanVAEDecoder(TINY_VAE)
    projector = LatentProjector()
    with torch.no_grad():  # Wan zero-initialises the output head; random weights make the demo do something
        for p in dit.head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    dit.set_routing(routing)
    context = torch.randn(TINY_DIT.text_len, TINY_DIT.text_dim, generator=gen)
    pipe = OasisVSR(dit.to(device), projector.to(device), WanDecoder(vae.to(device).eval().requires_grad_(False)),
                    context=context)
    return pipe
