"""The one-step pipeline: projector (eq. 3), restoration (eq. 4), decoding, chunks and tiles, checkpoints."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from oasis import CheckpointError  # noqa: E402
from oasis.demo import tiny_pipeline  # noqa: E402
from oasis.pipeline import OasisVSR  # noqa: E402
from oasis.projector import LatentProjector, ProjectorConfig  # noqa: E402
from oasis.tiling import plan_tiles, span_weights, spans  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=3)


def random_video(frames, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, h, w, 3), generator=g, dtype=torch.uint8)


# -- projector ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 5, 17])
@pytest.mark.parametrize("size", [(4, 6), (10, 14), (2, 2)])
def test_projector_shapes(frames, size):
    proj = LatentProjector()
    z = proj(torch.randn(2, 3, frames, *size))
    assert z.shape == (2, 16, 1 + (frames - 1) // 4, size[0] // 2, size[1] // 2)


def test_projector_rejects_what_does_not_fit_the_grid():
    proj = LatentProjector()
    with pytest.raises(ValueError, match="4k\\+1 frames, got 4"):
        proj(torch.randn(1, 3, 4, 8, 8))
    with pytest.raises(ValueError, match="multiples of 2, got 7x8"):
        proj(torch.randn(1, 3, 5, 7, 8))
    with pytest.raises(ValueError, match="video must be"):
        proj(torch.randn(3, 5, 8, 8))
    with pytest.raises(ValueError, match="positive int"):
        ProjectorConfig(frames_per_latent=0)


def test_projector_groups_frames_like_the_causal_vae():
    """Latent frame 0 reads LQ frame 0 only; latent frame i reads frames 4i-3..4i; 2x2 pixels per token."""
    proj = LatentProjector()
    video = torch.randn(1, 3, 9, 4, 4, requires_grad=True)
    z = proj(video)
    for i, frames in enumerate([{0}, {1, 2, 3, 4}, {5, 6, 7, 8}]):
        (grad,) = torch.autograd.grad(z[0, :, i, 1, 0].sum(), video, retain_graph=True)
        touched = {f for f in range(9) if grad[0, :, f].abs().sum() > 0}
        assert touched == frames, (i, touched)
        pixels = grad[0].abs().sum(dim=(0, 1)) > 0
        assert pixels.nonzero().tolist() == [[2, 0], [2, 1], [3, 0], [3, 1]]
    # a constant video maps to one latent vector everywhere (frame 0 fills its own group)
    z = proj(torch.full((1, 3, 9, 4, 6), 0.3))
    assert torch.allclose(z, z[:, :, :1, :1, :1].expand_as(z), atol=1e-6)


# -- eq. 4 and decoding ------------------------------------------------------------------------------------
def test_restore_is_eq4(pipe):
    z = torch.randn(1, 16, 2, 4, 6)
    with torch.no_grad():
        v = pipe.dit(z, torch.tensor([799.0]))
        assert torch.allclose(pipe.restore(z), z - 0.799 * v)
    assert pipe.sigma == pytest.approx(0.799)


def test_decode_denormalises_with_the_vae_statistics(pipe):
    z = torch.randn(1, 16, 2, 4, 6)
    vae = pipe.decoder.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        want = vae(z * std + mean)
        got = pipe.decode(z)
    assert got.shape == (1, 3, 5, 32, 48)
    torch.testing.assert_close(got, want)


def test_whole_call_is_the_three_stages(pipe):
    video = random_video(5, 8, 12)
    out = pipe(video, progress=False)
    assert out.shape == (5, 32, 48, 3) and out.dtype == torch.uint8
    x = video.permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        want = pipe.decode(pipe.restore(pipe.project(x)))[0]
    want = ((want.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)
    assert (out.int() - want.int()).abs().max() <= 1  # rounding at .5 boundaries only
    assert out.float().std() > 1  # not a flat image


@pytest.mark.parametrize("frames,size", [(1, (8, 8)), (3, (13, 21)), (6, (9, 6))])
def test_any_frame_count_and_size(pipe, frames, size):
    out = pipe(random_video(frames, *size), progress=False)
    assert out.shape == (frames, 4 * size[0], 4 * size[1], 3)


# -- chunks and tiles ---------------------------------------------------------------------------------------
def test_spans_cover_and_weights_sum_to_one():
    for length, size, overlap in [(17, 9, 4), (100, 33, 8), (10, 4, 3), (5, 9, 2), (64, 16, 6)]:
        ss = spans(length, size, overlap)
        assert ss[0][0] == 0 and ss[-1][1] == length
        assert all(b - a == min(size, length) for a, b in ss)
        total = torch.zeros(length)
        for (a, b), w in zip(ss, span_weights(ss)):
            assert (w > 0).all()
            total[a:b] += w
        torch.testing.assert_close(total, torch.ones(length))


def pointwise_restore(pipe, monkeypatch):
    """Replace the model by a per-pixel map (nearest x4): chunk and tile borders then show as seams
    if and only if the blending is wrong."""

    def restore_clip(video):
        return F.interpolate(video, scale_factor=(1, 4, 4), mode="nearest").tanh()

    monkeypatch.setattr(pipe, "restore_clip", restore_clip)


@pytest.mark.parametrize("chunk,tile", [(5, None), (9, 8), (None, 12)])
def test_constant_video_stays_constant_across_borders(pipe, monkeypatch, chunk, tile):
    pointwise_restore(pipe, monkeypatch)
    video = torch.full((23, 20, 28, 3), 77, dtype=torch.uint8)
    plan = pipe.plan(23, 20, 28, chunk_frames=chunk, tile=tile)
    assert plan.chunk_frames < 23 or plan.tiled  # the case really cuts the video
    out = pipe(video, chunk_frames=chunk, tile=tile, progress=False)
    assert out.shape == (23, 80, 112, 3)
    assert (out == out[0, 0, 0]).all()


def test_chunks_and_tiles_blend_a_moving_ramp_without_seams(pipe, monkeypatch):
    pointwise_restore(pipe, monkeypatch)
    t = torch.arange(21).view(-1, 1, 1, 1)
    x = torch.arange(24).view(1, 1, -1, 1)
    video = (40 + 5 * t + 3 * x).expand(21, 16, 24, 3).to(torch.uint8)
    whole = pipe(video, chunk_frames=21, progress=False)
    cut = pipe(video, chunk_frames=9, tile=8, progress=False)
    assert (whole.int() - cut.int()).abs().max() <= 1


@pytest.mark.parametrize("frames,size,chunk,tile", [(3, (13, 17), 5, 8), (7, (9, 11), 5, None), (1, (5, 7), None, 8)])
def test_clips_are_the_video_with_replicated_borders(pipe, monkeypatch, frames, size, chunk, tile):
    """Every clip the model sees is a block of the video in [-1, 1] with its borders replicated up to
    the grid and its last frame repeated up to 4k+1 frames (as F.pad's "replicate" gives them), and
    the clips cover that whole padded video: odd sizes, a clip shorter than a chunk, tiles beyond
    the video's edge."""
    seen = []

    def restore_clip(clip):
        seen.append(clip.clone())
        return F.interpolate(clip, scale_factor=(1, 4, 4), mode="nearest")

    monkeypatch.setattr(pipe, "restore_clip", restore_clip)
    video = random_video(frames, *size, seed=5)
    pipe(video, chunk_frames=chunk, tile=tile, progress=False)
    a, ft = pipe.align, pipe.projector.config.frames_per_latent
    ph, pw = a * math.ceil(size[0] / a), a * math.ceil(size[1] / a)
    want = video.permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    want = F.pad(want[0], (0, pw - size[1], 0, ph - size[0]), mode="replicate")[None]
    total = max(frames, min(chunk or 10**6, 1 + ft * math.ceil((frames - 1) / ft)))
    want = torch.cat([want, want[:, :, -1:].expand(-1, -1, total - frames, -1, -1)], dim=2)
    covered = torch.zeros(want.shape[2:], dtype=torch.bool)
    for clip in seen:
        f, h, w = clip.shape[2:]
        at = [(t0, h0, w0) for t0 in range(total - f + 1) for h0 in range(ph - h + 1) for w0 in range(pw - w + 1)
              if torch.equal(want[:, :, t0:t0 + f, h0:h0 + h, w0:w0 + w], clip)]
        assert at, f"a clip {tuple(clip.shape)} that is no block of the padded video"
        t0, h0, w0 = at[0]
        covered[t0:t0 + f, h0:h0 + h, w0:w0 + w] = True
    assert covered.all()


def test_real_model_in_chunks(pipe):
    video = random_video(14, 8, 8)
    out = pipe(video, chunk_frames=5, progress=False)
    assert out.shape == (14, 32, 32, 3)
    frames = list(pipe.stream(video, chunk_frames=5, progress=False))
    assert len(frames) > 1 and sum(f.shape[0] for f in frames) == 14
    # the chunks come interleaved RGB, contiguous (the writer and the caller copy nothing more), and
    # the call puts each in its place
    assert all(f.is_contiguous() and f.dtype == torch.uint8 for f in frames) and out.is_contiguous()
    assert torch.equal(torch.cat(frames), out)


class RecordingSource:
    """A frame source as the pipeline sees one: ``shape``, ``dtype`` and time slices, which it records."""

    def __init__(self, video):
        self.video, self.shape, self.dtype, self.asked = video, video.shape, video.dtype, []

    def __getitem__(self, key):
        self.asked.append((key.start, key.stop))
        return self.video[key].clone()


@pytest.mark.parametrize("frames,chunk,tile", [(14, 5, None), (13, 9, 4), (3, 5, None)])
def test_a_frame_source_is_read_a_chunk_at_a_time(pipe, frames, chunk, tile):
    """A source (a video file streamed by ``VideoFrames``, a folder by ``ImageFrames``) gives the same
    output as the tensor, and is sliced once per chunk in time only, starts never going back: a
    streamed video is decoded once through, and only a chunk of it is held."""
    video = random_video(frames, 8, 8, seed=2)
    source = RecordingSource(video)
    assert torch.equal(pipe(source, chunk_frames=chunk, tile=tile, progress=False),
                       pipe(video, chunk_frames=chunk, tile=tile, progress=False))
    starts = [a for a, _ in source.asked]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert all(b - a <= chunk for a, b in source.asked) and source.asked[-1][1] == frames


def test_a_video_file_streamed_through_the_pipeline(pipe, tmp_path):
    av = pytest.importorskip("av")  # noqa: F841
    from oasis.video import VideoFrames, read_video, synthetic_clip, write_video

    path = tmp_path / "clip.mkv"
    write_video(path, synthetic_clip(13, 8, 12), 24, crf=10)
    whole, _ = read_video(path)
    with VideoFrames(path, prefetch=2) as frames:
        streamed = torch.cat(list(pipe.stream(frames, chunk_frames=5, progress=False)))
    assert torch.equal(streamed, pipe(whole, chunk_frames=5, progress=False))


def test_memory_budget_picks_chunks_then_tiles_or_refuses(pipe):
    big = pipe.plan(81, 64, 64)
    assert big.chunk_frames == 81 and not big.tiled
    weights = pipe._weight_bytes() / 2**30
    need = big.estimated_bytes / 2**30
    smaller = pipe.plan(81, 64, 64, memory_budget=weights + need * 0.75)
    assert smaller.chunk_frames < 81
    whole = pipe.plan(81, 512, 512).estimated_bytes / 2**30
    tiled = pipe.plan(81, 512, 512, memory_budget=weights + whole / 8)
    assert tiled.tiled and tiled.estimated_bytes <= whole / 8 * 2**30
    with pytest.raises(MemoryError, match="memory budget"):
        pipe.plan(81, 512, 512, memory_budget=weights + 1e-6)
    with pytest.raises(ValueError, match="4k\\+1"):
        pipe.plan(20, 8, 8, chunk_frames=6)
    with pytest.raises(ValueError, match="multiple of 4"):
        pipe.plan(20, 8, 8, tile=10)
    with pytest.raises(ValueError, match="memory_budget"):
        pipe.plan(20, 8, 8, memory_budget=-1)


def test_bad_video_inputs(pipe):
    with pytest.raises(ValueError, match="uint8 \\[F, h, w, 3\\]"):
        pipe(torch.zeros(5, 8, 8, 3), progress=False)
    with pytest.raises(ValueError, match="uint8 \\[F, h, w, 3\\]"):
        pipe(torch.zeros(5, 8, 8, dtype=torch.uint8), progress=False)
    with pytest.raises(TypeError, match="uint8 tensor"):
        pipe([[0]], progress=False)
    video = random_video(5, 8, 8)  # numpy frames are taken as they are
    assert torch.equal(pipe(video.numpy(), progress=False), pipe(video, progress=False))
    source = RecordingSource(torch.zeros(5, 8, 8, 3))
    with pytest.raises(ValueError, match="uint8 \\[F, h, w, 3\\]"):
        pipe(source, progress=False)
    with pytest.raises(ValueError):
        plan_tiles(5, 8, 8, budget=None, estimate=lambda *a: 0, chunk_frames=0)


# -- checkpoints ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["diffusers", "wan"])
def test_checkpoint_round_trip(pipe, tmp_path, layout):
    pipe.save_pretrained(tmp_path, layout=layout)
    meta = json.loads((tmp_path / "oasis.json").read_text())
    assert meta["routing"] == "routing.json" and meta["timestep"] == 799
    back = OasisVSR.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    assert back.dit.layout == layout and back.dit.routing == pipe.dit.routing
    video = random_video(5, 8, 8)
    x = video.permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    torch.testing.assert_close(back.restore_clip(x), pipe.restore_clip(x))
    all_global = OasisVSR.from_pretrained(tmp_path, routing=None, dtype=torch.float32, device="cpu")
    assert all(m == 0 for modes in all_global.dit.routing for m in modes)


def test_checkpoint_errors(pipe, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        OasisVSR.from_pretrained(tmp_path / "none", device="cpu")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="no oasis.json"):
        OasisVSR.from_pretrained(tmp_path / "plain", device="cpu")
    ckpt = tmp_path / "ckpt"
    pipe.save_pretrained(ckpt)
    import safetensors.torch as st

    state = st.load_file(str(ckpt / "oasis.safetensors"))
    st.save_file({"context": state["context"]}, str(ckpt / "oasis.safetensors"))
    with pytest.raises(CheckpointError, match="has no projector"):
        OasisVSR.from_pretrained(ckpt, device="cpu")
    st.save_file({k: v for k, v in state.items() if k != "context"}, str(ckpt / "oasis.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = OasisVSR.from_pretrained(ckpt, dtype=torch.float32, device="cpu")
    assert sum("context" in str(w.message) for w in caught) == 1
    assert back.context.abs().sum() == 0 and back.context.shape == (back.dit.config.text_len, 32)
    # oasis.json's settings of the wrong kind name the file and the setting
    meta = json.loads((ckpt / "oasis.json").read_text())
    for bad, says in (({**meta, "timestep": "abc"}, "timestep must be a number in \\(0, 1000\\], got 'abc'"),
                      ({**meta, "timestep": 0}, "timestep must be a number"),
                      ({**meta, "projector": {"unknown": 1}}, "its projector settings do not make a projector"),
                      ([meta], "not a table of settings")):
        (ckpt / "oasis.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=f"oasis.json: {says}"):
            OasisVSR.from_pretrained(ckpt, device="cpu")
    (ckpt / "oasis.json").write_text(json.dumps(meta))
    # a DiT tensor of integers: listed with the others (load_state_dict's traceback before)
    dit_file = next((ckpt / "transformer").glob("*.safetensors"))
    tensors = st.load_file(str(dit_file))
    name = next(k for k in tensors if k.endswith("weight"))
    tensors[name] = tensors[name].to(torch.int32)
    st.save_file(tensors, str(dit_file))
    # (named in the model's layout, the file's diffusers names mapped)
    with pytest.raises(CheckpointError, match=r"1 tensors of another kind: \S+norm_k.weight: int32 in the file, "
                                              r"floating point in the model"):
        OasisVSR.from_pretrained(ckpt, device="cpu")


def test_sixteen_bit_frames_keep_the_model_s_precision(pipe):
    """uint16 frames (a 10-bit source read as 16 bits) give the model the same input as uint8 ones times
    256 (the same floats: FFmpeg's 16-bit scale), and come back as uint16: the same output as the uint8 call,
    rounded to 16 bits instead of 8 (what a 10-bit video then keeps)."""
    video = random_video(6, 8, 12, seed=4)
    eight = pipe(video, chunk_frames=5, progress=False)
    deep = pipe(video.to(torch.int32).mul_(256).to(torch.uint16), chunk_frames=5, progress=False)
    assert deep.dtype == torch.uint16 and deep.shape == eight.shape
    assert ((deep.double() / 256 - eight.double()).abs() <= 0.5 + 0.5 / 256 + 1e-9).all()
    assert (deep.int() % 256 != 0).any() and deep.int().max() <= 65280  # more than 8 bits' worth of levels; white 65280


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sixteen_bit_frames_on_the_gpu():
    """uint16 on a GPU (PyTorch's barebones unsigned dtype): the frames' way in (a copy, then floats) and
    out (rounded, cast, interleaved) give the CPU's numbers."""
    from oasis.pipeline import _to_frames

    x = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    assert torch.equal(_to_frames(x.cuda(), torch.uint16).cpu(), _to_frames(x, torch.uint16))
    frames = torch.randint(0, 65536, (2, 8, 8, 3), dtype=torch.int32).to(torch.uint16)
    assert torch.equal(frames.cuda().float().cpu(), frames.float())


@pytest.mark.parametrize("frames,chunk,tile", [(23, 5, None), (14, 9, None), (16, 9, 4)])
def test_streaming_from_a_frame_resumes_a_run(pipe, monkeypatch, frames, chunk, tile):
    """``stream(start=k)`` yields frames k.. with the whole run's numbers, for every k (chunks that overlap
    two and three at a time, tiles), and runs only the chunks that add to them."""
    video = random_video(frames, 8, 8, seed=6)
    whole = pipe(video, chunk_frames=chunk, tile=tile, progress=False)
    calls = []
    real = pipe.restore_clip
    monkeypatch.setattr(pipe, "restore_clip", lambda clip: calls.append(1) or real(clip))
    all_calls = None
    for k in sorted({0, 1, 3, 4, 5, 8, frames // 2, frames - 2, frames - 1}):  # chunk borders and overlaps
        calls.clear()
        part = torch.cat(list(pipe.stream(video, chunk_frames=chunk, tile=tile, progress=False, start=k)))
        assert torch.equal(part, whole[k:]), k
        all_calls = all_calls or len(calls)
        assert len(calls) <= all_calls
    assert len(calls) < all_calls  # the last frame needs the last chunk(s) only
    with pytest.raises(ValueError, match="start"):
        next(pipe.stream(video, start=frames))
