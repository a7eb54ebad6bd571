"""oasis.degrade: the second-order degradation model, its two modes, kernels, noise and codecs (CPU)."""

import math

import numpy as np
import pytest
import torch

from oasis.degrade import (KERNEL_KINDS, DegradeConfig, Degradation, OrderConfig, _noise, blur_kernel,
                           video_roundtrip)


def smooth_clip(frames=5, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(frames, 3, h // 16, w // 16, generator=g)
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("mode", ["consistent", "inconsistent"])
def test_shapes_range_and_seed_determinism(mode):
    d = Degradation(mode=mode)
    clip = smooth_clip()
    outs = [d(clip, seed) for seed in (7, 7, 8)]
    assert outs[0].shape == (5, 3, 16, 24) and outs[0].dtype == torch.float32
    assert 0 <= outs[0].min() and outs[0].max() <= 1
    assert torch.equal(outs[0] * 255, (outs[0] * 255).round())  # on 8-bit steps
    assert torch.equal(outs[0], outs[1])  # the same (clip, seed) -> the same LQ clip
    assert not torch.equal(outs[0], outs[2])
    assert d.sample(5, 7) == d.sample(5, 7)


@pytest.mark.parametrize("video_prob", [0.0, 1.0])  # the last compression: JPEG per frame, a codec
def test_consistent_mode_draws_once_per_clip(video_prob):
    p = Degradation(mode="consistent", video_prob=video_prob).sample(9, seed=3)
    for order in (p.first, p.second):
        assert all(step == order[0] for step in order)
    assert len(set(p.final_resize)) == 1
    assert p.compress[0] == ("jpeg" if video_prob == 0 else "video")
    if video_prob == 0:
        assert len(p.compress[1]) == 9 and len(set(p.compress[1])) == 1
    assert all(step.jpeg is None for step in p.second)  # Real-ESRGAN: no JPEG inside the second order


def test_second_order_works_near_the_lq_size():
    """Second-order noise of sigma 25 reaches the LQ clip at about that strength (it is added at a
    factor of the LQ size, not before a further 4x reduction)."""
    quiet = OrderConfig(blur_prob=0.0, resize_probs=(0.0, 0.0, 1.0), gaussian_noise_prob=1.0, noise_sigma=(0.0, 0.0),
                        gray_noise_prob=0.0, jpeg_prob=0.0)
    loud = OrderConfig(blur_prob=0.0, resize_probs=(0.0, 0.0, 1.0), gaussian_noise_prob=1.0, gray_noise_prob=0.0,
                       noise_sigma=(25.0, 25.0), jpeg_prob=0.0, resize_base="target")
    d = Degradation(first=quiet, second=loud, video_prob=0.0)
    clip = torch.full((1, 3, 128, 128), 0.5)
    params = d.sample(1, 0)
    params = type(params)(params.first, params.second, ["area"], ("jpeg", [None], False))
    lq = d.apply(clip, params, 0)
    assert lq.shape == (1, 3, 32, 32) and abs(lq.std().item() * 255 - 25) < 4


@pytest.mark.parametrize("change_prob", [0.0, 0.3, 1.0])
def test_inconsistent_mode_redraws_with_the_set_probability(change_prob):
    d = Degradation(mode="inconsistent", change_prob=change_prob, jitter=0.0)
    events = trials = 0
    for seed in range(20):
        p = d.sample(41, seed)
        for order in (p.first, p.second):
            for prev, step in zip(order, order[1:]):
                trials += 4
                events += len(step.redrawn)
                for name in ("blur", "resize", "noise", "jpeg"):
                    if name not in step.redrawn:  # no jitter: kept exactly
                        assert getattr(step, name) == getattr(prev, name)
    rate = events / trials
    assert abs(rate - change_prob) < 0.03, rate  # 6400 Bernoulli trials: std 0.006 at 0.3


def test_inconsistent_jitter_moves_severities_within_range():
    cfg = DegradeConfig(mode="inconsistent", change_prob=0.0, jitter=0.2)
    p = Degradation(cfg).sample(30, seed=1)
    noise = [s.noise for s in p.first]
    assert len({n[0] for n in noise}) == 1  # the kind stays
    levels = [n[1] for n in noise]
    assert len(set(levels)) > 1
    span = cfg.first.noise_sigma if noise[0][0] == "gaussian" else cfg.first.poisson_scale
    assert all(span[0] <= v <= span[1] for v in levels)
    for a, b in zip(levels, levels[1:]):
        assert b == pytest.approx(a, rel=0.2 + 1e-9) or b in span


def test_blur_kernels():
    k = blur_kernel("iso", 7, 1.3)
    r = torch.arange(7, dtype=torch.float64) - 3
    g = torch.exp(-0.5 * (r[None] ** 2 + r[:, None] ** 2) / 1.3 ** 2)
    torch.testing.assert_close(k.double(), g / g.sum(), rtol=1e-6, atol=1e-7)
    a = blur_kernel("aniso", 9, 2.0, 0.5, theta=0.0)
    b = blur_kernel("aniso", 9, 0.5, 2.0, theta=math.pi / 2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # a quarter turn swaps the axes
    assert a[4].sum() > a[:, 4].sum()  # wide along x
    for kind in KERNEL_KINDS:
        kk = blur_kernel(kind, 11, 1.5, 0.8, 0.3, 2.0)
        assert kk.shape == (11, 11) and abs(kk.sum().item() - 1) < 1e-5 and (kk >= 0).all()
        assert kk[5, 5] == kk.max()
    # plateau: flatter top than the Gaussian of the same sigma
    assert blur_kernel("plateau_iso", 11, 1.5, beta=2.0)[5, 6] / blur_kernel("plateau_iso", 11, 1.5, beta=2.0)[5, 5] > \
        blur_kernel("iso", 11, 1.5)[5, 6] / blur_kernel("iso", 11, 1.5)[5, 5]
    with pytest.raises(ValueError):
        blur_kernel("box", 7, 1.0)
    with pytest.raises(ValueError):
        blur_kernel("iso", 8, 1.0)


def test_gaussian_and_poisson_noise_levels():
    flat = torch.full((2, 3, 128, 128), 0.5)
    gen = torch.Generator().manual_seed(0)
    out = _noise(flat, [("gaussian", 10.0, False), ("gaussian", 10.0, True)], gen)
    assert abs((out[0] - 0.5).std().item() - 10 / 255) < 0.002
    gray = out[1] - 0.5
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # one noise for the three channels
    ramp = torch.linspace(0, 1, 256).expand(1, 3, 64, 256).clone()
    p = _noise(ramp, [("poisson", 1.0, False)], gen)
    assert 0 < (p - ramp).abs().mean() < 0.05 and p.min() >= 0 and p.max() <= 1


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_video_roundtrip(codec):
    pytest.importorskip("av")
    clip = (smooth_clip(frames=6, h=30, w=45) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    hi = video_roundtrip(clip, codec, bitrate=2_000_000)
    lo = video_roundtrip(clip, codec, bitrate=5_000)
    assert hi.shape == clip.shape == lo.shape and hi.dtype == np.uint8
    err_hi = np.abs(hi.astype(float) - clip).mean()
    err_lo = np.abs(lo.astype(float) - clip).mean()
    assert err_hi < 6 and err_lo > err_hi


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_video_roundtrip_is_the_same_every_time(codec):
    """The same frames give the same round trip on every call of a process, after other encodes: libx264's
    macroblock tree reads uninitialised values (valgrind), which had given another stream for the same
    frames now and then (so another LQ clip for the same seed)."""
    pytest.importorskip("av")
    rng = np.random.default_rng(1)
    other = (smooth_clip(frames=6, h=30, w=45) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for h, w in ((20, 40), (25, 49)):
        clip = rng.integers(0, 255, (9, h, w, 3), dtype=np.uint8)
        first = video_roundtrip(clip, codec, bitrate=20_000)
        assert first.shape == clip.shape
        for k in range(12):  # each after another encode: what the stack holds when it starts
            video_roundtrip(other, codec, bitrate=(2_000_000, 5_000)[k % 2])
            assert np.array_equal(video_roundtrip(clip, codec, bitrate=20_000), first), (h, w, k)


def test_bad_inputs_and_configs():
    d = Degradation()
    with pytest.raises(ValueError, match="multiples of the scale"):
        d(torch.rand(2, 3, 30, 32), 0)
    with pytest.raises(ValueError, match="float tensor"):
        d(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="float tensor"):
        d(torch.rand(3, 32, 32), 0)
    with pytest.raises(TypeError, match="seed"):
        d(torch.rand(1, 3, 32, 32), 0.5)
    with pytest.raises(ValueError, match="mode"):
        Degradation(mode="random")
    with pytest.raises(ValueError, match="kernel_probs"):
        DegradeConfig(first=OrderConfig(kernel_probs=(0.5, 0.5, 0.5, 0, 0, 0)))
    with pytest.raises(ValueError, match="resize_range"):
        DegradeConfig(second=OrderConfig(resize_range=(1.2, 1.5)))
    with pytest.raises(ValueError, match="change_prob"):
        DegradeConfig(change_prob=1.5)
    with pytest.raises(ValueError, match="codecs"):
        DegradeConfig(codecs=("vp9",))
    with pytest.raises(ValueError, match="frames"):
        d.sample(0, 1)


def _libjpeg(frames: torch.Tensor, quality: int) -> torch.Tensor:
    import io

    from PIL import Image

    out = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray((f.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(buf, format="JPEG",
                                                                                          quality=quality)
        out.append(torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))).permute(2, 0, 1))
    return torch.stack(out).float() / 255


@pytest.mark.parametrize("size", [(37, 61), (64, 96), (120, 200)])
def test_torch_jpeg_is_libjpeg_within_a_level(size):
    """oasis.jpeg (JPEG's lossy steps as torch ops, for frames on a GPU) against libjpeg through PIL at the
    same quality: on average within ~0.7 of 255 levels, where the JPEG itself moves pixels by ~8-19, and
    nearer to PIL at its own quality than at a neighbouring one (the tables and the chroma sampling
    are what set the artefacts)."""
    from oasis.jpeg import jpeg_roundtrip

    g = torch.Generator().manual_seed(size[0])
    h, w = size
    clip = torch.nn.functional.interpolate(torch.rand(3, 3, h // 8 + 2, w // 8 + 2, generator=g), size=(h, w),
                                           mode="bicubic", align_corners=False)
    clip = (clip + 0.3 * (torch.arange(w) > w // 3) * (torch.rand(3, 3, 1, 1, generator=g) - 0.5)
            + 0.04 * torch.randn(3, 3, h, w, generator=g)).clamp(0, 1)
    clip = (clip * 255).round() / 255
    for q in (15, 50, 90):
        ours = jpeg_roundtrip(clip, [q] * 3)
        ref = _libjpeg(clip, q)
        assert ours.shape == clip.shape and torch.equal(ours * 255, (ours * 255).round())
        gap = (ours - ref).abs().mean().item() * 255
        moved = (clip - ref).abs().mean().item() * 255
        assert gap < 1.0 and gap < 0.1 * moved, (q, gap, moved)
        other = (jpeg_roundtrip(clip, [q + 8] * 3) - ref).abs().mean().item() * 255
        assert gap < other, (q, gap, other)
    # per-frame qualities, None keeps a frame: each frame as if alone
    mixed = jpeg_roundtrip(clip, [20, None, 80])
    assert torch.equal(mixed[1], clip[1])
    torch.testing.assert_close(mixed[0], jpeg_roundtrip(clip[:1], [20])[0], rtol=0, atol=0)
    torch.testing.assert_close(mixed[2], jpeg_roundtrip(clip[2:], [80])[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="quality"):
        jpeg_roundtrip(clip, [0, 50, 50])


def test_torch_jpeg_of_frames_of_several_sizes_is_each_frame_alone():
    """jpeg_roundtrip_each (inconsistent mode's frames, each resized its own way, in one batch) gives
    each frame bit for bit what jpeg_roundtrip gives it alone: sizes on and off the 16-pixel MCUs, odd
    sizes, the largest frame first and last, None keeping a frame; and bad inputs are named."""
    from oasis.jpeg import jpeg_roundtrip, jpeg_roundtrip_each

    g = torch.Generator().manual_seed(7)
    sizes = [(37, 61), (16, 32), (5, 3), (64, 96), (48, 17), (33, 80)]
    for order in (sizes, sizes[::-1]):
        frames = [torch.nn.functional.interpolate(torch.rand(1, 3, h // 4 + 2, w // 4 + 2, generator=g), size=(h, w),
                                                  mode="bicubic", align_corners=False)[0].clamp(0, 1)
                  for h, w in order]
        qualities = [int(q) for q in torch.randint(10, 95, (len(frames),), generator=g)]
        qualities[2] = None
        out = jpeg_roundtrip_each(frames, qualities)
        for f, q, o in zip(frames, qualities, out):
            want = f if q is None else jpeg_roundtrip(f[None], [q])[0]
            assert o.shape == f.shape and torch.equal(o, want), (tuple(f.shape), q)
        # (without each frame's own chroma edges, the frames smaller than the batch's largest fail)
        assert any(q is not None and not torch.equal(o, f) for f, q, o in zip(frames, qualities, out))
    assert jpeg_roundtrip_each(frames, [None] * len(frames)) == frames
    with pytest.raises(ValueError, match="one quality per frame"):
        jpeg_roundtrip_each(frames, [50])
    with pytest.raises(ValueError, match=r"frame 1 must be \[3, H, W\]"):
        jpeg_roundtrip_each([frames[0], frames[1][None]], [50, 50])


def test_poisson_levels_are_counted_per_frame():
    """Real-ESRGAN's Poisson noise scales with each image's own number of distinct levels: a two-level
    frame beside a 256-level ramp in one batched call gets the coarse noise, the ramp the fine one."""
    two = torch.full((1, 3, 64, 256), 0.5)
    two[..., :128] = 0.25
    ramp = torch.linspace(0, 1, 256).expand(1, 3, 64, 256).clone()
    out = _noise(torch.cat([two, ramp]), [("poisson", 1.0, False)] * 2, torch.Generator().manual_seed(0))
    coarse = (out[0] - two[0])[..., 128:].std().item()  # levels 2: sqrt(0.5 * 2) / 2 = 0.5, clamped
    fine = (out[1] - ramp[0])[..., 96:160].std().item()  # levels 256: ~sqrt(0.5 * 256) / 256 = 0.044
    assert coarse > 0.2 and 0.03 < fine < 0.06, (coarse, fine)


def test_blur_of_frames_of_several_sizes_is_each_frame_alone():
    """_blur_each (inconsistent mode's second order) against _blur per frame: kernel sizes 7-21, a frame
    smaller than its kernel's half size (replicated, not reflected), a frame without blur."""
    from oasis.degrade import _blur, _blur_each

    g = torch.Generator().manual_seed(0)
    frames = [torch.rand(1, 3, h, w, generator=g) for h, w in [(40, 60), (8, 9), (33, 20), (64, 64)]]
    params = [("iso", 21, 2.0, 2.0, 0.0, 1.0), ("aniso", 15, 1.0, 3.0, 0.5, 1.0), None,
              ("generalized_iso", 7, 1.5, 1.5, 0.0, 0.8)]
    for f, p, o in zip(frames, params, _blur_each(frames, params)):
        torch.testing.assert_close(o, _blur(f, [p]), rtol=0, atol=1e-6)
    assert _blur_each(frames, [None] * 4) == frames


def test_noise_of_frames_of_several_sizes_keeps_each_frames_level():
    """_noise_each (inconsistent mode: frames of several sizes, one draw per kind): each frame gets its
    own Gaussian level, gray noise is one for the three channels, Poisson noise follows each frame's own
    count of distinct levels (the coarse two-level frame beside a 256-level ramp of another size), frames
    without noise are left as they are, and the same generator state gives the same frames."""
    from oasis.degrade import _noise_each

    flat_a, flat_b = torch.full((1, 3, 96, 128), 0.5), torch.full((1, 3, 64, 200), 0.5)
    two = torch.full((1, 3, 48, 256), 0.5)
    two[..., :128] = 0.25
    ramp = torch.linspace(0, 1, 256).expand(1, 3, 40, 256).clone()
    frames = [flat_a, two, flat_b, ramp, flat_b]
    params = [("gaussian", 10.0, False), ("poisson", 1.0, False), ("gaussian", 25.0, True), ("poisson", 1.0, False), None]
    out = _noise_each(frames, params, torch.Generator().manual_seed(0))
    assert [o.shape for o in out] == [f.shape for f in frames] and out[4] is flat_b
    assert abs((out[0] - 0.5).std().item() - 10 / 255) < 0.002
    gray = out[2][0] - 0.5
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2]) and abs(gray.std().item() - 25 / 255) < 0.004
    coarse = (out[1][0] - two[0])[..., 128:].std().item()
    fine = (out[3][0] - ramp[0])[..., 96:160].std().item()
    assert coarse > 0.2 and 0.03 < fine < 0.06, (coarse, fine)
    again = _noise_each(frames, params, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(out, again))


def test_jpeg_impl_setting():
    """The whole model with either JPEG (noise off: Poisson noise scales with the count of distinct levels,
    which one level can double): over eight clips the two differ by ~2 levels where the degradations
    move pixels by ~16 (a coefficient that rounds the other way at a low quality moves a whole block)."""
    clip = smooth_clip(frames=3, h=64, w=96)
    ref = torch.nn.functional.interpolate(clip, size=(16, 24), mode="area")
    quiet = dict(gaussian_noise_prob=1.0, noise_sigma=(0.0, 0.0))
    cfg = DegradeConfig(first=OrderConfig(**quiet), second=OrderConfig(**quiet, jpeg_prob=0.0, resize_base="target",
                                                                        resize_range=(0.3, 1.2)), video_prob=0.0)
    gap = moved = 0.0
    for seed in range(8):
        pil = Degradation(cfg)(clip, seed)
        ours = Degradation(cfg, jpeg_impl="torch")(clip, seed)
        assert ours.shape == pil.shape and torch.equal(ours, Degradation(cfg, jpeg_impl="torch")(clip, seed))
        gap += (ours - pil).abs().mean().item() * 255 / 8
        moved += (pil - ref).abs().mean().item() * 255 / 8
    assert gap < 0.2 * moved, (gap, moved)
    with pytest.raises(ValueError, match="jpeg_impl"):
        DegradeConfig(jpeg_impl="nvjpeg")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_clips_on_a_gpu_take_the_torch_jpeg_there():
    """On CUDA, "auto" JPEG runs on the device (no host round trip) and gives the CPU's torch JPEG within
    rare rounding flips; the whole model on CUDA is deterministic per seed."""
    from oasis.jpeg import jpeg_roundtrip

    clip = smooth_clip(frames=4, h=64, w=96)
    gpu = jpeg_roundtrip(clip.cuda(), [30, 50, None, 90])
    assert gpu.is_cuda and (gpu.cpu() - jpeg_roundtrip(clip, [30, 50, None, 90])).abs().mean() * 255 < 0.05
    d = Degradation(video_prob=0.0)
    a, b = d(clip.cuda(), 3), d(clip.cuda(), 3)
    assert a.is_cuda and torch.equal(a, b)
