"""OASIS: one-step video super-resolution on Wan2.1 with routed attention heads.

>>> import oasis
>>> dit = oasis.WanDiT.from_pretrained("ckpt/transformer", routing="routing.json", dtype=torch.bfloat16, device="cuda")
>>> pipe = oasis.OasisVSR.from_pretrained("ckpt", dtype=torch.bfloat16, device="cuda")
>>> hq = pipe(lq_frames)            # uint8 [F, h, w, 3] -> uint8 [F, 4h, 4w, 3]
"""

from .checkpoint import CheckpointError
from .config import WanConfig
from .dit import WanDiT
from .wan_vae import WanVAE, WanVAEConfig

__all__ = ["WanConfig", "WanDiT", "WanVAE", "WanVAEConfig", "CheckpointError"]
