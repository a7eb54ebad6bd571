"""Video I/O for the super-resolution CLI: round trips through real encoders, errors, test clip."""

import os
from fractions import Fraction

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from oasis.video import (  # noqa: E402
    VideoError,
    VideoInfo,
    VideoWriter,
    probe_video,
    read_video,
    synthetic_clip,
    write_video,
)

NTSC = Fraction(30000, 1001)
F, H, W = 9, 64, 96

# Per-frame mean absolute error bound (0..255) after libx264 crf 0 + yuv420p. crf 0 is
# lossless, so all the loss is the RGB -> YUV 4:2:0 conversion: halving chroma resolution
# smears the clip's saturated 1-px disc rims and 2-px coloured checkerboards (measured
# 4.3-5.0; the same clip in yuv444p gives 0.4). The bound still fails for the faults it
# guards against: a 1-px shift costs 13-18, the next frame 14-15, decoding with the wrong
# matrix (BT.601 for BT.709) ~8.5, the wrong range ~+10.
MAE_420 = 6.0
# yuv444p keeps full chroma: only 8-bit YUV rounding is left (measured 0.36)
MAE_444 = 1.0
# mpeg4 at its finest quantiser is not lossless (measured 4.9-5.9 per frame)
MAE_MPEG4 = 7.0


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(F, H, W)


def frame_mae(a, b):
    """Per-frame mean |a - b| of two uint8 ``[F, H, W, 3]`` tensors."""
    return (a.float() - b.float()).abs().mean(dim=(1, 2, 3))


def check_order(decoded, source):
    # each decoded frame must match its own source frame better than the neighbours
    own = frame_mae(decoded, source)
    assert (own[:-1] < frame_mae(decoded[:-1], source[1:])).all(), "frames shifted or shuffled"
    assert (own[1:] < frame_mae(decoded[1:], source[:-1])).all(), "frames shifted or shuffled"


# ----------------------------------------------------------------------------- round trips


def test_round_trip_keeps_count_size_fps_and_order(tmp_path, clip):
    path = tmp_path / "clip.mp4"
    write_video(path, clip, NTSC, crf=0)
    frames, info = read_video(path)
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (F, H, W, 3)
    assert (info.width, info.height, info.num_frames) == (W, H, F)
    assert info.fps == NTSC  # exact Fraction, not 29.97
    assert info.codec == "h264" and info.path == str(path)
    mae = frame_mae(frames, clip)
    assert mae.max() < MAE_420, mae
    check_order(frames, clip)


def test_yuv444_round_trip_is_nearly_exact(tmp_path, clip):
    path = tmp_path / "clip444.mp4"
    write_video(path, clip, 25, crf=0, pix_fmt="yuv444p")
    frames, info = read_video(path)
    assert info.pix_fmt == "yuv444p"
    assert frame_mae(frames, clip).max() < MAE_444


def test_read_max_frames(tmp_path, clip):
    path = tmp_path / "clip.mp4"
    write_video(path, clip, 24)
    frames, info = read_video(path, max_frames=4)
    assert frames.shape[0] == 4 and info.num_frames == 4
    check_order(frames, clip[:4])


def test_streaming_chunks_equal_one_shot(tmp_path, clip):
    one, chunked = tmp_path / "one.mp4", tmp_path / "chunked.mp4"
    write_video(one, clip, NTSC, crf=0)
    with VideoWriter(chunked, W, H, NTSC, crf=0) as writer:
        writer.write(clip[:4])
        writer.write(clip[4:].numpy())  # numpy chunks too
        assert writer.frames_written == F
    assert writer.closed
    a, info_a = read_video(one)
    b, info_b = read_video(chunked)
    assert info_a.num_frames == info_b.num_frames == F
    assert info_b.fps == NTSC
    # lossless encoding of the same frames: chunking must not change a single pixel
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "fps, expected",
    [(29.97002997002997, NTSC), (23.976, Fraction(2997, 125)), ("24000/1001", Fraction(24000, 1001))],
)
def test_fps_forms_survive(tmp_path, clip, fps, expected):
    path = tmp_path / "rate.mp4"
    write_video(path, clip[:2], fps)
    assert probe_video(path).fps == expected


def test_mkv_has_no_frame_count(tmp_path, clip):
    path = tmp_path / "clip.mkv"
    write_video(path, clip[:3], NTSC)
    info = probe_video(path)
    assert info.num_frames is None  # Matroska does not declare it
    assert info.fps == NTSC
    assert read_video(path)[1].num_frames == 3


# ----------------------------------------------------------------------------- probe


def test_probe_fields(tmp_path, clip):
    path = tmp_path / "clip.mp4"
    write_video(path, clip, NTSC)
    info = probe_video(path)
    assert isinstance(info, VideoInfo)
    assert (info.width, info.height, info.fps) == (W, H, NTSC)
    assert info.num_frames in (F, None)  # mp4 declares it; the API allows None
    assert info.codec == "h264" and info.pix_fmt == "yuv420p"
    assert (info.color_range, info.colorspace) == ("tv", "bt709")  # writer defaults, tagged
    with pytest.raises(AttributeError):
        info.width = 1  # frozen


# ----------------------------------------------------------------------------- colour


@pytest.mark.parametrize("color_range", ["pc", "tv"])
def test_color_range_round_trip(tmp_path, clip, color_range):
    path = tmp_path / f"{color_range}.mp4"
    write_video(path, clip, 25, crf=0, color_range=color_range)
    assert probe_video(path).color_range == color_range
    frames, info = read_video(path)
    assert info.color_range == color_range
    # pixels come back right too, so the decoder honoured the range it was told
    assert frame_mae(frames, clip).max() < MAE_420


def test_colorspace_tag_round_trip(tmp_path, clip):
    path = tmp_path / "601.mp4"
    write_video(path, clip, 25, crf=0, colorspace="smpte170m")
    assert probe_video(path).colorspace == "smpte170m"
    frames, _ = read_video(path)
    assert frame_mae(frames, clip).max() < MAE_420


def test_mpeg4_cannot_signal_range(tmp_path, clip):
    # the libx264 fallback: FFmpeg's mpeg4 encoder drops range tags, so the writer stores
    # untagged BT.601 "tv" (what decoders assume) and says so
    path = tmp_path / "mpeg4.mp4"
    with pytest.warns(RuntimeWarning, match="cannot signal"):
        write_video(path, clip, NTSC, codec="mpeg4", crf=0, color_range="pc")
    info = probe_video(path)
    assert info.codec == "mpeg4" and info.color_range is None and info.fps == NTSC
    frames, _ = read_video(path)
    assert frame_mae(frames, clip).max() < MAE_MPEG4
    check_order(frames, clip)


