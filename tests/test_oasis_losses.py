"""oasis.losses against hand computations on tiny tensors (CPU)."""

import importlib.util

import pytest
import torch

from oasis.losses import (OasisLoss, latent_loss, load_lpips, lpips_backbone_names, perceptual_loss, warp,
                          warp_loss)


def test_warp_integer_and_half_pixel_shifts():
    src = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).view(2, 3, 4, 5)
    flow = torch.zeros(2, 2, 4, 5, dtype=torch.float64)
    flow[:, 0] = 1.0  # out(x) = src(x + 1)
    out, valid = warp(src, flow)
    torch.testing.assert_close(out[..., :4], src[..., 1:])
    assert valid[..., :4].eq(1).all() and valid[..., 4].eq(0).all()
    flow[:, 0], flow[:, 1] = 0.0, 0.5  # halfway down: the mean of two rows
    out, valid = warp(src, flow)
    torch.testing.assert_close(out[:, :, :3], (src[:, :, :3] + src[:, :, 1:]) / 2)
    assert valid[:, :, 3].eq(0).all()
    with pytest.raises(ValueError, match="warp takes"):
        warp(src, flow[:, :1])


def test_latent_and_perceptual_losses():
    a, b = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2) * 2
    assert latent_loss(a, b).item() == 4.0
    v, t = torch.zeros(1, 3, 2, 4, 4), torch.full((1, 3, 2, 4, 4), 0.5)
    calls = []

    def fake_lpips(x, y):
        calls.append(x.shape)
        return torch.full((x.shape[0], 1, 1, 1), 0.25)

    parts = perceptual_loss(v, t, fake_lpips)
    assert parts["mse"].item() == 0.25 and parts["lpips"].item() == 0.25
    assert calls == [(2, 3, 4, 4)]  # the frames as a batch of images
    assert "lpips" not in perceptual_loss(v, t)
    with pytest.raises(ValueError, match="one shape"):
        latent_loss(a, b[:1])


def moving_video(frames=4, h=6, w=9):
    """Frame t+1 is frame t moved one pixel left: V_{t+1}(x) = V_t(x + 1)."""
    base = torch.rand(1, 3, h, w + frames, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.stack([base[..., t:t + w] for t in range(frames)], dim=2)  # [1, 3, F, h, w]


def test_warp_loss_of_a_translation():
    v = moving_video()
    b, c, f, h, w = v.shape
    to_next = torch.zeros(b, f - 1, 2, h, w, dtype=torch.float64)
    to_next[:, :, 0] = 1.0  # V_{t+1}(x) = V_t(x + 1)
    to_prev = -to_next  # V_t(x) = V_{t+1}(x - 1)
    assert warp_loss(v, to_next, to_prev).item() < 1e-6  # the right flow explains every valid pixel (float32)
    zero = torch.zeros_like(to_next)
    want = sum(2 * (v[:, :, t] - v[:, :, t + 1]).abs().mean() for t in range(f - 1))
    torch.testing.assert_close(warp_loss(v, zero, zero), want.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="to_prev must be"):
        warp_loss(v, to_next, to_prev[:, :1])


def test_oasis_loss_sums_its_parts():
    v = moving_video().float()
    b, c, f, h, w = v.shape
    flows = torch.zeros(b, f - 1, 2, h, w)
    z, zt = torch.zeros(1, 16, 2, 3, 3), torch.ones(1, 16, 2, 3, 3)
    loss = OasisLoss(lpips=lambda x, y: torch.full((x.shape[0], 1, 1, 1), 0.5), warp_weight=0.1)
    parts = loss(z, zt, v, v * 0.5, flows, flows)
    want = parts["latent"] + parts["mse"] + parts["lpips"] + 0.1 * parts["warp"]
    torch.testing.assert_close(parts["total"], want)
    assert parts["latent"].item() == 1.0 and parts["lpips"].item() == 0.5 and parts["warp"].item() > 0
    assert "warp" not in OasisLoss()(z, zt, v, v)
    with pytest.raises(ValueError, match="both flows"):
        loss(z, zt, v, v, flows, None)


def test_lpips_backbone_names_and_errors(tmp_path):
    state = {"features.0.weight": 0, "features.2.bias": 1, "features.5.weight": 2, "features.28.bias": 3,
             "classifier.0.weight": 4}
    assert lpips_backbone_names(state, "vgg") == {"slice1.0.weight": 0, "slice1.2.bias": 1, "slice2.5.weight": 2,
                                                  "slice5.28.bias": 3}
    assert lpips_backbone_names({"features.3.weight": 0}, "alex") == {"slice2.3.weight": 0}
    with pytest.raises(ValueError, match="net must be"):
        lpips_backbone_names(state, "resnet")
    with pytest.raises(FileNotFoundError, match="train without LPIPS"):
        load_lpips(tmp_path / "missing.pth")
    if importlib.util.find_spec("lpips") is None:
        torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "vgg.pth")
        with pytest.raises(ImportError, match="lpips"):
            load_lpips(tmp_path / "vgg.pth")


def test_clip_flows_direction_with_a_matching_flow_model():
    """A stand-in for RAFT that finds the one horizontal shift taking its first image onto its second
    (``a(x) ~ b(x + dx)``); with it, the flows of a moving clip explain the clip: warp loss ~ 0."""
    from oasis.losses import clip_flows

    def shift_model(a, b):
        errs = {dx: (a[..., 1:-1] - b[..., 1 + dx:b.shape[-1] - 1 + dx]).abs().mean().item() for dx in (-1, 0, 1)}
        dx = min(errs, key=errs.get)
        flow = torch.zeros(a.shape[0], 2, *a.shape[-2:])
        flow[:, 0] = dx
        return [flow]

    v = moving_video().float() * 2 - 1
    to_next, to_prev = clip_flows(shift_model, v)
    assert to_next[:, :, 0].eq(1).all() and to_prev[:, :, 0].eq(-1).all()
    assert warp_loss(v, to_next, to_prev).item() < 1e-6
    assert warp_loss(v, to_prev, to_next).item() > 0.1  # swapped flows would not explain it
