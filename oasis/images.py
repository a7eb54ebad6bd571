"""Image sequences in and out of ``oasis-vsr``: a folder of frames, as video super-resolution test sets
(Vid4, REDS4, UDM10) and frame-exported footage come.

* :class:`ImageFrames` reads a folder of images (or a numbered pattern such as ``clip/%05d.png``) as the
  frames of a clip, each read when asked for; :attr:`ImageFrames.info` describes it as
  :func:`oasis.video.probe_video` describes a video.
* :class:`ImageWriter` writes frames as numbered images (or under given names) into a folder, each
  file complete or absent (written beside and renamed), several at once on worker threads.
* :func:`is_image_sequence` tells a sequence's path from a video file's.

Frames are uint8 RGB ``[F, H, W, 3]``, as everywhere in :mod:`oasis.video` (uint16 with ``bits=16``, on
FFmpeg's 16-bit scale: white 65280). Reading: grey, palette and CMYK images become RGB, transparency is
dropped (:attr:`VideoInfo.alpha` says so); 16-bit images (grey, and RGB(A) PNG and TIFF, which Pillow
reads as 8-bit RGB: decoded by FFmpeg with ``bits=16``) give 8 bits unless read with ``bits=16``
(interlaced 16-bit PNGs give 8: FFmpeg's decoder mis-reads them); frames are turned as their EXIF
orientation says they are shown. Writing: 8 bits, or 16 (uint16 frames) into PNG and TIFF. Bad input raises :class:`oasis.video.VideoError` naming the file. Needs Pillow (and PyAV for
16-bit RGB files).
"""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .video import VideoError, VideoInfo, _as_fps, _frame_run, _frames_array, _positive_int

__all__ = ["IMAGE_SUFFIXES", "DEEP_SUFFIXES", "ImageFrames", "ImageWriter", "is_image_sequence", "is_numbered"]

#: the image files a folder's frames are taken from (other files in it are left alone)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: what PIL writes for each suffix an output pattern may end in
_WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
                  ".webp": "WEBP"}