def test_libx264_falls_back_to_mpeg4(tmp_path, clip, monkeypatch):
    monkeypatch.setattr(av, "codecs_available", set(av.codecs_available) - {"libx264"})
    path = tmp_path / "fallback.mp4"
    with pytest.warns(RuntimeWarning, match="no libx264"):
        writer = VideoWriter(path, W, H, 25)
    with writer:
        assert writer.codec == "mpeg4"
        writer.write(clip[:2])
    assert probe_video(path).codec == "mpeg4"


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.mp4"
    for fn in (probe_video, read_video):
        with pytest.raises(VideoError, match="nope.mp4: no such file"):
            fn(path)


def test_directory(tmp_path):
    with pytest.raises(VideoError, match="is a directory"):
        probe_video(tmp_path)
    with pytest.raises(VideoError, match="is a directory"):
        VideoWriter(tmp_path, W, H, 25)


def test_text_file_named_mp4(tmp_path):
    path = tmp_path / "x.mp4"
    path.write_text("not a video\n")
    for fn in (probe_video, read_video):
        with pytest.raises(VideoError, match=r"x\.mp4: not a readable video"):
            fn(path)


def test_audio_only_file(tmp_path):
    path = tmp_path / "tone.wav"
    container = av.open(str(path), "w")
    stream = container.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate, frame.pts = 8000, 0
    for packet in [*stream.encode(frame), *stream.encode(None)]:
        container.mux(packet)
    container.close()
    with pytest.raises(VideoError, match=r"tone\.wav: no video stream \(streams found: audio\)"):
        probe_video(path)


@pytest.mark.parametrize("width, height, what", [(95, 64, "width 95"), (96, 63, "height 63")])
def test_odd_size_for_yuv420p(tmp_path, width, height, what):
    with pytest.raises(VideoError, match=f"{what} must be even"):
        VideoWriter(tmp_path / "odd.mp4", width, height, 25)
    assert not (tmp_path / "odd.mp4").exists()  # nothing created before validation passed


def test_odd_size_is_fine_without_subsampling(tmp_path):
    frames = synthetic_clip(2, 63, 95)
    path = tmp_path / "odd444.mp4"
    write_video(path, frames, 25, crf=0, pix_fmt="yuv444p")
    assert (probe_video(path).width, probe_video(path).height) == (95, 63)


def test_missing_output_directory(tmp_path, clip):
    with pytest.raises(VideoError, match="output directory .*nodir does not exist"):
        write_video(tmp_path / "nodir" / "out.mp4", clip, 25)


def test_bad_frames_for_writer(tmp_path):
    with VideoWriter(tmp_path / "w.mp4", W, H, 25) as writer:
        with pytest.raises(TypeError, match="torch.float32"):
            writer.write(torch.zeros(1, H, W, 3))
        with pytest.raises(TypeError, match="float64"):
            writer.write(np.zeros((1, H, W, 3)))
        with pytest.raises(TypeError, match="got list"):
            writer.write([[0]])
        with pytest.raises(VideoError, match=r"\[1, 64, 96, 4\]"):
            writer.write(torch.zeros(1, H, W, 4, dtype=torch.uint8))
        with pytest.raises(VideoError, match=r"\[64, 96, 3\]"):
            writer.write(torch.zeros(H, W, 3, dtype=torch.uint8))  # a frame, not a clip
        with pytest.raises(VideoError, match="frames are 96x32 .*opened for 96x64"):
            writer.write(torch.zeros(1, 32, W, 3, dtype=torch.uint8))
        writer.write(torch.zeros(0, H, W, 3, dtype=torch.uint8))  # empty chunk: nothing to do
        writer.write(torch.zeros(1, H, W, 3, dtype=torch.uint8))
    with pytest.raises(VideoError, match="closed"):
        writer.write(torch.zeros(1, H, W, 3, dtype=torch.uint8))
    assert probe_video(tmp_path / "w.mp4").num_frames == 1


def test_write_video_rejects_float(tmp_path):
    with pytest.raises(TypeError, match="float32"):
        write_video(tmp_path / "f.mp4", torch.rand(2, H, W, 3), 25)


def test_closing_without_frames_creates_no_file(tmp_path):
    path = tmp_path / "empty.mp4"
    writer = VideoWriter(path, W, H, 25)
    with pytest.raises(VideoError, match="empty.mp4: no frames were written"):
        writer.close()
    assert not path.exists()
    writer.close()  # second close is a no-op
    # an existing file is left alone: PyAV opens the output only at the first packet
    path.write_text("keep me")
    with pytest.raises(VideoError, match="no frames were written"):
        with VideoWriter(path, W, H, 25):
            pass
    assert path.read_text() == "keep me"


def test_unknown_extension(tmp_path):
    with pytest.raises(VideoError, match=r"out\.xyz: cannot write this file type"):
        VideoWriter(tmp_path / "out.xyz", W, H, 25)


def test_error_inside_with_block_is_not_masked(tmp_path):
    with pytest.raises(RuntimeError, match="upscaler failed"):
        with VideoWriter(tmp_path / "e.mp4", W, H, 25):
            raise RuntimeError("upscaler failed")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fps": 0}, "fps must be a positive number, got 0"),
        ({"fps": "abc"}, "fps must be a positive number, got 'abc'"),
        ({"fps": float("inf")}, "fps must be a positive number"),
        ({"width": 0}, "width must be a positive int, got 0"),
        ({"codec": "no-such-codec"}, "no 'no-such-codec' encoder"),
        ({"codec": "aac"}, "not a video encoder"),
        ({"pix_fmt": "rgb48le"}, "cannot encode pix_fmt 'rgb48le'"),
        ({"color_range": "full"}, "color_range must be 'tv', 'pc' or None, got 'full'"),
        ({"colorspace": "srgb"}, "colorspace must be one of"),
        ({"crf": -1}, "crf must be a number in 0..63, got -1"),
        ({"rotation": "90"}, "rotation must be a number of degrees, got '90'"),
        ({"color_trc": "hlg"}, "color_trc must be one of"),
        ({"color_primaries": "p3"}, "color_primaries must be one of"),
        ({"audio_from": "no/such/file.mp4"}, "no such file"),
    ],
)
def test_bad_writer_arguments(tmp_path, kwargs, match):
    args = {"width": W, "height": H, "fps": 25, **kwargs}
    with pytest.raises(VideoError, match=match):
        VideoWriter(tmp_path / "a.mp4", args.pop("width"), args.pop("height"), args.pop("fps"), **args)


