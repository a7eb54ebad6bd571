"""The training objective of OASIS (sec. 3.4.2, eqs. 8-11):

    L = L_latent + L_per + lambda_warp * L_warp,   L_per = L2 + LPIPS,   lambda_warp = 0.1

- ``L_latent`` (eq. 8): mean squared error between the restored latents and the VAE encoding of the
  HQ clip (a mean over elements, as torch's ``mse_loss``; the paper's per-sample squared norm
  differs from it by the constant number of elements, which only rescales the other weights);
- ``L_per`` (eq. 9): mean squared error plus LPIPS between the decoded prediction and the HQ clip,
  LPIPS optional (``lpips=None`` trains without it, as an explicit choice);
- ``L_warp`` (eq. 10): for each pair of neighbouring frames, each predicted frame warped onto its
  neighbour by the ground truth's optical flow, mean absolute difference to the neighbour, summed
  over pairs; pixels whose flow leaves the frame are left out.

Videos are ``[B, C, F, H, W]`` in [-1, 1] (the VAE's range). Flows are ``[B, F-1, 2, H, W]`` in
pixels, (dx, dy), defined on the grid of the frame being compared against (see :func:`warp`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["warp", "latent_loss", "perceptual_loss", "warp_loss", "OasisLoss", "load_lpips", "lpips_backbone_names",
           "load_raft", "clip_flows"]


def warp(src: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward warping: ``out(x) = src(x + flow(x))`` by bilinear sampling, and the mask of pixels
    whose sample lies inside ``src``.

    ``src [N, C, H, W]``, ``flow [N, 2, H, W]`` (dx, dy in pixels, on the output's grid). Returns
    ``(out [N, C, H, W], valid [N, 1, H, W] float)``.
    """
    if src.dim() != 4 or flow.dim() != 4 or flow.shape[1] != 2 or flow.shape[0] != src.shape[0] or \
            flow.shape[-2:] != src.shape[-2:]:
        raise ValueError(f"warp takes src [N, C, H, W] and flow [N, 2, H, W] of the same N, H, W; got "
                         f"{tuple(src.shape)} and {tuple(flow.shape)}")
    n, _, h, w = src.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=src.device, dtype=flow.dtype),
                            torch.arange(w, device=src.device, dtype=flow.dtype), indexing="ij")
    x = xs + flow[:, 0]
    y = ys + flow[:, 1]
    # align_corners=True: -1 and 1 are the centres of the first and last pixels
    grid = torch.stack([2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1], dim=-1)
    out = F.grid_sample(src, grid.to(src.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    valid = ((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)).to(src.dtype)[:, None]
    return out, valid


def latent_loss(z_pred: torch.Tensor, z_hq: torch.Tensor) -> torch.Tensor:
    """Eq. 8: mean squared error of the restored latents against the HQ clip's."""
    _same_shape(z_pred, z_hq, "latents")
    return F.mse_loss(z_pred.float(), z_hq.float())


def perceptual_loss(video: torch.Tensor, target: torch.Tensor, lpips=None) -> dict:
    """Eq. 9: ``{"mse": ..., "lpips": ...}`` (``lpips`` absent when no LPIPS model is given); each frame
    of ``[B, C, F, H, W]`` goes through LPIPS as an image of the batch."""
    _same_shape(video, target, "videos")
    out = {"mse": F.mse_loss(video.float(), target.float())}
    if lpips is not None:
        b, c, f, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * f, c, h, w)
        ref = target.transpose(1, 2).reshape(b * f, c, h, w)
        out["lpips"] = lpips(frames.float(), ref.float()).mean()
    return out


def warp_loss(video: torch.Tensor, to_next: torch.Tensor, to_prev: torch.Tensor) -> torch.Tensor:
    """Eq. 10 over the pairs (t, t+1) of ``video [B, C, F, H, W]``:

    ``|warp(V_t, to_next_t) - V_{t+1}|`` + ``|warp(V_{t+1}, to_prev_t) - V_t|``, each a mean over the
    valid pixels, summed over pairs and averaged over the batch. ``to_next [B, F-1, 2, H, W]``: flow
    on frame t+1's grid into frame t (the ground truth's backward flow); ``to_prev``: on frame t's
    grid into frame t+1 (its forward flow).
    """
    if video.dim() != 5:
        raise ValueError(f"video must be [B, C, F, H, W], got {tuple(video.shape)}")
    b, c, f, h, w = video.shape
    want = (b, f - 1, 2, h, w)
    for name, fl in (("to_next", to_next), ("to_prev", to_prev)):
        if tuple(fl.shape) != want:
            raise ValueError(f"{name} must be [B, F-1, 2, H, W] = {list(want)}, got {list(fl.shape)}")
    if f < 2:
        return video.new_zeros((), dtype=torch.float32)
    v = video.float()
    cur = v[:, :, :-1].transpose(1, 2).reshape(-1, c, h, w)  # frames t
    nxt = v[:, :, 1:].transpose(1, 2).reshape(-1, c, h, w)  # frames t+1
    total = v.new_zeros(())
    for src, dst, flow in ((cur, nxt, to_next), (nxt, cur, to_prev)):
        warped, valid = warp(src, flow.reshape(-1, 2, h, w).float())
        err = ((warped - dst).abs() * valid).sum(dim=(1, 2, 3)) / (valid.sum(dim=(1, 2, 3)) * c).clamp_min(1)
        total = total + err.view(b, f - 1).sum(1).mean()
    return total


@dataclass
class OasisLoss:
    """Eq. 11 with its weights; ``lpips``: a callable ``(x, y) -> [N, 1, 1, 1]`` on images in [-1, 1]
    (:func:`load_lpips`), or None to train without it."""

    lpips: object = None
    warp_weight: float = 0.1
    lpips_weight: float = 1.0

    def __call__(self, z_pred, z_hq, video_pred, video_hq, to_next=None, to_prev=None) -> dict:
        """The parts and their weighted sum under ``"total"``; the warp term needs both flows."""
        parts = {"latent": latent_loss(z_pred, z_hq)}
        per = perceptual_loss(video_pred, video_hq, self.lpips)
        parts["mse"] = per["mse"]
        total = parts["latent"] + parts["mse"]
        if "lpips" in per:
            parts["lpips"] = per["lpips"]
            total = total + self.lpips_weight * parts["lpips"]
        if (to_next is None) != (to_prev is None):
            raise ValueError("the warp loss needs both flows (to_next and to_prev) or neither")
        if to_next is not None and self.warp_weight:
            parts["warp"] = warp_loss(video_pred, to_next, to_prev)
            total = total + self.warp_weight * parts["warp"]
        parts["total"] = total
        return parts


# LPIPS keeps torchvision's backbone in slices whose modules keep their index in ``features``
_LPIPS_SLICES = {"vgg": (4, 9, 16, 23, 30), "alex": (2, 5, 8, 10, 12)}


def lpips_backbone_names(state: dict, net: str) -> dict:
    """torchvision's ``features.N.*`` backbone tensors -> the ``sliceK.N.*`` names of an LPIPS model's ``net``."""
    if net not in _LPIPS_SLICES:
        raise ValueError(f"net must be one of {sorted(_LPIPS_SLICES)}, got {net!r}")
    ends = _LPIPS_SLICES[net]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "features" or not parts[1].isdigit():
            continue  # the classifier and anything else: LPIPS does not use them
        i = int(parts[1])
        k = next((j for j, end in enumerate(ends) if i < end), None)
        if k is not None:
            out[f"slice{k + 1}.{i}.{parts[2]}"] = value
    return out


def load_lpips(backbone_path, net: str = "vgg", device="cpu"):
    """An ``lpips.LPIPS`` model with its backbone read from a local torchvision checkpoint (no download):
    ``vgg16`` for ``net="vgg"`` (the usual choice for training), ``alexnet`` for ``"alex"``. Its own
    linear layers ship inside the ``lpips`` package."""
    path = Path(backbone_path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS backbone weights not found at {path}: give the local torchvision "
                                f"{'vgg16' if net == 'vgg' else 'alexnet'} checkpoint, or train without LPIPS")
    try:
        import lpips
    except ImportError:
        raise ImportError("LPIPS needs the `lpips` package (pip install lpips torchvision), or train without it") \
            from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    mapped = lpips_backbone_names(state, net)
    missing, unexpected = model.net.load_state_dict(mapped, strict=False)
    if missing or unexpected or not mapped:
        raise ValueError(f"{path}: not a torchvision {net} checkpoint for LPIPS ({len(missing)} backbone tensors "
                         f"missing, e.g. {list(missing)[:3]})")
    return model.to(device).eval().requires_grad_(False)


def _same_shape(a, b, what):
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        raise ValueError(f"the two {what} must be tensors of one shape, got "
                         f"{tuple(getattr(a, 'shape', ()))} and {tuple(getattr(b, 'shape', ()))}")


def load_raft(weights_path, device="cpu"):
    """torchvision's RAFT (large) with its weights read from a local file (no download): the ground
    truth's optical flow for the warp loss (the paper's [64])."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"RAFT weights not found at {path}: give torchvision's raft_large checkpoint, or "
                                f"train without the warp loss")
    try:
        from torchvision.models.optical_flow import raft_large
    except ImportError:
        raise ImportError("the warp loss's flows need torchvision (pip install torchvision)") from None
    model = raft_large(weights=None, progress=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except (RuntimeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a raft_large checkpoint ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def clip_flows(flow_model, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(to_next, to_prev)`` of :func:`warp_loss` for ``video [B, 3, F, H, W]`` in [-1, 1] (RAFT's input
    range; H and W multiples of 8). ``flow_model(a, b)`` returns the flow from ``a`` to ``b`` (a list of
    refinements, the last one used, as RAFT does): ``a(x) ~ b(x + flow(x))``, so the flow from frame
    t+1 to frame t is ``to_next``."""
    b, c, f, h, w = video.shape
    cur = video[:, :, :-1].transpose(1, 2).reshape(-1, c, h, w).float()
    nxt = video[:, :, 1:].transpose(1, 2).reshape(-1, c, h, w).float()

    def flow(a, z):
        out = flow_model(a, z)
        return (out[-1] if isinstance(out, (list, tuple)) else out).view(b, f - 1, 2, h, w)

    return flow(nxt, cur), flow(cur, nxt)