#: the rate given to a sequence that has none (FFmpeg's image2 demuxer's default)
DEFAULT_FPS = Fraction(25)
_FIELD = re.compile(r"%(0?\d*)d")
_EIGHT_BIT_MODES = {"1", "L", "P", "RGB", "RGBA", "RGBa", "RGBX", "LA", "La", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - exercised only without Pillow
        raise ImportError("image sequences need Pillow: pip install pillow") from e
    return Image


def _pattern(path: str) -> tuple[str, str] | None:
    """``(folder, name)`` of a printf-numbered path (``clip/%05d.png``: one ``%d`` field, an image suffix,
    no such file or folder), else None."""
    if not is_numbered(path):
        return None
    folder, name = os.path.split(path)
    if len(_FIELD.findall(name)) > 1 or "%" in _FIELD.sub("", name):
        raise VideoError(f"{path}: a numbered name has one field such as %05d")
    return folder or ".", name


def is_numbered(path) -> bool:
    """Whether ``path`` is a numbered pattern of images: a name with a ``%d`` field (``%05d``) and an image
    suffix (``clip/%05d.png``) that names no existing file or folder (``50%done.mp4`` is a file name)."""
    p = os.fspath(path)
    name = os.path.basename(p)
    return (_FIELD.search(name) is not None and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
            and not os.path.lexists(p))


def is_image_sequence(path, *, output: bool = False) -> bool:
    """Whether ``path`` names frames as images: an existing folder, a numbered pattern (``clip/%05d.png``:
    :func:`is_numbered`), or, for an output, a name ending in a path separator (the folder made)."""
    p = os.fspath(path)
    if os.path.isdir(p) or is_numbered(p):
        return True
    return output and p.endswith((os.sep, "/"))


def _natural_key(name: str):
    """``frame2.png`` before ``frame10.png``: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def _frame_files(folder) -> list[Path]:
    """The image files of ``folder`` a sequence is made of: hidden ones left out (macOS' ``._x.png``, the
    writer's scratch files), broken links kept (so that opening says so, rather than a frame going missing)."""
    return [f for f in Path(folder).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
            and (f.is_file() or (f.is_symlink() and not f.exists()))]


def _list_frames(path: str, max_frames: int | None = None) -> tuple[list[Path], int | None]:
    """The sequence's files in frame order (the first ``max_frames``), and a pattern's first number."""
    pattern = _pattern(path)
    if pattern is None:
        if not os.path.exists(path):
            raise VideoError(f"{path}: no such folder")
        if not os.path.isdir(path):
            raise VideoError(f"{path}: not a folder of images")
        files = _frame_files(path)
        if not files:
            raise VideoError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        return sorted(files, key=lambda f: _natural_key(f.name))[:max_frames], None
    folder, name = pattern
    if not os.path.isdir(folder):
        raise VideoError(f"{path}: no such folder {folder}")
    width = _FIELD.search(name).group(1)
    head, tail = (re.escape(part) for part in _FIELD.split(name)[::2])
    digits = rf"\d{{{int(width)},}}" if width.startswith("0") and width != "0" else r"\d+"
    regex = re.compile(f"{head}({digits}){tail}")
    numbered = sorted((int(m.group(1)), f) for f in _frame_files(folder) if (m := regex.fullmatch(f.name)))
    if not numbered:
        raise VideoError(f"{path}: no file matches the pattern")
    numbered = numbered[:max_frames]
    missing = next((a + 1 for (a, _), (b, _) in zip(numbered, numbered[1:]) if b != a + 1), None)
    if missing is not None:
        raise VideoError(f"{path}: frame {missing} is missing (the sequence runs {numbered[0][0]}.."
                         f"{numbered[-1][0]})")
    return [f for _, f in numbered], numbered[0][0]


#: where uint16 frames can go: 16 bits per colour in these formats (FFmpeg's encoder and pixel format)
DEEP_SUFFIXES = {".png": ("png", "rgb48be"), ".tif": ("tiff", "rgb48le"), ".tiff": ("tiff", "rgb48le")}


def _deep_rgb(image, path) -> bool:
    """Whether ``image`` (open in Pillow, which reads it as 8-bit RGB(A)) holds 16 bits per colour, read
    at that depth by FFmpeg: a PNG of colour type RGB, RGBA or grey+alpha at bit depth 16 (its IHDR), not
    interlaced (FFmpeg 8.1's decoder mis-reads interlaced 16-bit RGB rows: those stay Pillow's 8 bits), a
    TIFF of 16-bit samples."""
    if image.mode not in ("RGB", "RGBA"):
        return False
    if image.format == "PNG":
        with open(path, "rb") as f:
            head = f.read(29)
        return (len(head) == 29 and head[12:16] == b"IHDR" and head[24] == 16 and head[25] in (2, 4, 6)
                and head[28] == 0)
    if image.format == "TIFF":
        samples = image.tag_v2.get(258)
        return bool(samples) and all(b == 16 for b in (samples if isinstance(samples, tuple) else (samples,)))
    return False


def _read_deep(path) -> np.ndarray:
    """A 16-bit RGB(A) PNG or TIFF decoded by FFmpeg (Pillow reads 8 bits of it): uint16 ``[H, W, 3]`` on
    FFmpeg's scale (white 65280)."""
    from .video import _ffmpeg_name, _import_av

    av = _import_av()
    try:
        with av.open(_ffmpeg_name(os.fspath(path))) as container:
            frame = next(container.decode(video=0))
            rgb = frame.to_ndarray(format="rgb48le")
    except (av.FFmpegError, StopIteration) as e:
        raise VideoError(f"{path}: not a readable 16-bit image ({e})") from e
    return np.rint(rgb * (65280 / 65535)).astype(np.uint16)


def _write_deep(frame: np.ndarray, path: str, suffix: str, compress_level: int) -> None:
    """uint16 RGB ``frame`` (FFmpeg's scale, white 65280) as a 16-bit PNG or TIFF (white 65535)."""
    from .video import _import_av

    av = _import_av()
    codec, pix_fmt = DEEP_SUFFIXES[suffix]
    full = np.rint(np.minimum(frame, 65280) * (65535 / 65280)).astype(np.uint16)  # above white: white
    context = av.CodecContext.create(codec, "w")
    context.width, context.height, context.pix_fmt = frame.shape[1], frame.shape[0], pix_fmt
    if codec == "png":
        context.options = {"compression_level": str(compress_level)}
    packets = context.encode(av.VideoFrame.from_ndarray(full, format="rgb48le")) + context.encode(None)
    with open(path, "wb") as f:
        for packet in packets:
            f.write(bytes(packet))


def _orientation(image) -> int:
    """The image's EXIF orientation (1..8; 1, as stored, where it has none or a value out of range)."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: the pixels are still the image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(frame: np.ndarray, orientation: int) -> np.ndarray:
    """``frame [H, W, C]`` as its EXIF ``orientation`` says it is shown (what Pillow's
    ``ImageOps.exif_transpose`` and every viewer do): mirrored, turned, or both."""
    if orientation == 1:
        return frame
    turned = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
              5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
              7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}[orientation](frame)
    return np.ascontiguousarray(turned)


def _to_rgb(image, path, bits: int = 8) -> np.ndarray:
    """``image`` as uint8 ``[H, W, 3]``: 8-bit modes converted by PIL, 16-bit ones rounded to 8 bits; or
    for ``bits=16`` as uint16 in FFmpeg's 16-bit scale (:mod:`oasis.video`: 256 x the 8-bit level, white
    65280), 16-bit values (white 65535) scaled onto it."""
    if image.mode in _EIGHT_BIT_MODES:
        rgb = np.asarray(image.convert("RGB"))
        return rgb if bits == 8 else rgb.astype(np.uint16) << np.uint16(8)
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image)
        if grey.size and (grey.max() > 65535 or grey.min() < 0):  # mode "I" holds 32-bit integers
            raise VideoError(f"{path}: 32-bit integer pixels ({grey.min()}..{grey.max()}) are not read (8- or "
                             f"16-bit images)")
        if bits == 16:  # white 65535 onto the frames' 65280
            grey = np.rint(grey * (65280 / 65535)).astype(np.uint16)
        else:
            grey = np.rint(grey / 257.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    raise VideoError(f"{path}: images of PIL mode {image.mode!r} are not read (8- or 16-bit grey, RGB, palette)")


class ImageFrames:
    """The images of a folder (natural order: ``f2.png`` before ``f10.png``; files of other kinds left
    alone), or of a numbered pattern (``clip/%05d.png``: every number from the first to the last),
    as the frames of a clip: ``frames[a:b]`` reads those files, uint8 ``[b - a, H, W, 3]``.

    Opening reads every file's header (size and kind, not the pixels), so a sequence with an
    unreadable file or frames of several sizes fails before any long work. Reading uses up to
    ``threads`` threads (Pillow decodes without the interpreter lock) and keeps the frames from the
    last slice's start on, so overlapping chunks read each file once.

    ``fps``: the sequence's rate (images carry none; default 25, as FFmpeg's). ``max_frames``: the
    first N images only. ``bits=16``: uint16 frames on FFmpeg's 16-bit scale (white 65280; a 16-bit file's
    65535 lands there), 16-bit files at their full depth.
    """

    def __init__(self, path, *, fps=None, max_frames: int | None = None, threads: int | None = None,
                 bits: int = 8):
        Image = _pil()
        p = os.fspath(path)
        if bits not in (8, 16) or isinstance(bits, bool):
            raise ValueError(f"ImageFrames: bits must be 8 (uint8 frames) or 16 (uint16), got {bits!r}")
        self._bits = bits
        #: the frames' dtype: torch.uint8, or torch.uint16 for ``bits=16``
        self.dtype = torch.uint8 if bits == 8 else torch.uint16
        if max_frames is not None:
            max_frames = _positive_int(max_frames, "max_frames", where="ImageFrames: ")
        rate = DEFAULT_FPS if fps is None else _as_fps(fps, p)
        files, first_number = _list_frames(p, max_frames)
        size, alpha, modes, deep, turns = None, False, set(), [], []
        for f in files:
            try:
                with Image.open(f) as image:
                    turns.append(_orientation(image))
                    # the size as shown: a quarter turn swaps the sides
                    shown = image.size[::-1] if turns[-1] >= 5 else image.size
                    if size is None:
                        size = shown
                    elif shown != size:
                        raise VideoError(f"{f}: {shown[0]}x{shown[1]}, where the sequence's first image "
                                         f"({files[0].name}) is {size[0]}x{size[1]}" +
                                         (" (as its EXIF orientation shows it)" if turns[-1] != 1 else ""))
                    if image.mode not in _EIGHT_BIT_MODES | _SIXTEEN_BIT_MODES:
                        raise VideoError(f"{f}: images of PIL mode {image.mode!r} are not read (8- or 16-bit grey, "
                                         f"RGB, palette)")
                    alpha = alpha or "A" in image.mode or "transparency" in image.info
                    deep.append(_deep_rgb(image, f))
                    modes.add(f"{image.mode};16" if deep[-1] else image.mode)
            except (OSError, SyntaxError, ValueError) as e:
                if isinstance(e, VideoError):
                    raise
                raise VideoError(f"{f}: not a readable image ({' '.join(str(e).split())})") from e
        #: the files, in frame order
        self.files = files
        #: a numbered pattern's first number (``00000000.png``: 0), None for a folder
        self.first_number = first_number
        #: the sequence described as :func:`oasis.video.probe_video` describes a video (full-range RGB)
        self.info = VideoInfo(path=p, width=size[0], height=size[1], fps=rate, num_frames=len(files),
                              codec=files[0].suffix.lower().lstrip("."), pix_fmt="/".join(sorted(modes)),
                              color_range=None, colorspace=None, alpha=alpha,
                              bits=16 if modes & _SIXTEEN_BIT_MODES or any(deep) else 8)
        self._deep = deep
        self._turns = turns
        self.shape = torch.Size((len(files), size[1], size[0], 3))
        self._threads = threads or min(8, os.cpu_count() or 1)
        self._kept: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        n, h, w, _ = self.shape
        return f"ImageFrames({self.info.path!r}, {n} frames {w}x{h})"

    def _read(self, index: int) -> np.ndarray:
        return _upright(self._read_stored(index), self._turns[index])

    def _read_stored(self, index: int) -> np.ndarray:
        f = self.files[index]
        stored = (self.shape[2], self.shape[1])[::-1] if self._turns[index] >= 5 else (self.shape[2], self.shape[1])
        if self._deep[index] and self._bits == 16:  # 8 bits of it: Pillow's, as before 16-bit RGB was read
            frame = _read_deep(f)
            if frame.shape[1::-1] != stored:
                raise VideoError(f"{f}: {frame.shape[1]}x{frame.shape[0]} now, {stored[0]}x{stored[1]} when the "
                                 f"sequence was opened")
            return frame
        try:
            with _pil().open(f) as image:
                if image.size != stored:
                    raise VideoError(f"{f}: {image.size[0]}x{image.size[1]} now, {stored[0]}x{stored[1]} when the "
                                     f"sequence was opened")
                return _to_rgb(image, f, self._bits)
        except (OSError, SyntaxError, ValueError) as e:
            if isinstance(e, VideoError):
                raise
            raise VideoError(f"{f}: not a readable image ({' '.join(str(e).split())})") from e

    def __getitem__(self, key) -> torch.Tensor:
        start, stop = _frame_run(key, len(self), self)
        if stop is None:  # one frame
            return self[start:start + 1][0]
        indices = range(start, stop)
        if not indices:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        self._kept = {k: v for k, v in self._kept.items() if k >= start}
        wanted = [k for k in indices if k not in self._kept]
        self._kept.update(zip(wanted, self._read_all(wanted)))
        return torch.from_numpy(np.stack([self._kept[k] for k in indices]))

    def read(self, indices) -> torch.Tensor:
        """Frames ``indices`` (any order and step), read now and not kept: ``[len(indices), H, W, 3]``."""
        indices = [range(len(self))[k] for k in indices]  # IndexError for one out of range
        if not indices:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        return torch.from_numpy(np.stack(self._read_all(indices)))

    def _read_all(self, indices: list) -> list:
        if len(indices) <= 1 or self._threads == 1:
            return [self._read(k) for k in indices]
        with ThreadPoolExecutor(min(self._threads, len(indices))) as pool:
            return list(pool.map(self._read, indices))

    def close(self) -> None:
        self._kept = {}

    def __enter__(self) -> ImageFrames:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ImageWriter:
    """Frames into image files, chunk by chunk (as :class:`oasis.video.VideoWriter` takes them).

    ``path``: a folder (made if missing, its parent must exist), where frame k goes to
    ``names[k]`` or, without ``names``, to ``00000001.png``, ``00000002.png``... (FFmpeg's numbering); or
    a numbered pattern (``out/%05d.png``: frame k at number ``start + k``), whose suffix sets the format
    (PNG, JPEG, BMP, TIFF, WebP). uint16 frames (FFmpeg's scale, white 65280) are written with 16 bits per
    colour, into PNG and TIFF only. ``names`` (a folder only): one file name per frame, e.g. the input
    sequence's own names, so restored frames line up with their ground truth.

    Each image is written beside its name and renamed, so a file is complete or absent; ``threads``
    threads write at once (a 2880x1620 PNG takes ~0.3 s of one core at ``compress_level`` 1, the
    default: ~15% larger than level 6 and ~3x faster). Existing files of the same names are replaced.
    ``width``/``height`` are the frames' size, checked on every write.
    """

    def __init__(self, path, width: int, height: int, *, names=None, start: int = 1, threads: int | None = None,
                 compress_level: int = 1, quality: int = 95):
        Image = _pil()
        p = os.fspath(path)
        self.path, self.width, self.height = p, width, height
        if _FIELD.search(os.path.basename(p)) and not os.path.isdir(p):  # a numbered pattern
            folder, name = os.path.split(p)
            folder = folder or "."
            if len(_FIELD.findall(name)) > 1 or "%" in _FIELD.sub("", name):
                raise VideoError(f"{p}: a numbered name has one field such as %05d")
            if names is not None:
                raise ValueError(f"{p}: a numbered pattern names its files; give names= with a folder only")
            suffix = os.path.splitext(name)[1].lower()
            if suffix not in _WRITE_FORMATS:
                raise VideoError(f"{p}: writes {', '.join(_WRITE_FORMATS)} images, not {suffix or 'no suffix'!r}")
            self._name = lambda k: _FIELD.sub(lambda m: f"{start + k:{m.group(1)}d}", name)
        else:
            folder = p.rstrip("/" + os.sep) or p
            if names is not None:
                names = [os.fspath(n) for n in names]
                bad = [n for n in names if os.path.basename(n) != n or os.path.splitext(n)[1].lower()
                       not in _WRITE_FORMATS]
                if bad:
                    raise ValueError(f"{p}: names must be plain file names ending in one of "
                                     f"{', '.join(_WRITE_FORMATS)}, got {bad[0]!r}")
                if len(set(names)) != len(names):
                    raise ValueError(f"{p}: names must differ")
            self._name = (lambda k: f"{start + k:08d}.png") if names is None else names.__getitem__
        parent = os.path.dirname(os.path.abspath(folder))
        if not os.path.isdir(folder):
            if not os.path.isdir(parent):
                raise VideoError(f"{p}: the folder {parent} does not exist")
            if os.path.exists(folder):
                raise VideoError(f"{folder}: exists and is not a folder")
        if not os.access(folder if os.path.isdir(folder) else parent, os.W_OK | os.X_OK):
            raise VideoError(f"{p}: the folder {folder if os.path.isdir(folder) else parent} is not writable")
        self.folder = folder
        self._names = names
        self._options = {"compress_level": compress_level, "quality": quality}
        self._image = Image
        self._threads = threads or min(8, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="oasis-images")
        self._pending: list = []
        self._written = 0
        self._closed = False
        self._lock = threading.Lock()
        self._finished: set[int] = set()
        self._prefix = 0  # frames 0.._prefix - 1 are on disk (or were skipped)
        #: called with that count whenever it grows (a resumable run's record of what it wrote)
        self.on_written = None

    @property
    def frames_written(self) -> int:
        return self._written

    def skip(self, count: int) -> None:
        """Leave the next ``count`` frames' files as they are (a resumed run's frames written before)."""
        self._written += count
        with self._lock:
            self._finished.update(range(self._written - count, self._written))
            self._advance()

    def _advance(self) -> None:
        start = self._prefix
        while self._prefix in self._finished:
            self._finished.discard(self._prefix)
            self._prefix += 1
        if self._prefix > start and self.on_written is not None:
            self.on_written(self._prefix)

    def path_of(self, index: int) -> str:
        """Where frame ``index`` is written."""
        return os.path.join(self.folder, self._name(index))

    @property
    def audio_streams(self) -> list[str]:  # what VideoWriter says it copied: images carry no sound
        return []

    def write(self, frames) -> None:
        """Queue uint8 (or, into PNG and TIFF, uint16) RGB ``frames`` ``[f, H, W, 3]`` (tensor or array)
        for writing."""
        if self._closed:
            raise VideoError(f"{self.path}: write after close()")
        arr = _frames_array(frames, self.path, deep=True)
        if arr.dtype == np.uint16:
            suffixes = {os.path.splitext(self._name(k))[1].lower() for k in range(self._written,
                                                                                   self._written + len(arr))}
            if suffixes - set(DEEP_SUFFIXES):
                raise VideoError(f"{self.path}: 16-bit frames are written as PNG or TIFF, not "
                                 f"{', '.join(sorted(suffixes - set(DEEP_SUFFIXES)))}")
        if arr.shape[1:3] != (self.height, self.width):
            raise VideoError(f"{self.path}: frames are {arr.shape[2]}x{arr.shape[1]}, the writer's "
                             f"{self.width}x{self.height}")
        if self._names is not None and self._written + len(arr) > len(self._names):
            raise VideoError(f"{self.path}: {self._written + len(arr)} frames for {len(self._names)} names")
        os.makedirs(self.folder, exist_ok=True)
        for frame in arr:
            self._pending.append(self._pool.submit(self._save, frame, self._name(self._written), self._written))
            self._written += 1
        # a bound on the frames held: wait for all but the last few chunks' worth
        while len(self._pending) > 4 * self._threads:
            self._pending.pop(0).result()

    def _save(self, frame: np.ndarray, name: str, index: int) -> None:
        target = os.path.join(self.folder, name)
        suffix = os.path.splitext(name)[1].lower()
        scratch = f".{name}.partial{suffix}"
        # beside, then renamed; a name too long for that is written itself
        scratch = target if len(scratch.encode()) > 255 else os.path.join(self.folder, scratch)
        try:
            if frame.dtype == np.uint16:
                _write_deep(frame, scratch, suffix, self._options["compress_level"])
            else:
                self._image.fromarray(frame).save(scratch, format=_WRITE_FORMATS[suffix], **self._options)
            if scratch != target:
                os.replace(scratch, target)
            with self._lock:
                self._finished.add(index)
                self._advance()
        except OSError as e:
            if scratch != target and os.path.exists(scratch):
                os.unlink(scratch)
            raise VideoError(f"{target}: could not be written ({e.strerror or e})") from e

    def close(self) -> None:
        """Wait for every queued image (raising the first failure)."""
        if self._closed:
            return
        self._closed = True
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pending = []
            self._pool.shutdown(wait=True)

    def _abort(self) -> None:
        self._closed = True
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        self._pending = []

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()