def test_bad_max_frames(tmp_path, clip):
    path = tmp_path / "clip.mp4"
    write_video(path, clip[:2], 25)
    with pytest.raises(ValueError, match="max_frames must be a positive int, got 0"):
        read_video(path, max_frames=0)


# ----------------------------------------------------------------------------- test clip


def test_synthetic_clip_shape_and_determinism():
    a = synthetic_clip(5, 40, 56, seed=3)
    assert a.dtype == torch.uint8 and tuple(a.shape) == (5, 40, 56, 3)
    assert torch.equal(a, synthetic_clip(5, 40, 56, seed=3))
    assert not torch.equal(a, synthetic_clip(5, 40, 56, seed=4))
    # a prefix of a longer clip is the shorter clip: frames depend on t only
    assert torch.equal(a[:3], synthetic_clip(3, 40, 56, seed=3))


def test_synthetic_clip_moves_and_has_structure():
    clip = synthetic_clip(6, 48, 64).float()
    step = (clip[1:] - clip[:-1]).abs().mean(dim=(1, 2, 3))
    assert (step > 2).all(), step  # every frame differs from the last
    assert clip.std() > 30  # not flat
    # fine detail: neighbouring pixels differ noticeably (texture, edges), which a x4 demo needs
    assert (clip[:, :, 1:] - clip[:, :, :-1]).abs().mean() > 5
    assert clip.min() < 60 and clip.max() > 200  # uses the range


def test_synthetic_clip_ignores_global_rng():
    torch.manual_seed(1)
    a = synthetic_clip(2, 16, 16)
    torch.manual_seed(2)
    assert torch.equal(a, synthetic_clip(2, 16, 16))


@pytest.mark.parametrize("args", [(0, 8, 8), (2, -1, 8), (2, 8, 2.5), (True, 8, 8)])
def test_synthetic_clip_rejects_bad_sizes(args):
    with pytest.raises(ValueError, match="must be a positive int"):
        synthetic_clip(*args)


def test_synthetic_clip_tiny_sizes():
    assert tuple(synthetic_clip(2, 1, 1).shape) == (2, 1, 1, 3)


# ----------------------------------------------------------------------------- rotation and sound

TONE_HZ, RATE = 440, 48000


def mux_audio(container, stream, seconds, start=0.0, amplitude=0.3):
    """Encode ``seconds`` of a 440 Hz tone (every channel; ``amplitude`` 0: silence) into ``stream`` from
    ``start`` s, in 1024-sample frames, and flush it."""
    fmt, layout = stream.codec_context.format.name, stream.codec_context.layout.name
    channels = stream.codec_context.layout.nb_channels
    for first in range(0, int(RATE * seconds), 1024):
        tone = (amplitude * np.sin(2 * np.pi * TONE_HZ * (np.arange(1024) + first) / RATE)).astype(np.float32)
        planes = np.stack([tone] * channels)
        data = {"fltp": planes, "s16": (planes.T * 32767).astype(np.int16).reshape(1, -1),
                "s16p": (planes * 32767).astype(np.int16)}[fmt]
        frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
        frame.sample_rate, frame.pts = RATE, first + round(start * RATE)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def mux_frames(container, stream, frames, start=0, convert=None):
    """Encode uint8 RGB ``frames`` (each through ``convert``, a VideoFrame -> VideoFrame) into ``stream`` at
    pts ``start, start + 1, ...`` and flush it."""
    for i, rgb in enumerate(frames.numpy()):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame = convert(frame) if convert else frame
        frame.pts = start + i
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def with_sound(path, frames, fps, audio_codec, *, rotation=0, video_start=0, audio_start=0.0, layout="stereo"):
    """A test source: ``frames`` (libx264) from ``video_start`` frames in, a 440 Hz tone (every channel of
    ``layout``) from ``audio_start`` s for as long as the frames last plus a second, in ``audio_codec``;
    ``rotation`` as its display matrix."""
    container = av.open(str(path), "w")
    video = container.add_stream("libx264", rate=fps)
    video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    if rotation:
        video.set_display_rotation(rotation)
    audio = container.add_stream(audio_codec, rate=RATE, layout=layout)
    mux_frames(container, video, frames, start=video_start)
    mux_audio(container, audio, (video_start + len(frames)) / float(fps) + 1, start=audio_start)
    container.close()
    return path


def audio_packets(path):
    """(seconds, bytes) of each audio packet with data, and the codec's name."""
    with av.open(str(path)) as c:
        if not c.streams.audio:
            return [], None
        stream = c.streams.audio[0]
        out = [(float(p.pts * p.time_base), bytes(p)) for p in c.demux(stream) if p.size and p.pts is not None]
        return out, stream.codec_context.name


def decoded_tone(path):
    """The first audio stream decoded to float mono samples."""
    with av.open(str(path)) as c:
        chunks = [f.to_ndarray().astype(np.float64).reshape(f.layout.nb_channels if f.format.is_planar else 1, -1)
                  for f in c.decode(c.streams.audio[0])]
    samples = np.concatenate([ch[0] for ch in chunks])
    return samples / (32767 if np.abs(samples).max() > 2 else 1)


def test_rotation_round_trip(tmp_path, clip):
    src = with_sound(tmp_path / "portrait.mp4", clip, 24, "aac", rotation=90)
    frames, info = read_video(src)
    assert info.rotation == 90 and frames.shape[1:3] == (H, W)  # as stored, the turn in the tag
    out = tmp_path / "out.mp4"
    with VideoWriter(out, W, H, 24, rotation=info.rotation) as w:
        w.write(frames)
    assert read_video(out)[1].rotation == 90
    write_video(tmp_path / "plain.mp4", clip, 24)
    assert read_video(tmp_path / "plain.mp4")[1].rotation == 0


