"""Video file input/output for the video super-resolution CLI (``oasis-vsr IN.mp4 -o OUT.mp4``).

Frames travel as uint8 RGB tensors ``[F, H, W, 3]`` (frames, height, width, channels).

* :func:`probe_video` reads metadata only, to validate an input before long work starts.
* :func:`read_video` decodes a whole clip (or its first frames) into one tensor.
* :class:`VideoFrames` decodes the frames asked for, a window at a time: long clips in bounded memory.
* :class:`VideoWriter` encodes chunk by chunk, so an upscaled clip never has to sit in memory
  at once; :func:`write_video` is the one-shot form.
* :func:`synthetic_clip` makes a deterministic moving test clip (no file needed).

Every bad input raises :class:`VideoError` (a ``ValueError``) with a one-line message that
names the path and the problem; a wrong frame dtype or type raises ``TypeError``.

PyAV (``pip install av``) is imported on first use, so ``synthetic_clip`` works without it.

Colour handling
---------------
* Reading: ``frame.to_ndarray(format="rgb24")`` honours each frame's matrix and range tags;
  untagged YUV is taken as BT.601 limited ("tv") range, FFmpeg's convention.
* Writing: for encoders whose bitstream signals colour (:data:`COLOUR_SIGNALLING_CODECS`:
  libx264, libx265, libvpx-vp9, libsvtav1, libaom-av1) the writer converts RGB with the
  requested matrix (default BT.709) and range (default "tv") and tags the stream, so
  ``probe_video`` and any player see the same range (``color_range="pc"`` round-trips).
  Other encoders, among them the ``mpeg4`` fallback, cannot carry the range (FFmpeg's
  mpeg4 and mpeg2video encoders drop it), so the writer stores BT.601 "tv" untagged, which
  is what decoders assume, and warns if "pc" was asked for: the pixels stay right, only
  the range differs from the input.
* Primaries and transfer curve (:attr:`VideoInfo.color_primaries`, :attr:`VideoInfo.color_trc`) are
  tags only: the RGB values are read and written as they are, and the same encoders tag them, so an
  HDR (HLG or PQ, BT.2020) phone clip keeps what tells a player how to show it.
* Bits: frames are uint8 by default; ``bits=16`` reads uint16 frames, which keep a 10- or 12-bit
  source's precision (:attr:`VideoInfo.bits`), on FFmpeg's 16-bit scale: 256 x the 8-bit level, a
  limited-range white at 65280 (a full-range 10-bit white reads 65472, as swscale gives it); :class:`VideoWriter` takes uint16 frames too,
  written at 10 bits with a 10-bit ``pix_fmt`` (``yuv420p10le``: libx265, libx264, libsvtav1; this
  PyAV's libvpx-vp9 has none).

Timing, rotation, tags and sound
--------------------------------
* Timing: :func:`read_video` records each frame's time (:attr:`VideoInfo.frame_times`); given
  them, :class:`VideoWriter` writes a variable-rate clip's frames at those times instead of at a
  constant ``fps`` (FFmpeg's guess of a variable clip's rate is the rate of a clock its steps fit,
  60 for a clip at 30 then 20 fps: at that rate it would play in 40% of its time).
* Rotation (the display matrix phones write): frames are read as stored and
  :attr:`VideoInfo.rotation` says how a player turns them; :class:`VideoWriter` writes the same
  tag (``rotation=``), so an upscaled portrait clip plays upright as its source did.
* Tags: ``VideoWriter(..., metadata_from=SOURCE)`` copies the file's tags (title, creation time,
  comment; not the muxer's own), the video's language and title and the chapters (cut where the
  written video ends); :func:`streams_left_out` names what is not carried over (subtitles,
  timecode tracks).
* Sound: ``VideoWriter(..., audio_from=SOURCE)`` copies the source's audio streams into the
  output, packet for packet, cut where the written video ends (``--max-frames``; to the packet) and
  timed from the source's first video frame (one packet before it kept: an encoder's priming); a
  codec the output container cannot hold (tried on a scratch file read back: PCM in MP4, anything
  but AAC/MP2/AC-3... in MPEG-TS) is re-encoded to AAC (Opus where AAC cannot go: WebM), each
  decoded frame at its own time, in the source's channel layout; one that cannot be either is left
  out with a warning, and so is a packet that does not decode. The file the sound comes from cannot be the output (``oasis-vsr``
  writing over its input writes beside it, then replaces it).
"""

from __future__ import annotations

import math
import numbers
import os
import queue
import threading
import warnings
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import torch

__all__ = [
    "COLOUR_SIGNALLING_CODECS",
    "VideoError",
    "VideoFrames",
    "VideoInfo",
    "VideoWriter",
    "VIDEO_EXTENSIONS",
    "check_writable",
    "probe_video",
    "streams_left_out",
    "read_video",
    "synthetic_clip",
    "write_video",
]

#: the file types taken as videos where a folder is searched for them (training clips, a folder of clips)
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg",
                    ".wmv", ".flv", ".3gp", ".ogv", ".y4m")

#: encoders verified to carry colour range and matrix in their bitstream through FFmpeg
COLOUR_SIGNALLING_CODECS = frozenset({"libx264", "libx265", "libvpx-vp9", "libsvtav1", "libaom-av1"})

# AVColorRange -> name used by ffmpeg's -color_range
_RANGE_NAMES = {1: "tv", 2: "pc"}
_RANGE_CODES = {"tv": 1, "pc": 2}

# AVColorSpace -> av_color_space_name(); 2 (unspecified) and 3 (reserved) read as None
_COLORSPACE_NAMES = {
    0: "gbr",
    1: "bt709",
    4: "fcc",
    5: "bt470bg",
    6: "smpte170m",
    7: "smpte240m",
    8: "ycgco",
    9: "bt2020nc",
    10: "bt2020c",
    11: "smpte2085",
    12: "chroma-derived-nc",
    13: "chroma-derived-c",
    14: "ictcp",
}

# AVColorPrimaries and AVColorTransferCharacteristic -> FFmpeg's names (2, unspecified, reads as None):
# what a player needs to show the RGB values right (BT.2020 primaries and the HLG or PQ curve of an
# HDR phone clip look washed out read as BT.709)
_PRIMARIES_NAMES = {1: "bt709", 4: "bt470m", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "film", 9: "bt2020",
                    10: "smpte428", 11: "smpte431", 12: "smpte432", 22: "ebu3213"}
_TRC_NAMES = {1: "bt709", 4: "gamma22", 5: "gamma28", 6: "smpte170m", 7: "smpte240m", 8: "linear", 9: "log100",
              10: "log316", 11: "iec61966-2-4", 12: "bt1361e", 13: "iec61966-2-1", 14: "bt2020-10", 15: "bt2020-12",
              16: "smpte2084", 17: "smpte428", 18: "arib-std-b67"}
_PRIMARIES_CODES = {v: k for k, v in _PRIMARIES_NAMES.items()}
_TRC_CODES = {v: k for k, v in _TRC_NAMES.items()}

# matrices the writer can encode with: name -> (swscale Colorspace member, AVColorSpace tag)
_WRITE_MATRICES = {
    "bt709": ("ITU709", 1),
    "bt470bg": ("ITU601", 5),
    "smpte170m": ("SMPTE170M", 6),
    "smpte240m": ("SMPTE240M", 7),
    "fcc": ("FCC", 4),
    "bt2020nc": ("BT2020", 9),
}
_BT601 = ("bt470bg", "smpte170m")

# 1001 keeps NTSC rates (30000/1001) exact; 1000 keeps decimal rates (23.976 = 2997/125)
_FPS_MAX_DENOMINATOR = 1001 * 1000


class VideoError(ValueError):
    """A video file or frame array that cannot be used; the message names the path and why."""


