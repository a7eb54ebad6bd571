"""oasis-vsr: the demo, a real checkpoint on a real video file, and one-line errors (exit code 2)."""

import os
from fractions import Fraction

import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("diffusers")

from oasis.cli import main  # noqa: E402
from oasis.demo import tiny_pipeline  # noqa: E402
from oasis.video import probe_video, read_video, synthetic_clip, write_video  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tiny_pipeline(seed=1).save_pretrained(folder, layout="wan")
    return folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "lq.mp4"
    write_video(path, synthetic_clip(7, 20, 28), "30000/1001", crf=10, color_range="pc")
    return path


def shown(folder):
    """A folder's files but the hidden ones (the run record of an image output)."""
    return sorted(f for f in os.listdir(folder) if not f.startswith("."))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def test_demo_writes_a_4x_video(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    code, err = run(capsys, "--demo", "-o", out, "--max-frames", 5, "--no-progress")
    assert code == 0, err
    assert "untrained" in err.lower()
    info = probe_video(out)
    assert (info.width, info.height) == (320, 192)
    frames, _ = read_video(out)
    assert frames.shape == (5, 192, 320, 3)
    # the demo's own model: settings for a checkpoint's would do nothing, so they are refused
    for extra, says in ((["--dtype", "bf16"], "--dtype is for a --checkpoint"),
                        (["--routing", "none", "--vae", "diffusers"], "--routing, --vae is for a --checkpoint")):
        code, err = run(capsys, "--demo", "-o", tmp_path / "d2.mp4", "--no-progress", *extra)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_the_package_s_warnings_are_the_tool_s_lines(tmp_path, capsys, clip):
    """A checkpoint without its cross-attention context: the warning is one 'oasis-vsr: warning:' line,
    not Python's form with the source line."""
    import safetensors.torch as st

    tiny_pipeline(seed=1).save_pretrained(tmp_path / "ckpt", layout="wan")
    tensors = st.load_file(str(tmp_path / "ckpt" / "oasis.safetensors"))
    st.save_file({k: v for k, v in tensors.items() if k != "context"}, str(tmp_path / "ckpt" / "oasis.safetensors"))
    code, err = run(capsys, clip, "-o", tmp_path / "hq.mp4", "--checkpoint", tmp_path / "ckpt", "--device", "cpu",
                    "--no-progress", "--max-frames", 2)
    assert code == 0, err
    assert "oasis-vsr: warning: no cross-attention context in the checkpoint" in err, err
    assert "UserWarning" not in err and "warnings.warn" not in err, err


def test_the_one_off_engine_timing_is_reported(tmp_path, capsys, monkeypatch):
    """The first run on a GPU times cuDNN's engines for the VAE (tens of seconds at 720p): the CLI says
    so, and says nothing where none were timed (the CPU)."""
    from oasis import vae_conv

    out = tmp_path / "demo.mp4"
    monkeypatch.setattr(vae_conv, "tuning_stats", lambda: (0, 0.0))  # the process's earlier tests may have timed some
    code, err = run(capsys, "--demo", "-o", out, "--max-frames", 5, "--no-progress")
    assert code == 0 and "cuDNN" not in err
    monkeypatch.setattr(vae_conv, "tuning_stats", lambda: (41, 17.25))
    vae_conv.set_choices_file(tmp_path / "choices.json")
    try:
        code, err = run(capsys, "--demo", "-o", out, "--max-frames", 5, "--no-progress")
    finally:
        vae_conv._CHOICES.update(path=None, set=False, loaded=None)
    assert code == 0
    assert "17.2 s of that timed cuDNN's engines for 41 new convolution shapes" in err
    assert str(tmp_path / "choices.json") in err


def test_checkpoint_on_a_video_file(tmp_path, capsys, checkpoint, clip):
    out = tmp_path / "hq.mp4"
    code, err = run(capsys, clip, "-o", out, "--checkpoint", checkpoint, "--device", "cpu", "--chunk-frames", 5,
                    "--no-progress")
    assert code == 0, err
    src, dst = probe_video(clip), probe_video(out)
    assert (dst.width, dst.height) == (4 * src.width, 4 * src.height)
    assert dst.fps == src.fps and dst.color_range == "pc"
    frames, _ = read_video(out)
    assert frames.shape[0] == 7 and frames.float().std() > 1


def test_sound_and_rotation_come_along(tmp_path, capsys, checkpoint):
    """A phone-like source (display matrix of 90 degrees, AAC sound): the x4 video keeps the turn and
    the sound, cut at its last frame; ``--no-audio`` leaves the sound out."""
    from test_oasis_video import audio_packets, with_sound

    src = with_sound(tmp_path / "phone.mp4", synthetic_clip(7, 20, 28), 24, "aac", rotation=90)
    out = tmp_path / "hq.mp4"
    code, err = run(capsys, src, "-o", out, "--checkpoint", checkpoint, "--device", "cpu", "--max-frames", 5,
                    "--no-progress")
    assert code == 0, err
    assert "sound: copied aac" in err
    frames, info = read_video(out)
    assert frames.shape[:3] == (5, 80, 112) and info.rotation == 90
    copied, codec = audio_packets(out)
    assert codec == "aac" and copied[-1][0] < 5 / 24 <= copied[-1][0] + 1024 / 48000 + 1e-9
    code, err = run(capsys, src, "-o", out, "--checkpoint", checkpoint, "--device", "cpu", "--max-frames", 5,
                    "--no-progress", "--no-audio")
    assert code == 0 and "sound:" not in err
    assert audio_packets(out) == ([], None)
    # never over its own input (as FFmpeg), by another name or a link to it either: one line, the source kept
    before = src.read_bytes()
    (tmp_path / "link.mp4").symlink_to(src)
    for same in (src, tmp_path / "." / "phone.mp4", tmp_path / "link.mp4"):
        code, err = run(capsys, src, "-o", same, "--checkpoint", checkpoint, "--device", "cpu", "--no-progress")
        assert code == 2 and "is the input video itself" in err and len(err.strip().splitlines()) == 1, err
    assert src.read_bytes() == before


def test_hdr_tags_and_bits_kept(tmp_path, capsys, checkpoint):
    """An HLG phone clip (10 bits, BT.2020): its primaries, curve and matrix tags come along (shown as
    BT.709 they look washed out), and its 10 bits: read as 16, written as 10-bit HEVC, or as 16-bit PNGs.
    ``--bits 8`` writes H.264 and says what is lost (so do JPEG frames); an 8-bit source is written with
    10 on ``--bits 10``; bits a format cannot hold are refused before any work."""
    from test_oasis_video import hdr_source

    src = hdr_source(tmp_path / "hlg.mp4", synthetic_clip(5, 20, 28))
    out = tmp_path / "hq.mp4"
    common = ["--checkpoint", checkpoint, "--device", "cpu", "--no-progress"]
    for path, codec in ((tmp_path / "hq.mkv", "hevc"), (out, "h264")):
        code, err = run(capsys, src, "-o", path, *common)
        assert code == 0, err
        assert ("10-bit H.264 plays in mpv" in err) == (codec == "h264"), err
        info = probe_video(path)
        assert (info.color_primaries, info.color_trc, info.colorspace) == ("bt2020", "arib-std-b67", "bt2020nc")
        assert (info.codec, info.pix_fmt, info.bits) == (codec, "yuv420p10le", 10)
        deep, _ = read_video(path, bits=16)
        assert (deep.int() % 256 != 0).float().mean() > 0.5  # not 8-bit values times 256
    code, err = run(capsys, src, "-o", out, *common, "--bits", 8)
    assert code == 0 and "10 bits per colour are written as 8" in err, err
    assert (probe_video(out).codec, probe_video(out).bits) == ("h264", 8)
    # images: 16-bit PNGs (the model's output not rounded to 8 bits), 8 on --bits 8 or into JPEG, said
    code, err = run(capsys, src, "-o", f"{tmp_path}/frames/", *common)
    assert code == 0 and "written as" not in err, err
    from oasis.images import ImageFrames

    pngs = ImageFrames(tmp_path / "frames", bits=16)
    assert pngs.info.bits == 16 and pngs.info.pix_fmt == "RGB;16" and len(pngs) == 5
    assert (pngs[0:5].int() % 256 != 0).float().mean() > 0.5
    code, err = run(capsys, src, "-o", f"{tmp_path}/frames/", *common, "--bits", 8, "--resume")
    assert code == 2 and "bits 16, now 8" in err, err  # 8-bit frames would not finish a 16-bit run
    code, err = run(capsys, src, "-o", f"{tmp_path}/frames8/", *common, "--bits", 8)
    assert code == 0 and "10 bits per colour are written as 8 (give --bits 16 for 16)" in err, err
    assert ImageFrames(tmp_path / "frames8").info.bits == 8
    code, err = run(capsys, src, "-o", f"{tmp_path}/jpeg/%03d.jpg", *common)
    assert code == 0 and "written as 8 (this image type holds 8)" in err, err
    for where, bits, says in ((out, 16, "--bits 16: for PNG or TIFF images"),
                              (f"{tmp_path}/j/%03d.jpg", 16, "--bits 16: PNG or TIFF images hold 16 bits per colour, "
                                                              "not .jpg"),
                              (f"{tmp_path}/f/", 10, "--bits 10: images hold 8 or 16 bits")):
        code, err = run(capsys, src, "-o", where, *common, "--bits", bits)
        assert code == 2 and says in err, err
    plain = tmp_path / "plain.mp4"
    write_video(plain, synthetic_clip(5, 20, 28), 24)
    code, err = run(capsys, plain, "-o", out, *common, "--bits", 10)
    assert code == 0 and "written as 8" not in err, err
    assert probe_video(out).bits == 10


def test_variable_frame_rate_kept(tmp_path, capsys, checkpoint):
    """A clip that slows from 30 to 20 fps: the x4 video's frames come at the source's times."""
    from test_oasis_video import frame_times, variable_rate_source

    src, times = variable_rate_source(tmp_path / "vfr.mp4", synthetic_clip(9, 20, 28), with_audio=False)
    out = tmp_path / "hq.mp4"
    code, err = run(capsys, src, "-o", out, "--checkpoint", checkpoint, "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert frame_times(out) == pytest.approx([float(t) for t in times], abs=1e-4)


def test_a_damaged_video_is_refused_before_the_model_loads(tmp_path, capsys, checkpoint, monkeypatch):
    """A video cut short: one line naming where its frames stop, exit 2, no model loaded, nothing written
    (it had been restored from the frames before the damage, exit 0)."""
    from test_oasis_video import damaged_copies

    from oasis import pipeline

    loads = []
    monkeypatch.setattr(pipeline.OasisVSR, "from_pretrained", lambda *a, **k: loads.append(1))
    _, _, cut, _ = damaged_copies(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    code, err = run(capsys, cut, "-o", out / "hq.mp4", "--checkpoint", checkpoint, "--device", "cpu", "--no-progress")
    assert code == 2 and "cut short or damaged" in err and len(err.strip().splitlines()) == 1, err
    assert not loads and list(out.iterdir()) == []


def test_output_checked_before_the_model_loads(tmp_path, capsys, checkpoint, clip, monkeypatch):
    """What the output cannot be is said before any model work (no checkpoint loaded): a type that fails
    only when finished (Ogg with H.264), a CRF past H.264's 51; WebM is written with VP9."""
    from oasis import pipeline

    loads = []
    real = pipeline.OasisVSR.from_pretrained
    monkeypatch.setattr(pipeline.OasisVSR, "from_pretrained", lambda *a, **k: loads.append(1) or real(*a, **k))
    for extra, expect in ((["-o", tmp_path / "a.ogv"], "cannot be written with libx264"),
                          (["-o", tmp_path / "a.mp4", "--crf", 60], "--crf 60: H.264 and HEVC take 0..51")):
        code, err = run(capsys, clip, *extra, "--checkpoint", checkpoint, "--device", "cpu", "--no-progress")
        assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not loads and list(tmp_path.iterdir()) == []
    code, err = run(capsys, clip, "-o", tmp_path / "hq.webm", "--checkpoint", checkpoint, "--device", "cpu",
                    "--no-progress")
    assert code == 0 and loads, err
    assert read_video(tmp_path / "hq.webm")[0].shape[:3] == (7, 80, 112)


def test_a_model_giving_nan_is_an_error_not_a_black_video(tmp_path, capsys, clip):
    """A checkpoint whose DiT output head holds NaN: one line naming the frames and the cause, exit 2, no
    file (the frames had become black, uint8 0, exit 0)."""
    pipe = tiny_pipeline(seed=1)
    with torch.no_grad():
        pipe.dit.head.head.weight.fill_(float("nan"))
    pipe.save_pretrained(tmp_path / "nan", layout="wan")
    out = tmp_path / "hq.mp4"
    code, err = run(capsys, clip, "-o", out, "--checkpoint", tmp_path / "nan", "--device", "cpu", "--no-progress")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("oasis-vsr: error: the restored frames 0..6 are not finite"), err
    assert "Traceback" not in err and not out.exists()


def test_a_failed_run_leaves_the_output_as_it_was(tmp_path, capsys, checkpoint, clip, monkeypatch):
    """Out of memory half way (after a block was written): one line, exit 2, an earlier file under the
    name untouched and no partial file left."""
    from oasis import pipeline

    out = tmp_path / "hq.mp4"
    out.write_bytes(b"an earlier result")
    real = pipeline.OasisVSR.stream

    def failing(self, *a, **k):
        blocks = real(self, *a, **k)
        yield next(blocks)
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline.OasisVSR, "stream", failing)
    code, err = run(capsys, clip, "-o", out, "--checkpoint", checkpoint, "--device", "cpu", "--chunk-frames", 5,
                    "--no-progress")
    assert code == 2 and "out of memory" in err and "Traceback" not in err, err
    assert out.read_bytes() == b"an earlier result" and sorted(p.name for p in tmp_path.iterdir()) == ["hq.mp4"]
    # a scratch file an interrupted run left at the partial's name: the next free name is written instead,
    # never the output itself (which a failed run would then have cut short)
    left = tmp_path / ".hq.mp4.oasis-partial.mp4"
    left.write_bytes(b"left by a crash")
    code, err = run(capsys, clip, "-o", out, "--checkpoint", checkpoint, "--device", "cpu", "--chunk-frames", 5,
                    "--no-progress")
    assert code == 2 and out.read_bytes() == b"an earlier result" and left.read_bytes() == b"left by a crash"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hq.mp4.oasis-partial.mp4", "hq.mp4"]


def test_pixel_shape_kept_and_interlacing_said(tmp_path, capsys, checkpoint):
    """An anamorphic DVD-like clip (SAR 32:27, interlaced): the x4 output keeps the pixel shape, and the
    CLI says the fields are restored as progressive frames."""
    import av
    from test_oasis_video import mux_frames

    src = tmp_path / "dvd.mp4"
    with av.open(str(src), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 28, 20, "yuv420p"
        stream.codec_context.sample_aspect_ratio = Fraction(32, 27)
        stream.options = {"x264-params": "interlaced=1"}
        mux_frames(container, stream, synthetic_clip(5, 20, 28))
    out = tmp_path / "hq.mp4"
    code, err = run(capsys, src, "-o", out, "--checkpoint", checkpoint, "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert "interlaced" in err
    assert probe_video(out).sample_aspect_ratio == Fraction(32, 27)


def test_tags_and_chapters_kept(tmp_path, capsys, checkpoint):
    """A film-like Matroska source: the x4 video keeps its title and chapters and its sound's language."""
    import av
    from test_oasis_video import rich_source

    src = rich_source(tmp_path / "film.mkv", synthetic_clip(8, 20, 28))
    out = tmp_path / "hq.mkv"
    code, err = run(capsys, src, "-o", out, "--checkpoint", checkpoint, "--device", "cpu", "--no-progress")
    assert code == 0, err
    with av.open(str(out)) as c:
        assert c.metadata["title"] == "My film" and len(c.chapters()) == 2
        assert c.streams.audio[0].metadata["language"] == "jpn"
    assert "not kept" not in err


def test_routing_none_and_tiles(tmp_path, capsys, checkpoint, clip):
    out = tmp_path / "hq.mp4"
    code, err = run(capsys, clip, "-o", out, "--checkpoint", checkpoint, "--device", "cpu", "--routing", "none",
                    "--tile", 12, "--no-progress", "--vae", "diffusers")
    assert code == 0, err
    assert "tiles 12x12" in err


@pytest.mark.parametrize("case,expect", [
    ("missing", "no such file"),
    ("text", "x.mp4"),
    ("no_projector", "has no projector"),
    ("no_checkpoint", "no --checkpoint"),
    ("not_checkpoint", "not an OASIS checkpoint"),
    ("cuda", "CUDA is not available"),
    ("budget", "memory budget"),
    ("routing", "does not exist"),
    ("out_dir", "does not exist"),
    ("gpus_chunk", "fewer than the 3 processes"),
    ("gpus_frames", "fewer than the 4 processes"),
])
def test_one_line_errors(tmp_path, capsys, checkpoint, clip, case, expect):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "out.mp4"
    args = [clip, "-o", out, "--checkpoint", checkpoint, "--device", "cpu", "--no-progress"]
    if case == "missing":
        args[0] = tmp_path / "nothing.mp4"
    elif case == "text":
        args[0] = tmp_path / "x.mp4"
        args[0].write_text("not a video")
    elif case == "no_projector":
        import shutil

        import safetensors.torch as st

        broken = tmp_path / "ckpt"
        shutil.copytree(checkpoint, broken)
        state = st.load_file(str(broken / "oasis.safetensors"))
        st.save_file({"context": state["context"]}, str(broken / "oasis.safetensors"))
        args[4] = broken
    elif case == "no_checkpoint":
        args = [clip, "-o", out]
    elif case == "not_checkpoint":
        args[4] = tmp_path
    elif case == "cuda":
        args[6] = "cuda"
    elif case == "budget":
        args += ["--memory-budget", "0.0001"]
    elif case == "routing":
        args += ["--routing", tmp_path / "r.json"]
    elif case == "out_dir":
        args[2] = tmp_path / "no" / "out.mp4"
    elif case == "gpus_chunk":  # 5 frames are 2 latent frames: 3 processes cannot split them
        args += ["--gpus", 3, "--chunk-frames", 5]
    elif case == "gpus_frames":  # the 7-frame clip is one chunk of 3 latent frames: found by each process
        args += ["--gpus", 4]
    code, err = run(capsys, *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("oasis-vsr: error:"), err
    assert expect.lower() in lines[0].lower(), lines[0]
    assert not out.exists()


def test_bad_option_values_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--demo", "-o", "x.mp4", "--chunk-frames", "6"])
    assert info.value.code == 2
    assert "4k+1" in capsys.readouterr().err


@pytest.mark.slow  # three interpreters start; ~20 s on 2 cores
def test_gpus_split_the_dit_and_write_the_same_frames(tmp_path, capfd, checkpoint, clip):
    """--gpus 2 with --device cpu: two gloo processes split each DiT call's latent frames
    (WanDiT.set_sequence_parallel); rank 0 writes the same frames as one process."""
    from oasis.images import ImageFrames

    # PNG frames, not a video: even at crf 0 libx264 stores yuv420p, whose colour conversion and shared
    # chroma turn a one-step difference in one channel into up to 3 steps in others
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--checkpoint", checkpoint, "--device", "cpu", "--no-progress", "--no-compile"]
    code, err = run(capfd, clip, "-o", f"{one}/", *common)  # capfd: the processes write to the same stderr
    assert code == 0, err
    code, err = run(capfd, clip, "-o", f"{two}/", *common, "--gpus", 2)
    assert code == 0, err
    assert "2 processes" in err
    a, b = ImageFrames(one)[:], ImageFrames(two)[:]
    assert a.shape == b.shape == (7, 80, 112, 3)
    diff = (a.int() - b.int()).abs()
    # float sums reordered: a pixel near a rounding boundary moves by one step, few pixels do
    assert diff.max() <= 1 and diff.float().mean() < 0.001, (diff.max(), diff.float().mean())


def test_gpus_are_checked_before_any_process_starts(tmp_path, capsys):
    # 5 frames are 2 latent frames, whatever --chunk-frames asks: 3 processes cannot split them
    code, err = run(capsys, "--demo", "-o", tmp_path / "d.mp4", "--max-frames", 5, "--chunk-frames", 9,
                    "--gpus", 3, "--device", "cpu", "--no-progress")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "fewer than the 3 processes" in lines[0], err


def test_where_the_video_is_written(tmp_path, capsys, checkpoint, clip, monkeypatch):
    """Beside the output, then renamed, except where renaming would not do what writing does: a symbolic
    link is written through, an existing file keeps its permissions, a file already at the partial's
    name is never touched (the next free name is), a failed rename (a bind-mounted output) falls back to copying the bytes in;
    several-file outputs (HLS) are refused before the model loads."""
    import stat

    def restore(out, *extra):
        code, err = run(capsys, clip, "-o", out, "--checkpoint", checkpoint, "--device", "cpu", "--no-progress",
                        *extra)
        assert code == 0, err
        return tuple(read_video(out)[0].shape[:3])

    real = tmp_path / "real.mp4"
    real.write_bytes(b"old")
    link = tmp_path / "link.mp4"
    link.symlink_to(real)
    assert restore(link) == (7, 80, 112) and link.is_symlink() and real.stat().st_size > 3
    kept = tmp_path / "kept.mp4"
    kept.write_bytes(b"old")
    kept.chmod(0o640)
    restore(kept)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    squatter = tmp_path / ".squat.mp4.oasis-partial.mp4"
    squatter.write_bytes(b"someone else's")
    restore(tmp_path / "squat.mp4")
    assert squatter.read_bytes() == b"someone else's"

    def busy(src, dst):
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(os, "replace", busy)
    assert restore(tmp_path / "mounted.mp4") == (7, 80, 112)
    monkeypatch.undo()
    assert list(tmp_path.glob(".*oasis-partial*")) == [squatter]
    code, err = run(capsys, clip, "-o", tmp_path / "live.m3u8", "--checkpoint", checkpoint, "--device", "cpu")
    assert code == 2 and "several files" in err
    assert not list(tmp_path.glob("live*")) and not list(tmp_path.glob("*.ts"))


def test_frames_as_images_in_and_out(tmp_path, capsys, checkpoint):
    """A folder of frames (a test set's layout) restored into a folder under the same names, PNG, the
    same numbers as the pipeline gives the frames; a numbered pattern at --fps into a video; a video
    into numbered JPEGs, its sound said to be left out."""
    from PIL import Image

    from oasis.images import ImageFrames
    from oasis.pipeline import OasisVSR
    from test_oasis_video import with_sound

    clip = synthetic_clip(7, 20, 28)
    folder = tmp_path / "lq"
    folder.mkdir()
    for k, frame in enumerate(clip):
        Image.fromarray(frame.numpy()).save(folder / f"im{k + 1}.png")
    common = ["--checkpoint", checkpoint, "--device", "cpu", "--no-progress"]
    code, err = run(capsys, folder, "-o", f"{tmp_path}/hq/", *common, "--chunk-frames", 5)
    assert code == 0, err
    assert "7 images 112x80" in err
    assert shown(tmp_path / "hq") == sorted(f"im{k + 1}.png" for k in range(7))
    restored = ImageFrames(tmp_path / "hq")[:]
    pipe = OasisVSR.from_pretrained(checkpoint, dtype=torch.float32, device="cpu")
    assert torch.equal(restored, pipe(clip, chunk_frames=5, progress=False))

    code, err = run(capsys, folder / "im%d.png", "-o", tmp_path / "hq.mp4", *common, "--fps", 30)
    assert code == 0, err
    info = probe_video(tmp_path / "hq.mp4")
    assert (info.width, info.height, info.fps) == (112, 80, 30) and read_video(tmp_path / "hq.mp4")[0].shape[0] == 7

    src = with_sound(tmp_path / "sound.mp4", clip, 24, "aac")
    code, err = run(capsys, src, "-o", tmp_path / "jpg" / "%03d.jpg", *common, "--max-frames", 5)
    assert code == 0, err
    assert "other streams are not kept (1 audio)" in err
    assert shown(tmp_path / "jpg") == [f"{k:03d}.jpg" for k in range(1, 6)]


def test_image_outputs_keep_numbers_and_never_write_over_their_input(tmp_path, capsys, checkpoint):
    """A pattern from 0 (REDS' numbering) written to a pattern keeps its numbers, and to a folder its names;
    an output that would write over an input frame is refused before anything runs; images an earlier run
    left in the output folder are said."""
    from PIL import Image

    folder = tmp_path / "lr"
    folder.mkdir()
    for k, frame in enumerate(synthetic_clip(3, 20, 28)):
        Image.fromarray(frame.numpy()).save(folder / f"{k:08d}.png")
    common = ["--checkpoint", checkpoint, "--device", "cpu", "--no-progress", "--fps", "30000/1001"]
    (tmp_path / "sr").mkdir()
    Image.new("RGB", (112, 80)).save(tmp_path / "sr" / "99999999.png")
    code, err = run(capsys, folder / "%08d.png", "-o", tmp_path / "sr" / "%08d.png", *common)
    assert code == 0, err
    assert shown(tmp_path / "sr") == ["00000000.png", "00000001.png", "00000002.png", "99999999.png"]
    assert "1 other images in" in err and "writing 3 images 112x80" in err
    code, err = run(capsys, folder / "%08d.png", "-o", f"{tmp_path}/sr2/", *common)
    assert code == 0 and shown(tmp_path / "sr2") == shown(folder), err
    before = {f: (folder / f).read_bytes() for f in shown(folder)}
    for output in (folder, folder / "%08d.png"):
        code, err = run(capsys, folder, "-o", output, *common)
        assert code == 2 and "would be written over an input frame" in err, err
    assert {f: (folder / f).read_bytes() for f in shown(folder)} == before


@pytest.mark.parametrize("case,expect", [
    ("fps_video", "--fps sets the rate of an input folder"),
    ("empty", "no images"),
    ("gif", "images, not .gif"),
    ("no_parent", "does not exist"),
    ("sizes", "where the sequence's first image"),
    ("bits", "images hold 8 or 16 bits per colour"),
    ("empty_output", "no output"),
    ("no_suffix", "has no file type"),
    ("one_image", "is one image"),
])
def test_image_sequence_errors(tmp_path, capsys, checkpoint, clip, case, expect):
    from PIL import Image

    folder = tmp_path / "lq"
    folder.mkdir()
    args = [folder, "-o", f"{tmp_path}/hq/", "--checkpoint", checkpoint, "--device", "cpu", "--no-progress"]
    if case == "fps_video":
        args[0], args[2] = clip, tmp_path / "hq.mp4"
        args += ["--fps", 30]
    elif case == "gif":
        args[0] = clip
        args[2] = tmp_path / "%04d.gif"
    elif case == "no_parent":
        args[0] = clip
        args[2] = f"{tmp_path}/no/hq/"
    elif case == "bits":
        args[0] = clip
        args += ["--bits", 10]
    elif case in ("empty_output", "no_suffix", "one_image"):
        args[0] = clip
        args[2] = {"empty_output": "", "no_suffix": tmp_path / "hq", "one_image": tmp_path / "hq.png"}[case]
    elif case == "sizes":
        Image.new("RGB", (28, 20)).save(folder / "a.png")
        Image.new("RGB", (28, 24)).save(folder / "b.png")
    code, err = run(capsys, *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("oasis-vsr: error:"), err
    assert expect.lower() in lines[0].lower(), lines[0]
    assert not (tmp_path / "hq").exists()


def test_blocks_are_written_behind_in_order_and_failures_stop_both_sides():
    """The output is written on a thread one block behind the restoration: in order, and the first error
    of either side raised in the caller once that thread has stopped, nothing written after it."""
    import threading

    from oasis.cli import _write_behind

    written, made = [], []

    def blocks(n, fail_at=None, frames=2):  # block k holds frames 2k, 2k + 1
        for k in range(n):
            if k == fail_at:
                raise MemoryError("out of device memory")
            made.append(k)
            yield torch.arange(frames * k, frames * (k + 1))

    def write(frames):
        if int(frames[0]) == 7:
            raise OSError(28, "No space left on device")
        written.extend(frames.tolist())

    _write_behind(blocks(3), write)
    assert written == list(range(6))  # in order, a frame at a time
    written.clear(), made.clear()
    with pytest.raises(OSError, match="No space"):
        _write_behind(blocks(100), write)
    assert written == list(range(7)) and len(made) <= 6  # one queued, one being restored: then it stopped
    written.clear()
    with pytest.raises(MemoryError):
        _write_behind(blocks(10, fail_at=2), write)
    assert written == list(range(len(written))) and len(written) <= 4
    assert not [t for t in threading.enumerate() if t.name == "oasis-vsr-write"]


def test_an_interrupt_waits_for_the_writer():
    """Ctrl-C while the last block is being written: the writer stops at the next frame, and only then does
    the interrupt reach the caller (which closes the file; closing it under a writing thread crashed x264)."""
    import threading
    import time

    from oasis.cli import _write_behind

    written = []

    def slow(frames):
        time.sleep(0.05)
        written.append(int(frames[0]))

    def blocks():
        yield torch.arange(40)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write_behind(blocks(), slow)
    assert not [t for t in threading.enumerate() if t.name == "oasis-vsr-write"]
    assert len(written) < 40 and written == list(range(len(written)))


def test_resume_continues_an_interrupted_run_into_images(tmp_path, capsys, checkpoint, clip):
    """--resume keeps the frames already written and restores from the first missing one's chunk: the same
    files, byte for byte, as an uninterrupted run; nothing to do when all are there; videos refuse it."""
    common = ["--checkpoint", checkpoint, "--device", "cpu", "--no-progress", "--chunk-frames", 5]
    code, err = run(capsys, clip, "-o", f"{tmp_path}/whole/", *common)
    assert code == 0, err
    whole = {f: (tmp_path / "whole" / f).read_bytes() for f in shown(tmp_path / "whole")}
    assert len(whole) == 7
    (tmp_path / "cut").mkdir()
    for name in sorted(whole)[:4]:  # a run stopped after 4 frames
        (tmp_path / "cut" / name).write_bytes(whole[name])
    # without the record the interrupted run left beside its frames, they cannot be trusted
    code, err = run(capsys, clip, "-o", f"{tmp_path}/cut/", *common, "--resume")
    assert code == 2 and "no record of how the frames" in err, err
    (tmp_path / "cut" / ".oasis-vsr.json").write_bytes((tmp_path / "whole" / ".oasis-vsr.json").read_bytes())
    # other chunks, or another --max-frames (which moves every chunk), would not continue the same run
    for other in (["--chunk-frames", 9], ["--max-frames", 6]):
        code, err = run(capsys, clip, "-o", f"{tmp_path}/cut/", *common, "--resume", *other)
        assert code == 2 and "were made otherwise" in err, err
    code, err = run(capsys, clip, "-o", f"{tmp_path}/cut/", *common[:-2], "--resume")  # the chunks: the record's
    assert code == 0 and "resuming at frame 4" in err and "wrote" in err and ": 3 images" in err, err
    assert {f: (tmp_path / "cut" / f).read_bytes() for f in shown(tmp_path / "cut")} == whole
    code, err = run(capsys, clip, "-o", f"{tmp_path}/cut/", *common, "--resume")
    assert code == 0 and "nothing to restore" in err, err
    # all there, but made otherwise: still refused, not "nothing to restore"
    code, err = run(capsys, clip, "-o", f"{tmp_path}/cut/", *common, "--resume", "--max-frames", 5)
    assert code == 2 and "were made otherwise" in err, err
    # a fresh run over an earlier one's frames, stopped after 3 of them: the record counts the frames this
    # run put in place, and --resume continues from there, not from the first missing frame (none is)
    from oasis import images

    real_save = images.ImageWriter._save

    def stopping(self, frame, name, index):
        if index == 3:
            raise KeyboardInterrupt
        real_save(self, frame, name, index)

    other = tmp_path / "other.mp4"
    write_video(other, synthetic_clip(7, 20, 28, seed=9), 24)
    import unittest.mock

    with unittest.mock.patch.object(images.ImageWriter, "_save", stopping):
        code, err = run(capsys, other, "-o", f"{tmp_path}/cut/", *common)
    assert code == 130 and len(shown(tmp_path / "cut")) == 7  # 3 of this run's, 4 of the first's
    code, err = run(capsys, other, "-o", f"{tmp_path}/cut/", *common, "--resume")
    assert code == 0 and "resuming at frame 3" in err, err
    code, err = run(capsys, other, "-o", f"{tmp_path}/fresh/", *common)
    assert code == 0, err
    assert {f: (tmp_path / "cut" / f).read_bytes() for f in shown(tmp_path / "cut")} == \
        {f: (tmp_path / "fresh" / f).read_bytes() for f in shown(tmp_path / "fresh")}
    # the same --tile as the first run, larger than the frame: the same tiles
    code, err = run(capsys, other, "-o", f"{tmp_path}/t/", *common, "--tile", 32)
    os.remove(tmp_path / "t" / sorted(shown(tmp_path / "t"))[-1])
    code, err = run(capsys, other, "-o", f"{tmp_path}/t/", *common, "--tile", 32, "--resume")
    assert code == 0 and "resuming at frame 6" in err, err
    code, err = run(capsys, clip, "-o", tmp_path / "a.mp4", *common, "--resume")  # no video yet: made
    assert code == 0 and read_video(tmp_path / "a.mp4")[0].shape[0] == 7, err
    code, err = run(capsys, clip, "-o", tmp_path / "a.mp4", *common, "--resume")  # there (only once whole): kept
    assert code == 0 and "exists (a video appears only once complete): kept" in err, err


def test_several_clips_and_a_folder_of_clips(tmp_path, capsys, checkpoint, clip):
    """Several inputs, or a folder of clips (a test set: folders of frames, videos), restored by one model
    into the output folder under their own names: the same output as each clip alone."""
    import shutil

    from PIL import Image

    from oasis.images import ImageFrames

    sets = tmp_path / "testset"
    for name, count in (("calendar", 5), ("city", 6)):
        (sets / name).mkdir(parents=True)
        for k, frame in enumerate(synthetic_clip(count, 20, 28, seed=count)):
            Image.fromarray(frame.numpy()).save(sets / name / f"{k:03d}.png")
    shutil.copy(clip, sets / "walk.mp4")
    (sets / "notes.txt").write_text("not a clip")
    common = ["--checkpoint", checkpoint, "--device", "cpu", "--no-progress"]
    code, err = run(capsys, sets, "-o", f"{tmp_path}/out/", *common)
    assert code == 0, err
    assert "clip 3 of 3" in err and err.count("loaded the checkpoint") == 1
    assert shown(tmp_path / "out") == ["calendar", "city", "walk.mp4"]
    assert shown(tmp_path / "out" / "city") == [f"{k:03d}.png" for k in range(6)]
    code, err = run(capsys, sets / "city", "-o", f"{tmp_path}/alone/", *common)
    assert code == 0, err
    assert torch.equal(ImageFrames(tmp_path / "alone")[:], ImageFrames(tmp_path / "out" / "city")[:])
    assert read_video(tmp_path / "out" / "walk.mp4")[0].shape == (7, 80, 112, 3)
    code, err = run(capsys, sets / "calendar", sets / "city", "-o", f"{tmp_path}/two/", *common, "--max-frames", 5)
    assert code == 0 and shown(tmp_path / "two") == ["calendar", "city"], err
    # every clip is checked before the model loads: one bad input stops all, nothing written
    (sets / "broken").mkdir()
    (sets / "broken" / "0.png").write_text("not an image")
    code, err = run(capsys, sets, "-o", f"{tmp_path}/none/", *common)
    assert code == 2 and "broken/0.png: not a readable image" in err and not (tmp_path / "none").exists()
    code, err = run(capsys, sets / "calendar", sets / "city", "-o", tmp_path / "x.mp4", *common)
    assert code == 2 and "2 clips are written into a folder" in err
    # a folder of one clip is a folder of clips too (its output folder made); a clip named with %d keeps a
    # name; a folder of clips is given alone; a batch never writes over its own clips
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(clip, one / "take%03d.mp4")
    code, err = run(capsys, one, "-o", f"{tmp_path}/out1/", *common)
    assert code == 0 and shown(tmp_path / "out1") == ["take_03d.mp4"], err
    code, err = run(capsys, one, sets, "-o", f"{tmp_path}/out2/", *common)
    assert code == 2 and "is a folder of clips: give it alone" in err, err
    code, err = run(capsys, one, "-o", one, *common)
    assert code == 2 and "is the folder of clips itself" in err, err
    shutil.copy(clip, one / "same.mp4")
    code, err = run(capsys, one / "same.mp4", clip, "-o", one, *common)
    assert code == 2 and "would be the clip itself" in err, err