@pytest.mark.parametrize("keep", [F, 5])
def test_audio_copied_packet_for_packet_and_cut_at_the_video_end(tmp_path, clip, keep):
    """AAC into MP4: the source's packets as they are, those that start before the written video ends
    (all frames, or the first ``keep``); written in chunks, interleaved with the video."""
    src = with_sound(tmp_path / "src.mp4", clip, 24, "aac")
    with VideoWriter(tmp_path / "out.mp4", W, H, 24, audio_from=src) as w:
        w.write(clip[:2])
        w.write(clip[2:keep])
    assert w.audio_streams == ["copied aac"]
    source, codec = audio_packets(src)
    copied, codec_out = audio_packets(tmp_path / "out.mp4")
    end = keep / 24
    assert codec == codec_out == "aac"
    # the encoder's priming packet before 0 s (skipped by the file's edit list) comes along
    assert source[0][0] < 0 and [b for _, b in copied] == [b for t, b in source if t < end]
    assert copied[0][0] == source[0][0] and copied[-1][0] < end <= copied[-1][0] + 1024 / RATE + 1e-9
    frames, _ = read_video(tmp_path / "out.mp4")
    assert frames.shape[0] == keep


def test_audio_timed_from_the_first_video_frame(tmp_path, clip):
    """A source whose video starts half a second after its sound: the copy starts where the video does."""
    src = with_sound(tmp_path / "late.mp4", clip, 24, "aac", video_start=12)
    with VideoWriter(tmp_path / "out.mp4", W, H, 24, audio_from=src) as w:
        w.write(clip)
    source, _ = audio_packets(src)
    copied, _ = audio_packets(tmp_path / "out.mp4")
    lead = -source[0][0]  # as much before the video's start as the source's own priming
    kept = [(t, b) for t, b in source if -lead <= t - 0.5 < F / 24]
    assert [b for _, b in copied] == [b for _, b in kept] and kept[0][0] < 0.5
    assert abs(copied[0][0] - (kept[0][0] - 0.5)) < 1e-3


def test_audio_reencoded_where_the_container_cannot_hold_it(tmp_path, clip):
    """PCM from Matroska into MP4 (which FFmpeg refuses only when it finishes the file): AAC instead,
    the same tone; into Matroska it is copied."""
    src = with_sound(tmp_path / "src.mkv", clip, 24, "pcm_s16le")
    with VideoWriter(tmp_path / "out.mp4", W, H, 24, audio_from=src) as w:
        w.write(clip)
    assert w.audio_streams == ["re-encoded pcm_s16le to aac"]
    assert audio_packets(tmp_path / "out.mp4")[1] == "aac"
    tone = decoded_tone(tmp_path / "out.mp4")
    assert abs(len(tone) / RATE - F / 24) < 0.05
    spectrum = np.abs(np.fft.rfft(tone[2048:]))
    assert abs(np.argmax(spectrum) * RATE / (len(tone) - 2048) - TONE_HZ) < 10
    assert 0.15 < np.sqrt(np.mean(tone[2048:] ** 2)) < 0.27  # 0.3 / sqrt(2), give or take the codec
    with VideoWriter(tmp_path / "out.mkv", W, H, 24, audio_from=src) as w:
        w.write(clip)
    assert w.audio_streams == ["copied pcm_s16le"]


def test_no_audio_in_the_source(tmp_path, clip):
    write_video(tmp_path / "silent.mp4", clip, 24)
    with VideoWriter(tmp_path / "out.mp4", W, H, 24, audio_from=tmp_path / "silent.mp4") as w:
        w.write(clip)
    assert w.audio_streams == [] and audio_packets(tmp_path / "out.mp4") == ([], None)


def variable_rate_source(path, frames, with_audio=True):
    """Frames at 30 fps, then at 20 fps (a phone slowing down in low light), on a 1/90000 s clock, with
    the test tone."""
    container = av.open(str(path), "w")
    video = container.add_stream("libx264", rate=30)
    video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    video.time_base = video.codec_context.time_base = Fraction(1, 90000)
    t, times = 0, []
    for i, rgb in enumerate(frames.numpy()):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = t, video.time_base
        times.append(Fraction(t, 90000))
        for packet in video.encode(frame):
            container.mux(packet)
        t += 3000 if i < len(frames) // 2 else 4500
    for packet in video.encode(None):
        container.mux(packet)
    container.close()
    if with_audio:  # the tone muxed in afterwards: a copy of the file with an AAC stream
        tone = with_sound(path.with_name("tone.mp4"), frames[:1], 1, "aac")
        joined = path.with_name("joined" + path.suffix)
        with av.open(str(path)) as v, av.open(str(tone)) as a, av.open(str(joined), "w") as out:
            vo, ao = out.add_stream_from_template(v.streams.video[0]), out.add_stream_from_template(a.streams.audio[0])
            for packet in v.demux(v.streams.video[0]):
                if packet.size:
                    packet.stream = vo
                    out.mux(packet)
            for packet in a.demux(a.streams.audio[0]):
                if packet.size:
                    packet.stream = ao
                    out.mux(packet)
        joined.replace(path)
    return path, times


def frame_times(path):
    with av.open(str(path)) as c:
        return [float(f.time) for f in c.decode(c.streams.video[0])]


def test_variable_rate_timing_kept(tmp_path, clip):
    """A clip at 30 then 20 fps: read, the times are the source's; written with them,
    the frames keep those times and the copied sound ends where the video does; at constant rate
    (``k / fps``) the times change nothing; AVI cannot hold them (a warning, ``fps``)."""
    src, times = variable_rate_source(tmp_path / "vfr.mp4", synthetic_clip(12, H, W))
    frames, info = read_video(src)
    # FFmpeg's guess of the rate is 60 (the rate of the clock both steps fit): written at it without
    # the times, the clip would play in 0.2 s instead of 0.5
    assert info.fps == 60 and info.frame_times == tuple(times)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, W, H, info.fps, frame_times=info.frame_times, audio_from=src) as w:
        w.write(frames[:5])
        w.write(frames[5:])
    np.testing.assert_allclose(frame_times(out), [float(t) for t in times], atol=1e-4)
    copied, _ = audio_packets(out)
    end = float(times[-1]) + 1 / 20  # the last frame lasts as long as the step before it
    assert copied[-1][0] < end <= copied[-1][0] + 1024 / RATE + 1e-9
    # constant rate: the frame times are k / fps, and the file is what it is without them
    for name, times_given in (("cfr.mp4", [Fraction(k, 30) for k in range(F)]), ("plain.mp4", None)):
        with VideoWriter(tmp_path / name, W, H, 30, frame_times=times_given) as w:
            w.write(clip)
    with av.open(str(tmp_path / "cfr.mp4")) as a, av.open(str(tmp_path / "plain.mp4")) as b:
        assert a.streams.video[0].time_base == b.streams.video[0].time_base
    np.testing.assert_allclose(frame_times(tmp_path / "cfr.mp4"), [k / 30 for k in range(F)], atol=1e-4)
    with pytest.warns(RuntimeWarning, match="constant frame rate only"):
        with VideoWriter(tmp_path / "out.avi", W, H, 30, codec="mpeg4", frame_times=info.frame_times) as w:
            w.write(frames)
    np.testing.assert_allclose(frame_times(tmp_path / "out.avi"), [k / 30 for k in range(12)], atol=1e-4)
    with pytest.raises(VideoError, match="frame_times must increase"):
        VideoWriter(tmp_path / "bad.mp4", W, H, 30, frame_times=[0, 0.1, 0.1])