@dataclass(frozen=True)
class VideoInfo:
    """Metadata of one video stream.

    ``num_frames`` is what the container declares (``None`` when it does not say, e.g.
    Matroska/WebM) for :func:`probe_video`, and the decoded count for :func:`read_video`.
    ``color_range`` is ``"tv"`` (limited), ``"pc"`` (full) or ``None`` (untagged, which
    players treat as "tv"); ``colorspace`` is FFmpeg's matrix name (``"bt709"``,
    ``"smpte170m"``, ...) or ``None`` when untagged.
    """

    path: str
    width: int
    height: int
    fps: Fraction
    num_frames: int | None
    codec: str
    pix_fmt: str
    color_range: str | None
    colorspace: str | None
    #: the colour primaries and transfer curve tags (FFmpeg's names: "bt2020", "arib-std-b67" for HLG,
    #: "smpte2084" for PQ; None untagged)
    color_primaries: str | None = None
    color_trc: str | None = None
    #: the shape of a pixel, width / height (non-square on DVDs and HDV: 32/27, 4/3); None: square or
    #: unsaid
    sample_aspect_ratio: Fraction | None = None
    #: whether the first frame is interlaced, and whether its pixel format has transparency
    #: (:func:`read_video`; frames are read as progressive RGB)
    interlaced: bool = False
    alpha: bool = False
    #: degrees a player turns the stored frames (the display matrix; 0 when absent); known after
    #: :func:`read_video` (from the first frame), 0 from :func:`probe_video`
    rotation: int = 0
    #: each decoded frame's time in seconds from the first one (:func:`read_video`; None from
    #: :func:`probe_video`): a variable-rate clip's own timing, which :class:`VideoWriter` keeps
    frame_times: tuple[Fraction, ...] | None = None
    #: bits per colour component of the stored pictures (10 for most HDR phone clips); read them as
    #: ``bits=16`` frames to keep more than 8
    bits: int = 8


# ----------------------------------------------------------------------------- helpers


def _import_av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - exercised only without PyAV
        raise ImportError("oasis.video needs PyAV for video files: pip install av") from e
    return av


def _reason(err: BaseException) -> str:
    # FFmpeg errors repeat the path in str(); strerror alone keeps the message to one line
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())


def _input_path(path) -> str:
    p = os.fspath(path)
    if not os.path.exists(p):
        raise VideoError(f"{p}: no such file")
    if os.path.isdir(p):
        raise VideoError(f"{p}: is a directory, not a video file")
    return p


def _ffmpeg_name(p: str) -> str:
    """``p`` as FFmpeg is to read it: a local file, even where its name has a colon (FFmpeg would take
    ``10:30.mp4`` for the protocol ``10``)."""
    return "file:" + p if ":" in p else p