def first_sound(path):
    """Seconds from the first video frame to the first audible sample of the first audio stream."""
    with av.open(str(path)) as c:
        v0 = next(c.decode(c.streams.video[0])).time
    with av.open(str(path)) as c:
        for f in c.decode(c.streams.audio[0]):
            x = f.to_ndarray()
            x = x[0] if f.format.is_planar else x[0][::f.layout.nb_channels]
            loud = np.nonzero(np.abs(x.astype(np.float64)) > (0.05 * 32767 if x.dtype == np.int16 else 0.05))[0]
            if len(loud):
                return f.time + loud[0] / f.sample_rate - v0
    return None


def test_reencoded_sound_keeps_its_time_and_channels(tmp_path, clip):
    """Re-encoded to AAC, sound that starts half a second after the picture still does (the frames at
    their own times, the encoder's priming trimmed); 7.1 keeps its 8 channels (PyAV's planar 8-channel
    frames crash when written plane by plane)."""
    second = synthetic_clip(24, H, W)  # 1 s of video, the sound from 0.5 s
    src = with_sound(tmp_path / "late.mkv", second, 24, "pcm_s16le", audio_start=0.5)
    with VideoWriter(tmp_path / "out.mp4", W, H, 24, audio_from=src) as w:
        w.write(second)
    assert w.audio_streams == ["re-encoded pcm_s16le to aac"]
    assert first_sound(src) == pytest.approx(0.5, abs=1e-3)
    assert first_sound(tmp_path / "out.mp4") == pytest.approx(0.5, abs=2e-3)
    src = with_sound(tmp_path / "wide.mkv", clip, 24, "pcm_s16le", layout="7.1")
    with VideoWriter(tmp_path / "wide.mp4", W, H, 24, audio_from=src) as w:
        w.write(clip)
    with av.open(str(tmp_path / "wide.mp4")) as c:
        assert c.streams.audio[0].codec_context.name == "aac"
        assert c.streams.audio[0].codec_context.layout.name == "7.1"


def test_sound_into_mpeg_ts_is_playable(tmp_path, clip):
    """MPEG-TS takes any codec as a data stream no player reads: PCM goes in as AAC instead."""
    src = with_sound(tmp_path / "src.mkv", clip, 24, "pcm_s16le")
    with VideoWriter(tmp_path / "out.ts", W, H, 24, audio_from=src) as w:
        w.write(clip)
    assert w.audio_streams == ["re-encoded pcm_s16le to aac"]
    with av.open(str(tmp_path / "out.ts")) as c:
        assert [st.type for st in c.streams] == ["video", "audio"]


def test_damaged_sound_packet_is_left_out(tmp_path, clip):
    """One undecodable packet on the re-encode path: a warning, the rest of the sound, the whole video."""
    good = with_sound(tmp_path / "good.mkv", clip, 24, "flac")
    bad = tmp_path / "bad.mkv"
    with av.open(str(good)) as i, av.open(str(bad), "w") as o:
        outs = {st.index: o.add_stream_from_template(st) for st in i.streams}
        k = 0
        for packet in i.demux():
            if not packet.size:
                continue
            if packet.stream.type == "audio":
                k += 1
                if k == 2:
                    garbage = av.Packet(bytes(np.random.default_rng(0).integers(0, 256, packet.size, dtype=np.uint8)))
                    garbage.pts, garbage.dts, garbage.time_base = packet.pts, packet.dts, packet.time_base
                    packet = garbage
            packet.stream = outs[packet.stream.index if packet.stream is not None else 1]
            o.mux(packet)
    with pytest.warns(RuntimeWarning, match="could not be decoded"):
        with VideoWriter(tmp_path / "out.mov", W, H, 24, audio_from=bad) as w:
            w.write(clip)
    assert w.audio_streams == ["re-encoded flac to aac"]
    assert read_video(tmp_path / "out.mov")[0].shape[0] == F and audio_packets(tmp_path / "out.mov")[0]


def test_sound_and_an_existing_file(tmp_path, clip):
    """No frames written: an existing file stays as it was (no sound muxed before the first frame);
    the sound's own file is refused as the output."""
    src = with_sound(tmp_path / "src.mp4", clip, 24, "aac")
    keep = tmp_path / "keep.mp4"
    write_video(keep, clip[:2], 24)
    before = keep.read_bytes()
    w = VideoWriter(keep, W, H, 24, audio_from=src)
    w.write(clip[:0])
    with pytest.raises(VideoError, match="no frames were written"):
        w.close()
    assert keep.read_bytes() == before
    with pytest.raises(VideoError, match="is the file the sound is copied from"):
        VideoWriter(src, W, H, 24, audio_from=src)


def hdr_source(path, frames):
    """A 10-bit HLG clip as phones record it: BT.2020 primaries and matrix, the HLG curve."""
    container = av.open(str(path), "w")
    video = container.add_stream("libx264", rate=24)
    video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p10le"
    video.options = {"crf": "0"}  # lossless: what is left of the error is the matrix and 4:2:0
    cc = video.codec_context
    cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range = 9, 18, 9, 1
    mux_frames(container, video, frames, convert=lambda f: f.reformat(format="yuv420p10le", dst_colorspace="BT2020"))
    container.close()
    return path


def test_primaries_and_curve_tags_round_trip(tmp_path, clip):
    """An HLG clip's primaries and curve are read and written as tags (the RGB values as they are);
    mpeg4 cannot carry them (a warning)."""
    src = hdr_source(tmp_path / "hlg.mp4", clip)
    info = probe_video(src)
    assert (info.color_primaries, info.color_trc, info.colorspace) == ("bt2020", "arib-std-b67", "bt2020nc")
    frames, info = read_video(src)
    assert (info.color_primaries, info.color_trc) == ("bt2020", "arib-std-b67")
    assert frame_mae(frames, clip).max() < MAE_420  # BT.2020 matrix honoured on reading
    out = tmp_path / "out.mp4"
    write_video(out, frames, 24, color_primaries=info.color_primaries, color_trc=info.color_trc)
    back = probe_video(out)
    assert (back.color_primaries, back.color_trc, back.colorspace) == ("bt2020", "arib-std-b67", "bt709")
    assert probe_video(tmp_path / "hlg.mp4").color_trc == "arib-std-b67"
    write_video(tmp_path / "plain.mp4", clip, 24)
    assert (probe_video(tmp_path / "plain.mp4").color_primaries, probe_video(tmp_path / "plain.mp4").color_trc) == (
        None, None)
    with pytest.warns(RuntimeWarning, match="cannot signal"):
        write_video(tmp_path / "old.avi", clip, 24, codec="mpeg4", color_trc="smpte2084")


def test_pixel_shape_colons_and_early_checks(tmp_path, clip, monkeypatch):
    """A DVD's non-square pixels (SAR 32:27) are read and written; a name with a colon is a file, not
    an FFmpeg protocol; check_writable refuses what would fail only when the file is finished (Ogg or
    Y4M with H.264) or cannot start (GIF, an unknown type, a read-only folder), and creates nothing."""
    from oasis.video import check_writable

    dvd = tmp_path / "10:30 dvd.mp4"
    write_video(dvd, clip, 25, sample_aspect_ratio=Fraction(32, 27))
    frames, info = read_video(dvd)
    assert probe_video(dvd).sample_aspect_ratio == info.sample_aspect_ratio == Fraction(32, 27)
    write_video(tmp_path / "square.mp4", clip, 25)
    assert probe_video(tmp_path / "square.mp4").sample_aspect_ratio is None
    check_writable(tmp_path / "ok.mp4", W, H, 25)
    check_writable(tmp_path / "ok.webm", W, H, 25)  # VP9 by default for WebM
    for name, match in (("a.ogv", "cannot be written with libx264"), ("a.y4m", "cannot be written with libx264"),
                        ("a.gif", "cannot start the libx264 encoder"), ("a.xyz", "cannot write this file type")):
        with pytest.raises(VideoError, match=match):
            check_writable(tmp_path / name, W, H, 25)
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # the folder as a user without write permission sees it (tests may run as root)
    monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode) and str(path) != str(locked))
    with pytest.raises(VideoError, match="is not writable"):
        check_writable(locked / "out.mp4", W, H, 25)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10:30 dvd.mp4", "locked", "square.mp4"]
    with VideoWriter(tmp_path / "out.webm", W, H, 25) as w:
        w.write(clip)
    assert w.codec == "libvpx-vp9" and read_video(tmp_path / "out.webm")[0].shape[0] == F