def _open_input(p: str):
    av = _import_av()
    try:
        return av.open(_ffmpeg_name(p), mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{p}: not a readable video file ({_reason(e)})") from e


def _picture_streams(container) -> list:
    """The video streams that are moving pictures: cover art in audio files shows up as a one-picture
    "video" stream."""
    attached = _import_av().stream.Disposition.attached_pic
    return [s for s in container.streams.video if not (s.disposition & attached)]


def _video_start(container) -> Fraction:
    """Seconds at which the first picture stream starts (0 without one): the output's zero, to which
    copied sound and chapters are moved."""
    video = _picture_streams(container)
    return Fraction(video[0].start_time * video[0].time_base) if video and video[0].start_time is not None \
        else Fraction(0)


def _video_stream(container, p: str):
    streams = _picture_streams(container)
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoError(f"{p}: no video stream (streams found: {', '.join(kinds)})")
    return streams[0]


def _range_name(code, pix_fmt: str | None) -> str | None:
    name = _RANGE_NAMES.get(int(code or 0))
    # yuvj* formats are full range by definition, tagged or not
    if name is None and pix_fmt and pix_fmt.startswith("yuvj"):
        name = "pc"
    return name


def _stream_info(p: str, stream) -> VideoInfo:
    cc = stream.codec_context
    # guessed_rate is av_guess_frame_rate(), what ffmpeg itself uses for the output rate;
    # average_rate can be off for containers with millisecond timestamps (Matroska)
    fps = stream.guessed_rate or stream.average_rate or stream.base_rate
    if not fps or fps <= 0:
        raise VideoError(f"{p}: the video stream declares no frame rate")
    width, height = int(cc.width or 0), int(cc.height or 0)
    if width <= 0 or height <= 0:
        raise VideoError(f"{p}: the video stream declares no frame size")
    pix_fmt = cc.pix_fmt or (cc.format.name if cc.format is not None else "unknown")
    return VideoInfo(
        path=p,
        width=width,
        height=height,
        fps=Fraction(fps),
        num_frames=int(stream.frames) or None,
        codec=cc.name,
        pix_fmt=pix_fmt,
        color_range=_range_name(cc.color_range, pix_fmt),
        colorspace=_COLORSPACE_NAMES.get(int(cc.colorspace or 2)),
        color_primaries=_PRIMARIES_NAMES.get(int(cc.color_primaries or 2)),
        color_trc=_TRC_NAMES.get(int(cc.color_trc or 2)),
        sample_aspect_ratio=_sar(stream.sample_aspect_ratio or cc.sample_aspect_ratio),
        bits=_component_bits(pix_fmt),
    )


def _component_bits(pix_fmt: str | None) -> int:
    try:
        return max(8, int(_import_av().VideoFormat(pix_fmt).components[0].bits))
    except (ValueError, TypeError, IndexError, AttributeError, _import_av().FFmpegError):
        return 8


def _sar(value) -> Fraction | None:
    sar = Fraction(value) if value else None
    return None if not sar or sar == 1 else sar


def _as_fps(fps, p: str) -> Fraction:
    if isinstance(fps, bool):
        raise VideoError(f"{p}: fps must be a positive number, got {fps!r}")
    try:
        rate = Fraction(fps)
    except (TypeError, ValueError, OverflowError) as e:
        raise VideoError(f"{p}: fps must be a positive number, got {fps!r}") from e
    if rate <= 0 or not math.isfinite(float(rate)):
        raise VideoError(f"{p}: fps must be a positive number, got {fps!r}")
    # a float 29.97002997 becomes 30000/1001 again; encoders reject huge time-base terms
    return rate.limit_denominator(_FPS_MAX_DENOMINATOR)


def _positive_int(value, name: str, exc=ValueError, where: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise exc(f"{where}{name} must be a positive int, got {value!r}")
    return int(value)


def _frames_array(frames, where: str, *, deep: bool = False) -> np.ndarray:
    """Check dtype/rank of ``frames`` (uint8 ``[F, H, W, 3]``; uint16 too where ``deep``) and return them
    as numpy on CPU."""
    kinds = "uint8 RGB in 0..255" + (" (or uint16, white 65280)" if deep else "")
    if isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8 and not (deep and frames.dtype == torch.uint16):
            raise TypeError(f"{where}: frames must be {kinds}, got dtype {frames.dtype}")
        shape = tuple(frames.shape)
    elif isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8 and not (deep and frames.dtype == np.uint16):
            raise TypeError(f"{where}: frames must be {kinds}, got dtype {frames.dtype}")
        shape = frames.shape
    else:
        raise TypeError(
            f"{where}: frames must be a torch.Tensor or numpy.ndarray, got {type(frames).__name__}"
        )
    if len(shape) != 4 or shape[3] != 3:
        raise VideoError(f"{where}: frames must have shape [F, H, W, 3] (RGB), got {list(shape)}")
    if isinstance(frames, torch.Tensor):
        # one device-to-host copy per chunk; numpy() then shares that memory
        return frames.detach().to("cpu").contiguous().numpy()
    return np.ascontiguousarray(frames)


def _bits_format(bits, where: str) -> str:
    """The RGB format frames of ``bits`` (8: uint8, 16: uint16) are read in."""
    if bits not in (8, 16) or isinstance(bits, bool):
        raise ValueError(f"{where}bits must be 8 (uint8 frames) or 16 (uint16), got {bits!r}")
    return "rgb24" if bits == 8 else "rgb48le"


# ----------------------------------------------------------------------------- reading


def probe_video(path) -> VideoInfo:
    """Read the metadata of ``path``'s first video stream without decoding the clip.

    Fast (FFmpeg looks at the headers and at most a few packets), so it suits validating
    an input before long work starts. Raises :class:`VideoError` for a missing file, a
    directory, a file that is not a video or has no video stream.
    """
    p = _input_path(path)
    container = _open_input(p)
    try:
        return _stream_info(p, _video_stream(container, p))
    finally:
        container.close()


def _rgb_array(frame, rgb: str) -> np.ndarray:
    """``frame`` as RGB (``rgb24`` or ``rgb48le``: FFmpeg's 16-bit scale, 256 x the 8-bit level, white 65280).

    Beyond 8 bits, swscale's default rounding is off: it reads a 10-bit white as 253 of 8 bits and an 8-bit
    4:2:0 picture as 16 bits ~1.7 levels dark. Measured against the RGB a lossless 4:2:0 file was made from
    (a gradient, flat grey, saturated rims), 16-bit reads with accurate rounding are within +0.1..+0.4 levels
    on average (its full chroma interpolation breaks them: -24..-35), and 8-bit reads of a deeper source
    with both within +0.1..+0.4 (default: -1.0..-1.8). 8-bit reads of 8-bit pictures keep the default path,
    which every other reader here (training clips, degradations) uses."""
    from av.video.reformatter import Interpolation

    if rgb == "rgb24" and frame.format.components[0].bits <= 8:
        return frame.to_ndarray(format="rgb24")
    flags = Interpolation.BILINEAR | Interpolation.ACCURATE_RND
    if rgb == "rgb24":
        flags |= Interpolation.FULL_CHR_H_INT
    return frame.reformat(format=rgb, interpolation=flags).to_ndarray()


def _decoded(container, stream, p: str, max_frames: int | None):
    """``stream``'s frames in order (the first ``max_frames``); :class:`VideoError` for a decoding
    failure or a frame size that changes mid-stream."""
    av = _import_av()
    first, n = None, 0
    try:
        for frame in container.decode(stream):
            if first is None:
                first = frame
            elif (frame.width, frame.height) != (first.width, first.height):
                raise VideoError(
                    f"{p}: frame size changes mid-stream at frame {n} "
                    f"({first.width}x{first.height} -> {frame.width}x{frame.height})"
                )
            yield frame
            n += 1
            if max_frames is not None and n >= max_frames:
                return
    except av.FFmpegError as e:
        raise VideoError(f"{p}: decoding failed after {n} frames ({_reason(e)})") from e


def _frame_time(frame, index: int, fps: Fraction) -> Fraction:
    return Fraction(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base \
        else Fraction(index) / fps


def _decoded_info(info: VideoInfo, first, times: list) -> VideoInfo:
    """``info`` completed from the decoded frames: their count and times, and what the first one's tags
    say that the stream header did not (they are what ``to_ndarray`` uses)."""
    return replace(
        info,
        width=first.width,
        height=first.height,
        num_frames=len(times),
        color_range=info.color_range or _range_name(first.color_range, first.format.name),
        colorspace=info.colorspace or _COLORSPACE_NAMES.get(int(first.colorspace or 2)),
        color_primaries=info.color_primaries or _PRIMARIES_NAMES.get(int(first.color_primaries or 2)),
        color_trc=info.color_trc or _TRC_NAMES.get(int(first.color_trc or 2)),
        rotation=round(first.rotation or 0) % 360,
        interlaced=bool(first.interlaced_frame),
        alpha=any(c.is_alpha for c in first.format.components),
        frame_times=tuple(t - times[0] for t in times),
    )


def read_video(path, *, max_frames: int | None = None, bits: int = 8) -> tuple[torch.Tensor, VideoInfo]:
    """Decode ``path`` into RGB frames.

    Returns ``(frames, info)``: ``frames`` is uint8 ``[F, H, W, 3]`` on CPU with F the
    number of decoded frames (all, or the first ``max_frames``), and ``info.num_frames``
    is F. Frames come out as stored; ``info.rotation`` is how a player turns them. Raises
    :class:`VideoError` for an unusable file, a clip with zero decodable frames, a
    decoding error or a frame size that changes mid-stream. A long clip is better read with
    :class:`VideoFrames`, which holds only the frames asked for. ``bits=16``: uint16 frames (white 65280),
    which keep a 10- or 12-bit source's precision (:attr:`VideoInfo.bits`).
    """
    if max_frames is not None:
        max_frames = _positive_int(max_frames, "max_frames", where="read_video: ")
    rgb = _bits_format(bits, "read_video: ")
    p = _input_path(path)
    container = _open_input(p)
    frames: list[np.ndarray] = []
    times: list[Fraction] = []
    first = None
    try:
        stream = _video_stream(container, p)
        info = _stream_info(p, stream)
        # frame threading: throughput over latency, the whole clip is wanted anyway
        stream.thread_type = "AUTO"
        for frame in _decoded(container, stream, p, max_frames):
            first = first or frame
            frames.append(_rgb_array(frame, rgb))
            times.append(_frame_time(frame, len(times), info.fps))
    finally:
        container.close()
    if not frames:
        raise VideoError(f"{p}: no frames could be decoded")
    return torch.from_numpy(np.stack(frames)), _decoded_info(info, first, times)


_END = object()  # the decoding thread's last item


def _frame_run(key, n: int, source) -> tuple[int, int | None]:
    """A frame source's ``key`` (an int, or a slice of step 1) of its ``n`` frames: ``(start, stop)``, or
    ``(index, None)`` for an int; IndexError, TypeError or ValueError naming the source's kind."""
    kind = type(source).__name__
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        index = int(key) + n if key < 0 else int(key)
        if not 0 <= index < n:
            raise IndexError(f"frame {key} of {n} ({kind})")
        return index, None
    if not isinstance(key, slice):
        raise TypeError(f"{kind} takes an int or a slice of frames, got {type(key).__name__}")
    start, stop, step = key.indices(n)
    if step != 1:
        raise ValueError(f"{kind} reads runs of frames: slice step must be 1, got {step}")
    return start, max(start, stop)


class VideoFrames:
    """A video file's frames, decoded as they are asked for: ``frames[a:b]`` is uint8 ``[b - a, H, W, 3]``
    on the CPU, the same numbers as :func:`read_video`'s, and only a window of the clip is ever in
    memory, where :func:`read_video` holds all of it (10 minutes of 540p: 28 GB).

    Opening decodes the clip once without converting its pictures (1080p H.264: 266 frames/s on two
    cores, 2.8x the rate of reading them; benchmarks/results/2026-12-05_cpu_e42d33d/): that counts the frames and reads their times exactly (:attr:`info`, as :func:`read_video` gives it),
    and finds a damaged file before any long work starts. Reading decodes again, on a thread of its
    own that runs up to ``prefetch`` frames ahead (default: what fits 256 MiB, 2 to 256 frames), and
    keeps the frames from the last slice's start on. So slices whose starts never go back (overlapping
    chunks, the same chunk once per tile: :class:`oasis.OasisVSR`'s order) decode the clip once; a
    slice starting before the kept frames decodes from the clip's start again. One reader at a time
    (not thread-safe). Use it as a context manager, or :meth:`close` it.

    ``progress``: a progress bar (tqdm) over the opening pass. ``bits=16``: uint16 frames (white 65280),
    which keep a 10- or 12-bit source's precision (:attr:`VideoInfo.bits`); 8: uint8.
    """

    def __init__(self, path, *, max_frames: int | None = None, prefetch: int | None = None,
                 progress: bool = False, bits: int = 8):
        self._rgb = _bits_format(bits, "VideoFrames: ")
        #: the frames' dtype: torch.uint8, or torch.uint16 for ``bits=16``
        self.dtype = torch.uint8 if bits == 8 else torch.uint16
        if max_frames is not None:
            max_frames = _positive_int(max_frames, "max_frames", where="VideoFrames: ")
        if prefetch is not None:
            prefetch = _positive_int(prefetch, "prefetch", where="VideoFrames: ")
        self._path = p = _input_path(path)
        self._thread = None
        self._closed = False
        container = _open_input(p)
        times: list[Fraction] = []
        first, bar = None, None
        try:
            stream = _video_stream(container, p)
            info = _stream_info(p, stream)
            stream.thread_type = "AUTO"
            if progress:
                from tqdm import tqdm

                total = min(info.num_frames or 0, max_frames or info.num_frames or 0) or None
                bar = tqdm(total=total, unit="frame", desc=f"reading {os.path.basename(p)}", leave=False)
            for frame in _decoded(container, stream, p, max_frames):
                first = first or frame
                times.append(_frame_time(frame, len(times), info.fps))
                if bar is not None:
                    bar.update(1)
        finally:
            container.close()
            if bar is not None:
                bar.close()
        if not times:
            raise VideoError(f"{p}: no frames could be decoded")
        #: the clip's metadata, with the decoded count and frame times (as :func:`read_video` gives it)
        self.info = _decoded_info(info, first, times)
        self.shape = torch.Size((len(times), self.info.height, self.info.width, 3))
        frame_bytes = self.info.height * self.info.width * 3 * (bits // 8)
        self._prefetch = prefetch or min(256, max(2, (256 << 20) // frame_bytes))
        self._kept: list[np.ndarray] = []  # frames _start, _start + 1, ...
        self._start = 0
        self._position = 0  # the frame the decoding thread gives next

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        n, h, w, _ = self.shape
        return f"VideoFrames({self._path!r}, {n} frames {w}x{h}{', closed' if self._closed else ''})"

    def __getitem__(self, key) -> torch.Tensor:
        start, stop = _frame_run(key, len(self), self)
        if stop is None:  # one frame
            return self[start:start + 1][0]
        if self._closed:
            raise VideoError(f"{self._path}: read after close()")
        if stop <= start:  # nothing asked: nothing decoded, nothing dropped
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        if start < self._start:  # behind the kept frames: from the clip's start again
            self._stop_thread()
            self._kept, self._start = [], 0
        dropped = min(start - self._start, len(self._kept))  # frames no later slice asks for
        del self._kept[:dropped]
        self._start = start if not self._kept else self._start + dropped
        try:
            if self._thread is None:  # none yet, or it stopped at an error: from the clip's first frame
                self._queue = queue.Queue(self._prefetch)
                self._halt = threading.Event()
                self._thread = threading.Thread(
                    target=_decode_frames, name="oasis-video-decode", daemon=True,
                    args=(self._path, len(self), (self.shape[2], self.shape[1]), self._rgb, self._queue, self._halt))
                self._thread.start()
                self._position = 0
            while self._position < self._start + len(self._kept):  # frames skipped, or read before an error
                self._take()
            while self._start + len(self._kept) < stop:
                self._kept.append(self._take())
        except BaseException:
            # an error or an interrupt (Ctrl-C) between taking a frame and keeping it: the next slice starts
            # the decoding again rather than trust a count that may be one off
            self._stop_thread()
            self._kept, self._start = [], 0
            raise
        return torch.from_numpy(np.stack(self._kept[start - self._start:stop - self._start]))

    def _take(self) -> np.ndarray:
        """Frame ``_position`` from the decoding thread."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._stop_thread()
            if isinstance(item, VideoError):
                raise item
            raise VideoError(f"{self._path}: decoding failed ({_reason(item)})") from item
        if item is _END:
            self._stop_thread()
            raise VideoError(f"{self._path}: the second decoding ended at frame {self._position}, the first "
                             f"gave {len(self)} frames")
        self._position += 1
        return item

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._halt.set()
            if self._thread is not threading.current_thread():
                self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Stop decoding and free the kept frames (reading after it raises :class:`VideoError`)."""
        self._stop_thread()
        self._kept = []
        self._closed = True

    def __enter__(self) -> VideoFrames:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # dropped unclosed: the thread (which holds no reference to it) stops within 0.1 s
        if getattr(self, "_thread", None) is not None:
            self._halt.set()


def _decode_frames(path: str, count: int, size: tuple, rgb: str, out: queue.Queue, halt: threading.Event) -> None:
    """:class:`VideoFrames`' decoding thread: the first ``count`` frames of ``path`` as ``rgb`` arrays into
    ``out``, then ``_END`` (or the exception), until ``halt`` is set. It holds no reference to its reader,
    so a reader dropped unclosed is collected, and stops it."""
    def put(item) -> bool:
        while not halt.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        container = _open_input(path)
        try:
            stream = _video_stream(container, path)
            stream.thread_type = "AUTO"
            for k, frame in enumerate(_decoded(container, stream, path, count)):
                if (frame.width, frame.height) != size:
                    raise VideoError(f"{path}: frame {k} is {frame.width}x{frame.height}, the first decoding's "
                                     f"{size[0]}x{size[1]}")
                if not put(_rgb_array(frame, rgb)):
                    return
            put(_END)
        finally:
            container.close()
    except BaseException as e:  # to the reader, which raises it
        put(e)


# ----------------------------------------------------------------------------- writing


class VideoWriter:
    """Streaming encoder: ``with VideoWriter(path, W, H, fps) as w: w.write(chunk)``.

    ``write`` takes uint8 RGB ``[F, H, W, 3]`` (torch tensor on any device, or numpy) and
    may be called any number of times; frames get consecutive timestamps at ``fps``.
    ``close`` (also run by ``__exit__``) flushes the encoder and finishes the file.

    ``fps`` is a ``Fraction``, int, float or string like ``"30000/1001"``; floats are
    rounded to the nearest fraction with denominator <= 1001000, so ``30000/1001`` and
    ``23.976`` survive. ``codec`` defaults to libx264 (libvpx-vp9 for ``.webm``); libx264 falls
    back to ``"mpeg4"`` (with a warning)
    when this PyAV build has no libx264; :attr:`codec` tells which one is used. ``crf``
    is the constant-rate factor for encoders with a ``crf`` option (0 is lossless for
    libx264); other encoders get a fixed quantiser ``1 + round(crf / 8)`` (1..31, mpeg4's
    scale), a rough match. ``pix_fmt`` must be one the encoder supports; chroma-subsampled
    formats (yuv420p) need even sizes. ``color_range`` ("tv", "pc" or None = "tv") and
    ``colorspace`` (matrix: "bt709", "bt470bg", "smpte170m", "smpte240m", "fcc",
    "bt2020nc" or None = "bt709") are applied and tagged only for encoders in
    :data:`COLOUR_SIGNALLING_CODECS`; see the module notes for the others.
    ``keyframe_interval``: at most this many frames from one keyframe to the next (the encoder's
    group of pictures; None keeps its default, 250 for libx264), what a reader's seek lands on.
    ``color_primaries`` and ``color_trc`` (FFmpeg's names, e.g. a source's
    :attr:`VideoInfo.color_primaries`) are tagged as given for the same encoders (None: untagged),
    the RGB values written as they are.
    ``rotation``: degrees a player is to turn the frames (the display matrix; 0 writes none).
    ``sample_aspect_ratio``: the pixels' shape (width / height; a source's
    :attr:`VideoInfo.sample_aspect_ratio`), tagged so a DVD's 720x480 still shows 16:9.
    ``audio_from``: a video or audio file whose audio streams are copied in (module notes).
    ``metadata_from``: a file whose tags (title, creation time, comment, ...; not the muxer's own),
    video stream language and title, and chapters (those that start before the video's end, given
    ``frame_times``; cut there) are copied in.
    ``frame_times``: seconds of each frame from the first (a source's :attr:`VideoInfo.frame_times`):
    where they stray from ``k / fps`` by half a frame or more (a variable-rate phone clip), frames are
    written at those times (on a 1/90000 s clock; frames past the list follow at the last step), so the
    video keeps its source's timing and stays in step with copied sound (a container of constant
    rate only, AVI, gets ``fps`` and a warning); otherwise ignored.

    The output directory must exist. The file is created (or overwritten) when the first
    encoded packet is written, so a writer closed without frames leaves no file (and an
    existing one untouched); ``close`` then raises :class:`VideoError`.
    """

    def __init__(
        self,
        path,
        width: int,
        height: int,
        fps,
        *,
        codec: str | None = None,
        crf: float = 18,
        pix_fmt: str = "yuv420p",
        color_range: str | None = None,
        colorspace: str | None = None,
        color_primaries: str | None = None,
        color_trc: str | None = None,
        sample_aspect_ratio=None,
        keyframe_interval: int | None = None,
        rotation: int = 0,
        audio_from=None,
        frame_times=None,
        metadata_from=None,
    ):
        av = _import_av()
        p = os.fspath(path)
        if isinstance(rotation, bool) or not isinstance(rotation, numbers.Real) or not math.isfinite(rotation):
            raise VideoError(f"{p}: rotation must be a number of degrees, got {rotation!r}")
        audio_source = None if audio_from is None else _input_path(audio_from)
        metadata_source = None if metadata_from is None else _input_path(metadata_from)
        if audio_source is not None and os.path.exists(p) and os.path.samefile(p, audio_source):
            raise VideoError(f"{p}: is the file the sound is copied from (audio_from); write elsewhere first")
        self._times = _variable_times(frame_times, _as_fps(fps, p), p)  # (None at a constant rate)
        if keyframe_interval is not None:
            keyframe_interval = _positive_int(keyframe_interval, "keyframe_interval", VideoError, f"{p}: ")
        self.path = p
        self.width = _positive_int(width, "width", VideoError, f"{p}: ")
        self.height = _positive_int(height, "height", VideoError, f"{p}: ")
        self.fps = _as_fps(fps, p)
        if isinstance(crf, bool) or not isinstance(crf, numbers.Real) or not 0 <= crf <= 63:
            raise VideoError(f"{p}: crf must be a number in 0..63, got {crf!r}")

        parent = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(parent):
            raise VideoError(f"{p}: output directory {parent} does not exist")
        if os.path.isdir(p):
            raise VideoError(f"{p}: is a directory, not a file name")

        if codec is None:  # WebM holds VP8/VP9/AV1 only
            codec = "libvpx-vp9" if p.lower().endswith(".webm") else "libx264"
        if codec == "libx264" and "libx264" not in av.codecs_available:
            warnings.warn(
                f"{p}: this PyAV build has no libx264; writing with the mpeg4 encoder",
                RuntimeWarning,
                stacklevel=2,
            )
            codec = "mpeg4"
        try:
            encoder = av.Codec(codec, "w")
        except (av.FFmpegError, ValueError) as e:
            raise VideoError(f"{p}: no {codec!r} encoder in this PyAV build") from e
        if encoder.type != "video":
            raise VideoError(f"{p}: {codec!r} is not a video encoder")
        self.codec = encoder.name  # aliases such as "h264" resolve to "libx264"

        if color_range not in (None, "tv", "pc"):
            raise VideoError(f"{p}: color_range must be 'tv', 'pc' or None, got {color_range!r}")
        if colorspace is not None and colorspace not in _WRITE_MATRICES:
            raise VideoError(
                f"{p}: colorspace must be one of {sorted(_WRITE_MATRICES)} or None, got {colorspace!r}"
            )
        for name, value, known in (("color_primaries", color_primaries, _PRIMARIES_CODES),
                                   ("color_trc", color_trc, _TRC_CODES)):
            if value is not None and value not in known:
                raise VideoError(f"{p}: {name} must be one of {sorted(known)} or None, got {value!r}")
        if not isinstance(pix_fmt, str):
            raise VideoError(f"{p}: pix_fmt must be a string such as 'yuv420p', got {pix_fmt!r}")
        if pix_fmt.startswith("yuvj"):
            # deprecated full-range aliases: same layout, range carried by the tag instead
            if color_range == "tv":
                raise VideoError(f"{p}: pix_fmt {pix_fmt} is full range, but color_range='tv'")
            pix_fmt, color_range = "yuv" + pix_fmt[4:], "pc"
        supported = [f.name for f in (encoder.video_formats or ())]
        if supported and pix_fmt not in supported:
            raise VideoError(
                f"{p}: {self.codec} cannot encode pix_fmt {pix_fmt!r} (supports {', '.join(supported)})"
            )
        try:
            fmt = av.VideoFormat(pix_fmt, 2, 2)
        except (av.FFmpegError, ValueError) as e:
            raise VideoError(f"{p}: unknown pix_fmt {pix_fmt!r}") from e
        if fmt.chroma_width() < 2 and self.width % 2:
            raise VideoError(
                f"{p}: width {self.width} must be even for {pix_fmt} (chroma is subsampled 2:1)"
            )
        if fmt.chroma_height() < 2 and self.height % 2:
            raise VideoError(
                f"{p}: height {self.height} must be even for {pix_fmt} (chroma is subsampled 2:1)"
            )
        self.pix_fmt = pix_fmt

        # colour: convert with the matrix/range the decoder will be told about, or, where
        # the bitstream cannot tell it, with the BT.601 "tv" it will assume
        self._tagged = self.codec in COLOUR_SIGNALLING_CODECS and not fmt.is_rgb
        if self._tagged:
            self.color_range = color_range or "tv"
            self.colorspace = colorspace or "bt709"
            self._sws_matrix, matrix_tag = _WRITE_MATRICES[self.colorspace]
            self.color_primaries, self.color_trc = color_primaries, color_trc
            self._sws_range = "JPEG" if self.color_range == "pc" else "MPEG"
        else:
            if not fmt.is_rgb and (color_range == "pc" or colorspace not in (None, *_BT601)
                                   or color_primaries not in (None, "bt709", *_BT601)
                                   or color_trc not in (None, "bt709", "smpte170m")):
                warnings.warn(
                    f"{p}: the {self.codec} encoder cannot signal colour range/matrix/primaries/curve; "
                    f"writing untagged BT.601 tv range (asked: color_range={color_range!r}, "
                    f"colorspace={colorspace!r}, color_primaries={color_primaries!r}, color_trc={color_trc!r})",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.color_primaries = self.color_trc = None
            self.color_range = None
            self.colorspace = None
            self._sws_matrix = self._sws_range = None

        private = {o.name for o in av.CodecContext.create(self.codec, "w").supported_options.private}
        if "crf" in private:
            # SVT-AV1 reads 0 as "unset" (its default, 35): its finest is 1
            options = {"crf": f"{max(crf, 1) if self.codec == 'libsvtav1' else crf:g}"}
            if self.codec == "libvpx-vp9":
                options["b"] = "0"  # vp9 is constant-quality only with no bitrate target
            if self.codec == "libx265":
                options["x265-params"] = "log-level=error"  # x265 prints a page per file
            if self.codec == "libsvtav1":  # so does SVT-AV1, at its own log level (1: errors), read per encoder
                os.environ.setdefault("SVT_LOG", "1")
        else:
            # pinning the quantiser range is what sticks: FFmpeg's mpeg4 encoder takes a fixed
            # qscale only from each frame's quality field, which PyAV does not expose
            q = str(min(31, 1 + round(crf / 8)))
            options = {"qmin": q, "qmax": q}

        self._av = av
        self._frames_written = 0
        self._container = None
        try:
            # guesses the container from the extension; the file itself opens at first mux
            self._container = av.open(_ffmpeg_name(p), mode="w")
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoError(f"{p}: cannot write this file type ({_reason(e)})") from e
        if self.codec == "libx265" and self._container.format.name.split(",")[0] in ("mov", "mp4"):
            warnings.warn(f"{p}: FFmpeg's MP4 muxer fails at random on libx265's headers with this PyAV (at the "
                          f"first packet or the flush; docs/OASIS.md); Matroska (.mkv) holds HEVC reliably",
                          RuntimeWarning, stacklevel=2)
        if self._times is not None and not self._container.format.flags & _AVFMT_VARIABLE_FPS:
            warnings.warn(f"{p}: {self._container.format.name} files hold a constant frame rate only; the "
                          f"source's variable timing is written as {float(self.fps):.3f} fps", RuntimeWarning,
                          stacklevel=2)
            self._times = None
        try:
            stream = self._container.add_stream(self.codec, rate=self.fps)
            stream.width, stream.height, stream.pix_fmt = self.width, self.height, self.pix_fmt
            stream.time_base = 1 / self.fps if self._times is None else _VFR_CLOCK
            if self._times is not None:
                stream.codec_context.time_base = _VFR_CLOCK
            stream.options = options
            self._options = dict(options)  # (PyAV does not give them back: check_writable's scratch encoder)
            if keyframe_interval is not None:
                stream.codec_context.gop_size = keyframe_interval
            if self._tagged:
                stream.codec_context.color_range = _RANGE_CODES[self.color_range]
                stream.codec_context.colorspace = matrix_tag
                if self.color_primaries:
                    stream.codec_context.color_primaries = _PRIMARIES_CODES[self.color_primaries]
                if self.color_trc:
                    stream.codec_context.color_trc = _TRC_CODES[self.color_trc]
            if rotation % 360:
                stream.set_display_rotation(float(rotation))
                if self._container.format.name.split(",")[0] not in _ROTATION_FORMATS:
                    warnings.warn(f"{p}: {self._container.format.name} files cannot hold a rotation; the frames "
                                  f"play as stored, not turned by {rotation % 360} degrees (write .mp4, .mov or "
                                  f".mkv)", RuntimeWarning, stacklevel=2)
            if sample_aspect_ratio is not None:
                sar = Fraction(sample_aspect_ratio)
                if sar <= 0:
                    raise ValueError(f"sample_aspect_ratio must be positive, got {sample_aspect_ratio!r}")
                stream.codec_context.sample_aspect_ratio = sar
            # open now so a bad option or size fails here, not after the first chunk's work
            stream.codec_context.open()
        except (av.FFmpegError, OSError, ValueError) as e:
            self._abort()
            raise VideoError(f"{p}: cannot start the {self.codec} encoder ({_reason(e)})") from e
        self.rotation = round(rotation) % 360
        self._stream = stream
        if metadata_source is not None:
            # the chapters end where the video will: frame n's time (at the last step's pace past the list)
            end = self._time(len(frame_times)) if frame_times is not None and len(frame_times) else None
            try:
                _copy_tags(metadata_source, self._container, stream, end)
            except BaseException:
                self._abort()
                raise
        self._reformatter = av.video.reformatter.VideoReformatter()
        interpolation = av.video.reformatter.Interpolation
        self._accurate = interpolation.BILINEAR | interpolation.ACCURATE_RND  # (16-bit frames: _rgb_array)
        self._audio = None
        if audio_source is not None:
            try:
                self._audio = _AudioCopy(audio_source, self._container, p)
            except BaseException:
                self._abort()
                raise

    @property
    def audio_streams(self) -> list[str]:
        """What each copied audio stream became: ``"copied aac"``, ``"re-encoded pcm_s16le to aac"``."""
        return [] if self._audio is None else list(self._audio.summary)

    @property
    def frames_written(self) -> int:
        """Frames passed to :meth:`write` so far."""
        return self._frames_written

    @property
    def closed(self) -> bool:
        return self._container is None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"VideoWriter({self.path!r}, {self.width}x{self.height} @ {self.fps} fps, "
            f"{self.codec}/{self.pix_fmt}, {self._frames_written} frames, {state})"
        )

    def write(self, frames) -> None:
        """Encode uint8 RGB ``frames`` ``[F, H, W, 3]`` (tensor on any device, or numpy), or uint16 ones
        (FFmpeg's 16-bit scale, white 65280: a 10-bit ``pix_fmt`` such as ``yuv420p10le`` keeps their precision).

        Raises ``TypeError`` for another dtype or type and :class:`VideoError` for another
        shape or frame size than the writer's, or an encoder failure.
        """
        if self._container is None:
            raise VideoError(f"{self.path}: write() on a closed VideoWriter")
        arr = _frames_array(frames, self.path, deep=True)
        if arr.shape[1:3] != (self.height, self.width):
            raise VideoError(
                f"{self.path}: frames are {arr.shape[2]}x{arr.shape[1]} (WxH), "
                f"the writer was opened for {self.width}x{self.height}"
            )
        av = self._av
        try:
            for rgb in arr:
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24" if rgb.dtype == np.uint8 else "rgb48le")
                # explicit conversion: PyAV's implicit one would ignore the matrix and range
                frame = self._reformatter.reformat(
                    frame,
                    format=self.pix_fmt,
                    dst_colorspace=self._sws_matrix,
                    dst_color_range=self._sws_range,
                    interpolation=None if rgb.dtype == np.uint8 else self._accurate,
                )
                frame.pts = self._pts(self._frames_written)
                frame.time_base = self._stream.codec_context.time_base
                for packet in self._stream.encode(frame):
                    self._container.mux(packet)
                self._frames_written += 1
        except av.FFmpegError as e:
            raise VideoError(
                f"{self.path}: encoding failed at frame {self._frames_written} ({_reason(e)})"
            ) from e
        if self._audio is not None and self._frames_written:  # interleaved: the sound up to the video's end
            try:
                self._audio.copy_until(self._time(self._frames_written))
            except av.FFmpegError as e:
                raise VideoError(f"{self.path}: copying the sound failed ({_reason(e)})") from e

    def _time(self, k: int) -> Fraction:
        """Seconds of frame ``k`` (``k`` = the count written: where the video ends)."""
        if self._times is None:
            return Fraction(k) / self.fps
        last = len(self._times) - 1
        if k <= last:
            return self._times[k]
        # past the list (the end of the last frame, or frames beyond it): at the last step's pace
        step = self._times[last] - self._times[last - 1] if last > 0 else 1 / self.fps
        return self._times[last] + (k - last) * step

    def _pts(self, k: int) -> int:
        if self._times is None:
            return k
        # on the 1/90000 s clock, and increasing even where two times round alike
        pts = round(self._time(k) / _VFR_CLOCK)
        self._last_pts = pts = pts if k == 0 else max(pts, self._last_pts + 1)
        return pts

    def close(self) -> None:
        """Flush the encoder and finish the file; closing twice is harmless."""
        if self._container is None:
            return
        av = self._av
        if self._frames_written == 0:
            self._abort()
            raise VideoError(f"{self.path}: no frames were written, so no file was created")
        container, self._container = self._container, None
        try:
            for packet in self._stream.encode(None):
                container.mux(packet)
            if self._audio is not None:
                self._audio.finish(self._time(self._frames_written))
        except av.FFmpegError as e:
            raise VideoError(f"{self.path}: flushing the encoder failed ({_reason(e)})") from e
        finally:
            if self._audio is not None:
                self._audio.close()
            container.close()

    def _abort(self) -> None:
        # nothing was muxed yet, so PyAV has not opened (or truncated) the file
        if getattr(self, "_audio", None) is not None:
            self._audio.close()
        container, self._container = self._container, None
        if container is not None:
            try:
                container.close()
            except Exception:  # noqa: BLE001 - already failing with a clearer error
                pass

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # an error is already propagating: finish what was written, don't mask the error
        try:
            self.close()
        except VideoError:
            pass


#: containers whose muxers write a display matrix (MP4/MOV's track matrix, Matroska's projection)
_ROTATION_FORMATS = {"mp4", "mov", "3gp", "3g2", "ipod", "ismv", "psp", "f4v", "matroska", "webm"}

#: the clock of variable-rate output (MPEG's 90 kHz): any source timing to 11 microseconds
_VFR_CLOCK = Fraction(1, 90000)
_AVFMT_VARIABLE_FPS = 0x0400  # libavformat's flag of containers whose frames may come at any times
_AVFMT_NOFILE = 0x0001  # and of muxers that open their own files (HLS, DASH, segment)


def _variable_times(frame_times, fps: Fraction, p: str) -> tuple[Fraction, ...] | None:
    """``frame_times`` as Fractions when they stray from ``k / fps`` by half a frame or more; None when
    they don't (constant rate: frame ``k`` at ``k / fps``, as without them) or are None."""
    if frame_times is None:
        return None
    try:
        times = tuple(Fraction(t) for t in frame_times)
    except (TypeError, ValueError) as e:
        raise VideoError(f"{p}: frame_times must be numbers of seconds, got {frame_times!r:.80}") from e
    if any(b <= a for a, b in zip(times, times[1:])) or (times and times[0] < 0):
        raise VideoError(f"{p}: frame_times must increase from 0 or more")
    if all(abs(t - k / fps) < 1 / (2 * fps) for k, t in enumerate(times)):
        return None
    return tuple(t - times[0] for t in times) if times else None


class _AudioCopy:
    """The audio streams of ``source`` copied into the open output ``container`` as the video is
    written: packets as they are where the container takes the codec, else decoded and encoded to
    AAC; timed from the source's first video frame (its start time), cut at the video's end."""

    def __init__(self, source: str, container, out_path: str):
        av = _import_av()
        self._av = av
        self._source = source
        self._src = _open_input(source)
        self.summary: list[str] = []
        self._outs: dict = {}  # source stream index -> (output stream, encoder-side: re-encoded?)
        self._lead: dict = {}  # source stream index -> seconds of priming before its start
        try:
            self._start = _video_start(self._src)
            for stream in self._src.streams.audio:
                self._add(stream, container, out_path)
        except BaseException:
            self._src.close()
            raise
        self._container = container
        self._packets = self._src.demux(*[s for s in self._src.streams.audio if s.index in self._outs]) \
            if self._outs else iter(())
        self._held = None  # the first packet past the last copy_until, read but not yet due
        self._warned = False

    def _add(self, stream, container, out_path: str) -> None:
        """An output stream for ``stream``: a copy where the container takes its codec (tried on a
        scratch file first, :func:`_muxes`), else AAC, else none (a warning)."""
        av = self._av
        name = stream.codec_context.name
        sample = _first_packet(self._source, stream.index)
        if sample is None:
            return  # a stream without a single packet: nothing to copy
        # an encoder's priming packet lies before the stream's start (AAC's 1024 samples, with an edit
        # list to skip them): one packet's length before the video's start is copied too, as the
        # decoder needs it (not more: audio an edit list hides would play in a Matroska output)
        first = -Fraction(sample.pts * sample.time_base)
        self._lead[stream.index] = min(max(Fraction(0), first), Fraction(sample.duration or 0) * sample.time_base)

        def copy(probe):
            sample.stream = probe.add_stream_from_template(stream)
            probe.mux(sample)

        if _muxes(container.format.name, copy, expect=("audio", name)):
            self._outs[stream.index] = (_with_names(container.add_stream_from_template(stream), stream), False)
            self.summary.append(f"copied {name}")
            return
        rate = stream.codec_context.sample_rate or 48000
        # the source's layout where it names its channels (AAC keeps quad, 3.0, 5.1, 7.1...), else the
        # channel count's standard one (a stream may say only "2 channels", which AAC refuses)
        source = stream.codec_context.layout
        channels = len(source.channels) if source else 2
        layouts = dict.fromkeys([source.name] if source and "channels" not in source.name else [])
        layouts[av.AudioLayout(f"{channels}c").name] = None

        def encoded(codec, codec_rate, layout):
            def build(probe):
                out = probe.add_stream(codec, rate=codec_rate, layout=layout)
                # packed: PyAV reports one plane too many for planar 8-channel frames (writing it crashes)
                silence = av.AudioFrame.from_ndarray(np.zeros((1, channels * 1024), np.float32), format="flt",
                                                     layout=layout)
                silence.sample_rate = rate
                for packet in [*out.encode(silence), *out.encode(None)]:
                    probe.mux(packet)
            return build

        # AAC, else Opus (WebM holds no AAC; Opus runs at 48 kHz, the sound resampled by the encoder)
        for codec, codec_rate, short in (("aac", rate, "aac"), ("libopus", 48000, "opus")):
            for layout in layouts if codec in av.codecs_available else ():
                if _muxes(container.format.name, encoded(codec, codec_rate, layout), expect=("audio", short)):
                    out = _with_names(container.add_stream(codec, rate=codec_rate, layout=layout), stream)
                    self._outs[stream.index] = (out, True)
                    self.summary.append(f"re-encoded {name} to {short}")
                    return
        warnings.warn(f"{out_path}: its container cannot hold the source's {name} audio, nor AAC or Opus; "
                      f"that audio stream is left out", RuntimeWarning, stacklevel=4)

    def copy_until(self, seconds) -> None:
        """Copy the packets that start before ``seconds`` of the output."""
        limit = Fraction(seconds)
        while True:
            packet = self._held if self._held is not None else next(self._packets, None)
            self._held = None
            if packet is None:
                return
            if packet.pts is None or packet.dts is None and packet.size == 0:
                continue  # a demuxer's flush packet
            t = packet.pts * packet.time_base - self._start
            if t >= limit:
                self._held = packet
                return
            self._copy(packet, t)

    def _copy(self, packet, t: Fraction) -> None:
        out, encode = self._outs[packet.stream.index]
        if not encode:
            if t < -self._lead[packet.stream.index]:
                return  # before the first video frame
            shift = round(self._start / packet.time_base)
            packet.pts -= shift
            if packet.dts is not None:
                packet.dts -= shift
            packet.stream = out
            self._container.mux(packet)
            return
        try:
            frames = packet.decode()
        except self._av.FFmpegError as e:  # one damaged packet: its samples are left out, not the run
            if not self._warned:
                warnings.warn(f"{self._source}: an audio packet at {float(t):.3f} s could not be decoded "
                              f"({_reason(e)}); its sound is left out", RuntimeWarning, stacklevel=5)
                self._warned = True
            return
        for frame in frames:
            ft = frame.pts * frame.time_base - self._start if frame.pts is not None else t
            if ft + Fraction(frame.samples, frame.sample_rate) <= 0:
                continue  # wholly before the first video frame
            # at its own time on the sample clock (the encoder trims its priming by the edit list, and
            # a gap in the source stays a gap)
            frame.pts = round(ft * frame.sample_rate)
            frame.time_base = Fraction(1, frame.sample_rate)
            for p in out.encode(frame):
                self._container.mux(p)

    def finish(self, seconds) -> None:
        """Copy up to the video's end (``seconds``) and flush the encoders."""
        self.copy_until(seconds)
        for out, encode in self._outs.values():
            if encode:
                for p in out.encode(None):
                    self._container.mux(p)

    def close(self) -> None:
        self._src.close()


#: containers that take any tag (MP4/MOV, Matroska, NUT); others get none copied
_TAG_FORMATS = {"mp4", "mov", "3gp", "3g2", "ipod", "ismv", "f4v", "matroska", "webm", "nut"}

#: tags a muxer writes itself (copied, they would misdescribe the new file)
_OWN_TAGS = {"major_brand", "minor_version", "compatible_brands", "encoder", "duration", "handler_name",
             "vendor_id", "encoder-settings"}


def _tags(metadata) -> dict:
    return {k: v for k, v in dict(metadata).items() if k.lower() not in _OWN_TAGS}


def _copy_tags(source: str, container, video_stream, end) -> None:
    """``source``'s file tags, its video stream's language and title, and its chapters (starting before
    ``end`` seconds and cut there; all when None) into the output about to be written."""
    if container.format.name.split(",")[0] not in _TAG_FORMATS:
        return  # others refuse some tags only when the file is finished (a long title in MPEG-TS)
    src = _open_input(source)
    try:
        for k, v in _tags(src.metadata).items():
            container.metadata[k] = v
        video = _picture_streams(src)
        if video:
            for k in ("language", "title"):
                if k in video[0].metadata:
                    video_stream.metadata[k] = video[0].metadata[k]
        zero = _video_start(src)  # the output's clock starts there, as the copied sound's does
        chapters = []
        for ch in src.chapters():
            tb = ch["time_base"]
            start, stop = max(ch["start"] * tb - zero, 0), ch["end"] * tb - zero
            if stop <= 0 or (end is not None and start >= end):
                continue
            if end is not None and stop > end:
                stop = end
            chapters.append({**ch, "start": round(start / tb), "end": round(stop / tb), "id": len(chapters) + 1})
        if chapters:
            container.set_chapters(chapters)
    finally:
        src.close()


def _with_names(out, source):
    """``out`` with ``source``'s language and title (a film's "jpn", "Japanese" track)."""
    for k in ("language", "title"):
        if k in source.metadata:
            out.metadata[k] = source.metadata[k]
    return out


def _first_packet(path: str, index: int):
    """The first packet of stream ``index`` of ``path`` with data (None if it has none)."""
    av = _import_av()
    with av.open(_ffmpeg_name(path)) as src:
        for packet in src.demux(src.streams[index]):
            if packet.size and packet.pts is not None:
                return packet
    return None


def _muxes(format_name: str, build, expect: tuple[str, str]) -> bool:
    """Whether a file of ``format_name`` can be written with what ``build(container)`` adds and muxes,
    and reads back as one stream of ``expect`` (type, codec): tried on a scratch file in memory, as
    FFmpeg refuses a codec a format cannot hold only when it writes the file's header or trailer (PCM
    in MP4), and MPEG-TS takes any codec as a data stream no player reads."""
    import io

    av = _import_av()
    buf = io.BytesIO()
    try:
        with av.open(buf, mode="w", format=format_name) as probe:
            build(probe)
        buf.seek(0)
        with av.open(buf, mode="r", format=format_name) as back:
            return [(s.type, s.codec_context.name if s.codec_context else None) for s in back.streams] == [expect]
    except (av.FFmpegError, ValueError, NotImplementedError, TypeError):
        return False


def streams_left_out(path, *, audio: bool = False) -> list[str]:
    """What of ``path`` a :class:`VideoWriter` given it as ``audio_from`` and ``metadata_from`` does not
    carry over, by kind: subtitle and attachment streams, timecode tracks, video streams after the first
    (e.g. ``["subtitle", "subtitle"]``; an MP4's chapter track is not one: its chapters are copied).
    ``audio``: the audio streams too (for an output without sound, such as image files)."""
    container = _open_input(_input_path(path))
    left = ("subtitle", "attachment", "audio") if audio else ("subtitle", "attachment")
    try:
        videos = _picture_streams(container)
        kinds = [s.type for s in container.streams if s.type in left]
        kinds += ["timecode"] * sum(s.type == "data" and "timecode" in s.metadata for s in container.streams)
        return kinds + ["video"] * (len(videos) - 1)
    finally:
        container.close()


def check_writable(path, width: int, height: int, fps, **kwargs) -> None:
    """Raise :class:`VideoError` now if :class:`VideoWriter` could not write ``path`` (its folder
    missing or read-only, a file type FFmpeg does not know, an encoder the container refuses or a
    container that fails when it finishes: Ogg or Y4M with H.264), without creating it: the writer's
    own checks, then two frames written to a scratch file in memory in the same format. For programs
    that write only after minutes of work (``oasis-vsr``)."""
    import io

    av = _import_av()
    p = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(p)) or "."
    if os.path.isdir(parent) and not os.access(parent, os.W_OK | os.X_OK) and not (
            os.path.isfile(p) and os.access(p, os.W_OK)):
        raise VideoError(f"{p}: the folder {parent} is not writable")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("audio_from", "frame_times")}
    writer = VideoWriter(p, width, height, fps, **kwargs)
    fmt, codec, options = writer._container.format.name, writer.codec, writer._options
    several = writer._container.format.flags & _AVFMT_NOFILE  # HLS, DASH, segments: files of their own
    writer._abort()
    if several:
        raise VideoError(f"{p}: a {fmt} output is several files; give one video file (.mp4, .mkv, .mov, .webm)")
    size = (64, 64)  # the smallest frames every encoder takes; the real size passed the writer's checks
    try:
        with av.open(io.BytesIO(), mode="w", format=fmt) as probe:
            stream = probe.add_stream(codec, rate=writer.fps)
            stream.width, stream.height, stream.pix_fmt = *size, writer.pix_fmt
            stream.options = options
            for i in range(2):
                frame = av.VideoFrame(*size, writer.pix_fmt)
                for plane in frame.planes:
                    plane.update(bytes(plane.buffer_size))
                frame.pts = i
                for packet in stream.encode(frame):
                    probe.mux(packet)
            for packet in stream.encode(None):
                probe.mux(packet)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{p}: a {fmt} file cannot be written with {codec} ({_reason(e)}); try .mp4, .mkv or "
                         f".mov") from e


def write_video(path, frames, fps, **kwargs) -> None:
    """Encode uint8 RGB ``frames`` ``[F, H, W, 3]`` to ``path`` in one go.

    ``kwargs`` go to :class:`VideoWriter` (``codec``, ``crf``, ``pix_fmt``,
    ``color_range``, ``colorspace``). Zero frames raise :class:`VideoError`.
    """
    p = os.fspath(path)
    arr = _frames_array(frames, p, deep=True)
    if arr.shape[0] == 0:
        raise VideoError(f"{p}: no frames to write")
    with VideoWriter(p, arr.shape[2], arr.shape[1], fps, **kwargs) as writer:
        writer.write(arr)


# ----------------------------------------------------------------------------- test clip


def _bounce(start: torch.Tensor, velocity: torch.Tensor, t: int, low: torch.Tensor, high: torch.Tensor):
    # triangle wave: the position reflects off [low, high] instead of leaving the frame
    span = (high - low).clamp_min(1e-6)
    x = torch.remainder(start - low + velocity * t, 2 * span)
    return low + torch.where(x > span, 2 * span - x, x)


def synthetic_clip(num_frames: int, height: int, width: int, *, seed: int = 0) -> torch.Tensor:
    """A deterministic test clip: uint8 RGB ``[num_frames, height, width, 3]`` on CPU.

    A smooth, slowly drifting colour gradient with a fine two-grating texture (periods of
    3-4 px, translating 1 px per frame), three bright anti-aliased discs and two rectangles
    filled with a 2-px checkerboard, each moving 1-3 px per frame and bouncing off the
    borders. Edges and texture are what a x4 super-resolution demo has to restore. The
    same arguments give the same clip on every machine (own generator, not the global
    RNG); another ``seed`` changes colours, positions and directions.
    """
    num_frames = _positive_int(num_frames, "num_frames", where="synthetic_clip: ")
    height = _positive_int(height, "height", where="synthetic_clip: ")
    width = _positive_int(width, "width", where="synthetic_clip: ")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"synthetic_clip: seed must be an int, got {seed!r}")
    gen = torch.Generator().manual_seed(int(seed) % 2**63)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=gen, dtype=torch.float64).float()

    two_pi = 2 * math.pi
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    u, v = xs / max(width - 1, 1), ys / max(height - 1, 1)
    size = float(min(height, width))

    # background: one sinusoid per channel, random direction/frequency/phase
    angle, freq, phase = rand(3) * two_pi, 0.4 + 0.8 * rand(3), rand(3) * two_pi
    # fine texture: two gratings at different orientations, periods 3-4 px
    tex_angle, tex_period = rand(2) * math.pi, 3.0 + rand(2)

    # discs: radius, colour, start, velocity (1-3 px/frame)
    n_disc, n_rect = 3, 2
    radius = (size * (0.08 + 0.07 * rand(n_disc))).clamp_min(1.5)
    disc_col = _bright_colours(rand(n_disc, 3))
    # rectangles: half extents, colour
    half = torch.stack([size * (0.08 + 0.1 * rand(n_rect)), size * (0.06 + 0.08 * rand(n_rect))], 1)
    half = half.clamp_min(1.0)  # [n_rect, (x, y)]
    rect_col = _bright_colours(rand(n_rect, 3))

    ext = torch.tensor([width - 1.0, height - 1.0])
    low = torch.cat([radius[:, None].expand(-1, 2), half])  # [n_disc + n_rect, 2]
    high = torch.maximum(ext - low, low)
    start = low + rand(n_disc + n_rect, 2) * (high - low)
    heading, speed = rand(n_disc + n_rect) * two_pi, 1.0 + 2.0 * rand(n_disc + n_rect)
    velocity = torch.stack([torch.cos(heading), torch.sin(heading)], 1) * speed[:, None]

    out = torch.empty((num_frames, height, width, 3), dtype=torch.uint8)
    for t in range(num_frames):
        channels = []
        for c in range(3):
            w = torch.cos(angle[c]) * u + torch.sin(angle[c]) * v
            channels.append(0.5 + 0.3 * torch.sin(two_pi * freq[c] * w + phase[c] + 0.08 * t))
        img = torch.stack(channels, -1)  # [H, W, 3]

        tex = torch.zeros(height, width)
        for k in range(2):
            proj = torch.cos(tex_angle[k]) * (xs - t) + torch.sin(tex_angle[k]) * ys
            tex = tex + 0.05 * torch.sin(two_pi * proj / tex_period[k])
        img = img + tex[..., None]

        pos = _bounce(start, velocity, t, low, high)
        for i in range(n_disc):
            dist = torch.sqrt((xs - pos[i, 0]) ** 2 + (ys - pos[i, 1]) ** 2)
            alpha = (radius[i] + 0.5 - dist).clamp(0, 1)[..., None]  # 1-px anti-aliased rim
            img = img * (1 - alpha) + disc_col[i] * alpha
        for j in range(n_rect):
            cx, cy = pos[n_disc + j]
            hx, hy = half[j]
            cover_x = (hx + 0.5 - (xs - cx).abs()).clamp(0, 1)
            cover_y = (hy + 0.5 - (ys - cy).abs()).clamp(0, 1)
            alpha = (cover_x * cover_y)[..., None]
            checker = (torch.floor((xs - cx) / 2) + torch.floor((ys - cy) / 2)).remainder(2)[..., None]
            fill = rect_col[j] * (1 - 0.55 * checker)
            img = img * (1 - alpha) + fill * alpha
        out[t] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def _bright_colours(r: torch.Tensor) -> torch.Tensor:
    # saturated and light: one channel near full, the weakest channel pushed down
    col = 0.35 + 0.65 * r
    col[torch.arange(len(col)), col.argmax(1)] = 1.0
    col[torch.arange(len(col)), col.argmin(1)] *= 0.3
    return col