def rich_source(path, frames):
    """A film-like source: title, comment, creation time, a video language, a Japanese AAC track and two
    chapters (the second from the clip's middle)."""
    container = av.open(str(path), "w")
    container.metadata.update(title="My film", comment="a comment", creation_time="2024-01-01T10:30:00.000000Z")
    video = container.add_stream("libx264", rate=24)
    video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    video.metadata["language"] = "eng"
    audio = container.add_stream("aac", rate=RATE, layout="stereo")
    audio.metadata.update(language="jpn", title="Japanese")
    n = len(frames)
    container.set_chapters([
        {"id": 1, "start": 0, "end": n // 2, "time_base": Fraction(1, 24), "metadata": {"title": "One"}},
        {"id": 2, "start": n // 2, "end": n, "time_base": Fraction(1, 24), "metadata": {"title": "Two"}}])
    mux_frames(container, video, frames)
    mux_audio(container, audio, n / 24, amplitude=0)  # what matters here is the track's names
    container.close()
    return path


@pytest.mark.parametrize("ext", ["mkv", "mp4"])
def test_tags_chapters_and_track_names_copied(tmp_path, ext):
    """metadata_from: the file's tags (not the muxer's own), the video's language, the chapters that start
    before the written video ends (cut there); the copied sound keeps its language and title."""
    frames = synthetic_clip(24, H, W)
    src = rich_source(tmp_path / f"film.{ext}", frames)
    _, info = read_video(src, max_frames=9)  # the first 9 frames: chapter two (from frame 12) is left out
    out = tmp_path / f"out.{ext}"
    with VideoWriter(out, W, H, 24, metadata_from=src, audio_from=src, frame_times=info.frame_times) as w:
        w.write(frames[:9])
    with av.open(str(out)) as c:
        tags = {k.lower(): v for k, v in c.metadata.items()}
        assert (tags["title"], tags["comment"], tags["creation_time"][:19]) == ("My film", "a comment",
                                                                                 "2024-01-01T10:30:00")
        assert c.streams.video[0].metadata["language"] == "eng"
        chapters = c.chapters()
        assert [ch["metadata"]["title"] for ch in chapters] == ["One"]
        assert float(chapters[0]["end"] * chapters[0]["time_base"]) == pytest.approx(9 / 24, abs=2e-3)
        audio = c.streams.audio[0].metadata
        assert audio["language"] == "jpn"
        if ext == "mkv":  # (MP4 keeps no track titles)
            assert audio["title"] == "Japanese"


def test_streams_left_out_are_named(tmp_path, clip):
    """Subtitles (an SRT track muxed into Matroska) and a MOV's timecode track are what the writer does not
    carry over; an MP4's chapter track is not counted (its chapters are copied)."""
    from oasis.video import streams_left_out

    srt = tmp_path / "subs.srt"
    srt.write_text("1\n00:00:00,000 --> 00:00:00,300\nHello\n\n2\n00:00:00,300 --> 00:00:00,600\nWorld\n")
    write_video(tmp_path / "plain.mkv", clip, 24)
    with av.open(str(tmp_path / "plain.mkv")) as v, av.open(str(srt)) as s, \
            av.open(str(tmp_path / "subbed.mkv"), "w") as out:
        vo, so = out.add_stream_from_template(v.streams.video[0]), out.add_stream_from_template(s.streams.subtitles[0])
        for src, dst in ((v, vo), (s, so)):
            for packet in src.demux(src.streams[0]):
                if packet.size:
                    packet.stream = dst
                    out.mux(packet)
    assert streams_left_out(tmp_path / "subbed.mkv") == ["subtitle"]
    with av.open(str(tmp_path / "tc.mov"), "w") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.metadata["timecode"] = "01:00:00:00"
        mux_frames(out, stream, clip)
    assert streams_left_out(tmp_path / "tc.mov") == ["timecode"]
    assert streams_left_out(rich_source(tmp_path / "film.mp4", clip)) == []


def test_chapters_on_the_output_clock_and_tags_only_where_taken(tmp_path):
    """Chapters move with the video's start (a source whose picture starts at 1 s: its chapter from 1.5 s
    starts at 0.5 s of the output, as the sound does); MPEG-TS gets no tags copied (some fail it only
    when the file is finished), and is written."""
    frames = synthetic_clip(24, H, W)
    src = tmp_path / "late.mkv"
    with av.open(str(src), "w") as container:
        container.metadata["title"] = "t" * 300
        video = container.add_stream("libx264", rate=24)
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        container.set_chapters([
            {"id": 1, "start": 0, "end": 36, "time_base": Fraction(1, 24), "metadata": {"title": "Intro"}},
            {"id": 2, "start": 36, "end": 72, "time_base": Fraction(1, 24), "metadata": {"title": "Scene"}}])
        mux_frames(container, video, frames, start=24)
    _, info = read_video(src)
    with VideoWriter(tmp_path / "out.mkv", W, H, 24, metadata_from=src, frame_times=info.frame_times) as w:
        w.write(frames)
    with av.open(str(tmp_path / "out.mkv")) as c:
        got = [(ch["metadata"]["title"], float(ch["start"] * ch["time_base"]), float(ch["end"] * ch["time_base"]))
               for ch in c.chapters()]
    ms = dict(abs=2e-3)  # (Matroska keeps milliseconds)
    assert got == [("Intro", 0.0, pytest.approx(0.5, **ms)),
                   ("Scene", pytest.approx(0.5, **ms), pytest.approx(1.0, **ms))]
    with VideoWriter(tmp_path / "out.ts", W, H, 24, metadata_from=src, frame_times=info.frame_times) as w:
        w.write(frames)
    assert read_video(tmp_path / "out.ts")[0].shape[0] == 24


def test_sound_into_webm_becomes_opus(tmp_path, clip):
    """WebM holds Opus or Vorbis, not AAC: a source's AAC at 44.1 kHz is re-encoded to Opus (48 kHz,
    resampled), at its time."""
    src = tmp_path / "src.mp4"
    with av.open(str(src), "w") as container:
        video = container.add_stream("libx264", rate=24)
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        audio = container.add_stream("aac", rate=44100, layout="stereo")
        mux_frames(container, video, synthetic_clip(24, H, W))
        mux_audio(container, audio, 1.5, start=0.5)
    with VideoWriter(tmp_path / "out.webm", W, H, 24, audio_from=src) as w:
        w.write(synthetic_clip(24, H, W))
    assert w.audio_streams == ["re-encoded aac to opus"]
    with av.open(str(tmp_path / "out.webm")) as c:
        assert c.streams.audio[0].codec_context.name == "opus"
    assert first_sound(tmp_path / "out.webm") == pytest.approx(0.5, abs=5e-3)


# ----------------------------------------------------------------------------- streamed reading


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """A 40-frame H.264 file with B-frames (frames decode out of order), and its frames as read whole."""
    from oasis.video import read_video

    path = tmp_path_factory.mktemp("stream") / "long.mp4"
    write_video(path, synthetic_clip(40, 32, 48), 24, crf=20)
    return path, *read_video(path)


def test_streamed_frames_are_read_videos(long_clip):
    """Every slice the pipeline asks for (overlapping chunks, the same chunk once per tile, a jump past
    the kept frames), then one that goes back (decoded from the start again), int and negative indices:
    the same numbers as ``read_video``, and its metadata."""
    from oasis.video import VideoFrames

    path, whole, info = long_clip
    with VideoFrames(path, prefetch=3) as frames:
        assert frames.info == info and frames.shape == whole.shape and len(frames) == 40
        for a, b in [(0, 9), (0, 9), (5, 14), (10, 19), (30, 35), (33, 40), (2, 4), (0, 40), (39, 50)]:
            assert torch.equal(frames[a:b], whole[a:b]), (a, b)
        assert torch.equal(frames[-1], whole[-1]) and torch.equal(frames[7], whole[7])
        assert frames[10:5].shape == (0, 32, 48, 3)
        with pytest.raises(IndexError):
            frames[40]
        with pytest.raises(ValueError, match="step"):
            frames[::2]
        with pytest.raises(TypeError):
            frames["1"]
    with VideoFrames(path, max_frames=7) as first:
        assert len(first) == first.info.num_frames == 7 and torch.equal(first[:], whole[:7])
        assert first.info.frame_times == info.frame_times[:7]


def test_streamed_frames_hold_a_window(long_clip):
    """Only the frames from the last slice's start are kept, and the decoding thread runs at most
    ``prefetch`` frames ahead: a long clip never sits in memory."""
    import time

    from oasis.video import VideoFrames

    path, whole, _ = long_clip
    frames = VideoFrames(path, prefetch=2)
    frames[0:9]
    frames[20:29]
    assert len(frames._kept) == 9
    time.sleep(0.3)  # the thread fills the queue, and stops there
    assert frames._queue.qsize() <= 2
    thread = frames._thread
    frames.close()
    assert not thread.is_alive() and frames._kept == []
    with pytest.raises(VideoError, match="after close"):
        frames[0:1]
    # an empty slice decodes nothing; a reader dropped unclosed stops its thread (which holds no reference to it)
    frames = VideoFrames(path, prefetch=2)
    assert frames[40:40].shape == (0, 32, 48, 3) and frames[9:3].shape[0] == 0 and frames._thread is None
    frames[0:1]
    thread = frames._thread
    del frames
    import gc

    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_streamed_frames_say_when_the_second_decoding_differs(long_clip, monkeypatch):
    """A reading that gives fewer frames than the opening pass counted, or fails: a VideoError naming the
    file, from the reader's call (not a hang, not a short clip)."""
    from oasis import video as video_module

    path, _, _ = long_clip
    frames = video_module.VideoFrames(path, prefetch=2)
    real = video_module._decoded

    def fewer(container, stream, p, max_frames):
        yield from real(container, stream, p, 3)

    monkeypatch.setattr(video_module, "_decoded", fewer)
    with pytest.raises(VideoError, match="ended at frame 3"):
        frames[0:10]

    def failing(container, stream, p, max_frames):
        yield next(real(container, stream, p, 1))
        raise VideoError(f"{p}: decoding failed after 1 frames (Invalid data)")

    monkeypatch.setattr(video_module, "_decoded", failing)
    with pytest.raises(VideoError, match="decoding failed after 1 frames"):
        frames[0:10]
    # once the file reads again, so does the reader: from where it stood, the frames before dropped again
    monkeypatch.undo()
    path, whole, _ = long_clip
    assert torch.equal(frames[0:10], whole[0:10]) and torch.equal(frames[5:12], whole[5:12])
    frames.close()


def test_streamed_frames_refuse_bad_files(tmp_path):
    from oasis.video import VideoFrames

    with pytest.raises(VideoError, match="no such file"):
        VideoFrames(tmp_path / "none.mp4")
    (tmp_path / "x.mp4").write_text("not a video")
    with pytest.raises(VideoError, match="not a readable video"):
        VideoFrames(tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="prefetch"):
        VideoFrames(tmp_path / "x.mp4", prefetch=0)


# ----------------------------------------------------------------------------- more than 8 bits


def ramp_clip(frames=3, height=16, width=256):
    """uint16 frames whose rows run through 0..65535: 256 columns hold 256 distinct 10-bit levels."""
    ramp = np.linspace(0, 65535, width)[None, :, None].repeat(height, 0).repeat(3, 2)
    return torch.from_numpy(np.stack([ramp * (0.6 + 0.1 * k) for k in range(frames)]).round().astype(np.uint16))


@pytest.mark.parametrize("codec", ["libx265", "libx264"])
def test_ten_bits_round_trip(tmp_path, codec):
    """uint16 frames written at 10 bits read back with ``bits=16`` keep their gradations (a row of 256
    columns: 256 levels, where 8 bits hold ~150 of them), to within the 10-bit YUV rounding (HEVC in
    Matroska: FFmpeg's MP4 muxer fails at random on libx265's headers, docs/OASIS.md)."""
    from oasis.video import VideoFrames

    if codec not in av.codecs_available:
        pytest.skip(f"no {codec} in this PyAV")
    frames = ramp_clip()
    path = tmp_path / ("deep.mkv" if codec == "libx265" else "deep.mp4")
    with VideoWriter(path, 256, 16, 24, codec=codec, pix_fmt="yuv420p10le", crf=0) as out:
        out.write(frames)
    assert probe_video(path).bits == 10
    deep, info = read_video(path, bits=16)
    assert deep.dtype == torch.uint16 and info.bits == 10
    err = (deep.int() - frames.int()).abs()
    assert err.float().mean() < 40 and err.max() < 256, (err.float().mean(), err.max())  # a 10-bit step is 64
    assert len(np.unique(deep[1, 8, :, 1].numpy())) > 240
    assert len(np.unique(read_video(path)[0][1, 8, :, 1].numpy())) < 200  # what 8 bits keep of the same row
    with VideoFrames(path, bits=16) as streamed:
        assert streamed.dtype == torch.uint16 and torch.equal(streamed[0:3], deep)
    with pytest.raises(ValueError, match="bits must be 8"):
        read_video(path, bits=10)
    if codec == "libx265":
        with pytest.warns(RuntimeWarning, match="fails at random"):
            VideoWriter(tmp_path / "hevc.mp4", 64, 64, 24, codec=codec)._abort()


def test_eight_bit_sources_say_eight(tmp_path, clip):
    path = tmp_path / "a.mp4"
    write_video(path, clip, 24)
    assert probe_video(path).bits == 8 and read_video(path)[1].bits == 8


def test_sixteen_bit_levels_are_ffmpeg_s(tmp_path, clip):
    """16-bit frames are FFmpeg's scale, 256 x the 8-bit level: a smooth 8-bit 4:2:0 clip read as 16 bits is
    its source to within half a level on average (swscale's default: 1.7 levels dark); a white of 65280
    is written as 10-bit video's white, 940, and reads back as 255 at 8 bits (swscale's default: 253)."""
    y, x = np.mgrid[0:64, 0:96]
    smooth = torch.from_numpy(np.stack([np.stack([x * 2.5, y * 3.5, (x + y) * 1.5], -1).clip(0, 255)] * 2)
                              .astype(np.uint8))
    path = tmp_path / "eight.mkv"
    write_video(path, smooth, 24, crf=0)
    deep, _ = read_video(path, bits=16)
    bias = (deep.double() / 256 - smooth.double()).mean()
    assert abs(bias) < 0.5, bias
    white = tmp_path / "white.mkv"
    frames = torch.full((2, 16, 16, 3), 65280, dtype=torch.int32).to(torch.uint16)
    with VideoWriter(white, 16, 16, 24, pix_fmt="yuv420p10le", crf=0) as out:
        out.write(frames)
    with av.open(str(white)) as c:
        luma = np.frombuffer(bytes(next(c.decode(video=0)).planes[0]), "<u2")
    assert set(luma[:16].tolist()) == {940}
    assert read_video(white)[0].int().min() == 255 and (read_video(white, bits=16)[0].int() - 65280).abs().max() <= 8
    if "libsvtav1" in av.codecs_available:  # its crf 0 means "unset" (35): the finest, 1, instead
        writer = VideoWriter(tmp_path / "a.webm", 16, 16, 24, codec="libsvtav1", pix_fmt="yuv420p10le", crf=0)
        assert writer._options["crf"] == "1"
        writer._abort()


@pytest.mark.skipif("libsvtav1" not in av.codecs_available, reason="no SVT-AV1 in this PyAV")
def test_svt_av1_writes_quietly(tmp_path, capfd, monkeypatch):
    """SVT-AV1 prints a page of its settings per encoder on the process's stderr unless told its log
    level: the writer tells it errors only (a user's own SVT_LOG is kept)."""
    monkeypatch.delenv("SVT_LOG", raising=False)
    with VideoWriter(tmp_path / "a.webm", 16, 16, 24, codec="libsvtav1") as out:
        out.write(torch.zeros((2, 16, 16, 3), dtype=torch.uint8))
    assert "Svt[info]" not in capfd.readouterr().err
    monkeypatch.setenv("SVT_LOG", "3")
    VideoWriter(tmp_path / "b.webm", 16, 16, 24, codec="libsvtav1")._abort()
    assert os.environ["SVT_LOG"] == "3"
