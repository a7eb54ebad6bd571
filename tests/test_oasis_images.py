"""Image sequences for oasis-vsr: folders and numbered patterns read as frames, frames written as images."""

import os
from fractions import Fraction

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from oasis.images import ImageFrames, ImageWriter, is_image_sequence, is_numbered  # noqa: E402
from oasis.video import VideoError, synthetic_clip  # noqa: E402

H, W = 20, 28


@pytest.fixture(scope="module")
def clip():
    return synthetic_clip(12, H, W)


def save_all(folder, frames, names):
    folder.mkdir(exist_ok=True)
    for frame, name in zip(frames, names):
        Image.fromarray(frame.numpy()).save(folder / name)
    return folder


def test_a_folder_in_natural_order(tmp_path, clip):
    """``f2`` before ``f10`` (a plain sort would put f10 first); files of other kinds are left alone."""
    folder = save_all(tmp_path / "seq", clip, [f"f{k}.png" for k in range(12)])
    (folder / "notes.txt").write_text("not a frame")
    (folder / "sub.png").mkdir()  # a folder with an image's name is no frame either
    frames = ImageFrames(folder)
    assert [f.name for f in frames.files] == [f"f{k}.png" for k in range(12)]
    assert frames.shape == (12, H, W, 3) and frames.dtype == torch.uint8
    assert torch.equal(frames[:], clip) and torch.equal(frames[3:7], clip[3:7]) and torch.equal(frames[-1], clip[-1])
    info = frames.info
    assert (info.width, info.height, info.num_frames, info.fps, info.alpha) == (W, H, 12, Fraction(25), False)
    assert ImageFrames(folder, fps=30, max_frames=5).info.num_frames == 5
    assert ImageFrames(folder, fps="30000/1001").info.fps == Fraction(30000, 1001)


def test_a_numbered_pattern(tmp_path, clip):
    """Every number from the first to the last, whatever their first number; a gap is an error (a
    dropped frame would shift every later one)."""
    folder = save_all(tmp_path / "seq", clip, [f"im{k + 7:04d}.png" for k in range(12)])
    (folder / "im0100.jpg").write_bytes(b"")  # another suffix: not the pattern's
    frames = ImageFrames(folder / "im%04d.png")
    assert len(frames) == 12 and torch.equal(frames[:], clip)
    os.remove(folder / "im0012.png")
    with pytest.raises(VideoError, match="frame 12 is missing"):
        ImageFrames(folder / "im%04d.png")
    with pytest.raises(VideoError, match="no file matches"):
        ImageFrames(folder / "x%03d.png")
    with pytest.raises(VideoError, match="one field"):
        ImageFrames(folder / "%d_%d.png")


def test_image_kinds(tmp_path):
    """Grey, palette, RGBA (its transparency said, not kept), CMYK, 16-bit grey (rounded to 8 bits)."""
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    grey16 = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 97
    cases = {
        "L": (Image.fromarray(rgb[..., 0]), np.repeat(rgb[..., :1], 3, -1)),
        "RGBA": (Image.fromarray(np.dstack([rgb, rgb[..., :1]])), rgb),
        "P": (Image.fromarray(rgb).convert("P"), np.asarray(Image.fromarray(rgb).convert("P").convert("RGB"))),
        "I;16": (Image.fromarray(grey16), np.repeat(np.rint(grey16 / 257).astype(np.uint8)[..., None], 3, -1)),
    }
    for mode, (image, expect) in cases.items():
        folder = tmp_path / mode.replace(";", "")
        folder.mkdir()
        image.save(folder / "a.png")
        frames = ImageFrames(folder)
        assert np.array_equal(frames[0].numpy(), expect), mode
        assert frames.info.alpha == (mode == "RGBA"), mode
    folder = tmp_path / "cmyk"
    folder.mkdir()
    Image.fromarray(rgb).convert("CMYK").save(folder / "a.jpg")
    assert ImageFrames(folder)[0].shape == (H, W, 3)
    folder = tmp_path / "float"
    folder.mkdir()
    Image.fromarray(np.zeros((H, W), np.float32)).save(folder / "a.tif")
    with pytest.raises(VideoError, match="mode 'F'"):
        ImageFrames(folder)


def test_bad_sequences(tmp_path, clip):
    with pytest.raises(VideoError, match="no such folder"):
        ImageFrames(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="no images"):
        ImageFrames(tmp_path / "empty")
    folder = save_all(tmp_path / "sizes", clip[:2], ["a.png", "b.png"])
    Image.fromarray(np.zeros((H + 1, W, 3), np.uint8)).save(folder / "c.png")
    with pytest.raises(VideoError, match=r"c.png: 28x21, where the sequence's first image \(a.png\) is 28x20"):
        ImageFrames(folder)
    folder = save_all(tmp_path / "broken", clip[:2], ["a.png", "b.png"])
    (folder / "c.png").write_text("not an image")
    with pytest.raises(VideoError, match="c.png: not a readable image"):
        ImageFrames(folder)  # at opening: every header is read before any work
    frames = ImageFrames(save_all(tmp_path / "later", clip[:3], ["a.png", "b.png", "c.png"]))
    (tmp_path / "later" / "b.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(VideoError, match="b.png"):
        frames[0:3]
    with pytest.raises(ValueError, match="step"):
        frames[::2]


def test_overlapping_slices_read_each_file_once(tmp_path, clip, monkeypatch):
    frames = ImageFrames(save_all(tmp_path / "seq", clip, [f"{k}.png" for k in range(12)]), threads=3)
    read = []
    real = frames._read
    monkeypatch.setattr(frames, "_read", lambda k: read.append(k) or real(k))
    for a, b in [(0, 9), (0, 9), (5, 12)]:
        assert torch.equal(frames[a:b], clip[a:b])
    assert sorted(read) == list(range(12))
    assert sorted(frames._kept) == list(range(5, 12))


def test_writer_numbers_names_and_patterns(tmp_path, clip):
    with ImageWriter(tmp_path / "out", W, H) as out:  # the folder is made
        out.write(clip[:5])
        out.write(clip[5:])
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == [f"{k:08d}.png" for k in range(1, 13)]
    assert torch.equal(ImageFrames(tmp_path / "out")[:], clip)  # PNG: lossless
    own = [f"frame_{k}.png" for k in range(12)]
    with ImageWriter(tmp_path / "named", W, H, names=own) as out:
        out.write(clip)
    assert sorted(os.listdir(tmp_path / "named"), key=lambda n: int(n[6:-4])) == own
    (tmp_path / "jpg").mkdir()
    with ImageWriter(tmp_path / "jpg" / "%03d.jpg", W, H, start=0) as out:
        out.write(clip)
    assert sorted(os.listdir(tmp_path / "jpg")) == [f"{k:03d}.jpg" for k in range(12)]
    back = ImageFrames(tmp_path / "jpg" / "%03d.jpg")[:]
    assert (back.float() - clip.float()).abs().mean() < 12  # JPEG at quality 95 on a 28x20 clip with sharp rims
    assert not [n for n in os.listdir(tmp_path / "jpg") if "partial" in n]


def test_writer_errors(tmp_path, clip):
    with pytest.raises(VideoError, match="does not exist"):
        ImageWriter(tmp_path / "no" / "out", W, H)
    with pytest.raises(VideoError, match="not '.gif'"):
        ImageWriter(tmp_path / "%04d.gif", W, H)
    with pytest.raises(ValueError, match="plain file names"):
        ImageWriter(tmp_path / "o", W, H, names=["a/b.png"])
    with pytest.raises(ValueError, match="differ"):
        ImageWriter(tmp_path / "o", W, H, names=["a.png", "a.png"])
    (tmp_path / "file").write_text("")
    with pytest.raises(VideoError, match="not a folder"):
        ImageWriter(tmp_path / "file", W, H)
    out = ImageWriter(tmp_path / "o", W, H, names=["a.png", "b.png"])
    with pytest.raises(VideoError, match="frames are 28x19"):
        out.write(clip[:1, :19])
    with pytest.raises(VideoError, match="3 frames for 2 names"):
        out.write(clip[:3])
    out.close()
    with pytest.raises(VideoError, match="after close"):
        out.write(clip[:1])
    # a file that cannot be put in place: the error names it, when the writer is closed at the latest
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "00000001.png").mkdir()
    out = ImageWriter(tmp_path / "o2", W, H)
    out.write(clip[:1])
    with pytest.raises(VideoError, match="00000001.png: could not be written"):
        out.close()
    assert os.listdir(tmp_path / "o2") == ["00000001.png"]  # the scratch file went


def test_which_paths_are_sequences(tmp_path):
    """A folder, or a ``%d`` name with an image suffix that is no existing file: ``50%done.mp4`` is a video's
    name, and a folder named ``take_%d`` is a folder."""
    assert is_image_sequence(tmp_path) and is_image_sequence(tmp_path / "%05d.png")
    assert not is_image_sequence(tmp_path / "a.mp4") and not is_image_sequence(tmp_path / "new")
    assert is_image_sequence(f"{tmp_path}/new/", output=True) and not is_image_sequence(f"{tmp_path}/new/")
    assert not is_image_sequence(tmp_path / "new", output=True)  # a typo for out.mp4 is no folder of PNGs
    assert is_numbered("a/%d.png") and not is_numbered("a%/b.png") and not is_numbered("50%done.mp4")
    (tmp_path / "take_%d").mkdir()
    assert is_image_sequence(tmp_path / "take_%d") and not is_numbered(tmp_path / "take_%d")
    (tmp_path / "x%03d.png").write_bytes(b"")
    assert not is_numbered(tmp_path / "x%03d.png")  # an existing file's own name


def test_hidden_files_and_links(tmp_path, clip):
    """Hidden files are no frames (macOS' ``._x.png``, a writer's scratch file); a broken link is one that
    cannot be read (said at opening), not a frame left out in silence."""
    folder = save_all(tmp_path / "seq", clip[:3], ["1.png", "2.png", "3.png"])
    (folder / "._1.png").write_bytes(b"AppleDouble")
    (folder / ".4.png.partial.png").write_bytes((folder / "1.png").read_bytes())
    frames = ImageFrames(folder)
    assert [f.name for f in frames.files] == ["1.png", "2.png", "3.png"]
    (folder / "4.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(VideoError, match="4.png: not a readable image"):
        ImageFrames(folder)
    pattern = save_all(tmp_path / "pat", clip[:4], ["0.png", "1.png", "2.png", "4.png"])
    assert len(ImageFrames(pattern / "%d.png", max_frames=3)) == 3  # the gap after the frames asked for
    assert ImageFrames(pattern / "%d.png", max_frames=3).first_number == 0
    assert ImageFrames(pattern / "%d.png", max_frames=3)[np.int64(1)].shape == (H, W, 3)


def test_long_names_are_written_in_place(tmp_path, clip):
    name = "a" * 245 + ".png"  # a valid name whose scratch name would not be
    with ImageWriter(tmp_path / "o", W, H, names=[name]) as out:
        out.write(clip[:1])
    assert os.listdir(tmp_path / "o") == [name]


def test_thirty_two_bit_integers_are_refused(tmp_path):
    (tmp_path / "i").mkdir()
    Image.fromarray(np.full((H, W), 70000, np.int32)).save(tmp_path / "i" / "a.tif")
    frames = ImageFrames(tmp_path / "i")
    with pytest.raises(VideoError, match="32-bit integer"):
        frames[0]


def test_sixteen_bit_reading(tmp_path, clip):
    """``bits=16``: 8-bit images times 256 (FFmpeg's 16-bit scale, white 65280), 16-bit grey scaled onto it
    (rounded to 8 bits without it)."""
    folder = save_all(tmp_path / "seq", clip[:2], ["a.png", "b.png"])
    deep = ImageFrames(folder, bits=16)
    assert deep.dtype == torch.uint16 and torch.equal(deep[:].int(), clip[:2].int() * 256)
    grey = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 97
    (tmp_path / "g").mkdir()
    Image.fromarray(grey).save(tmp_path / "g" / "a.png")
    frames = ImageFrames(tmp_path / "g", bits=16)
    assert frames.info.bits == 16 and np.array_equal(frames[0].numpy()[..., 2], np.rint(grey * (65280 / 65535)))
    with pytest.raises(ValueError, match="bits"):
        ImageFrames(folder, bits=10)


def _deep_file(path, rgb16: np.ndarray, codec: str, pix_fmt: str) -> None:
    """A 16-bit RGB image file written by FFmpeg's encoder (independent of ImageWriter's path)."""
    import av

    context = av.CodecContext.create(codec, "w")
    context.width, context.height, context.pix_fmt = rgb16.shape[1], rgb16.shape[0], pix_fmt
    packets = context.encode(av.VideoFrame.from_ndarray(rgb16, format="rgb48le")) + context.encode(None)
    path.write_bytes(b"".join(bytes(p) for p in packets))


@pytest.mark.parametrize("suffix, codec, pix_fmt", [(".png", "png", "rgb48be"), (".png", "png", "rgba64be"),
                                                      (".tif", "tiff", "rgb48le")])
def test_sixteen_bit_rgb_files(tmp_path, suffix, codec, pix_fmt):
    """RGB(A) PNGs and TIFFs of 16 bits per colour, which Pillow reads as 8-bit RGB: their full depth with
    ``bits=16`` (white 65535 onto FFmpeg's 65280), Pillow's 8 bits without; written back by ImageWriter
    with 16 bits, the same values."""
    rgb16 = np.random.default_rng(5).integers(0, 65536, (H, W, 3)).astype(np.uint16)
    rgb16[0, 0] = 65535
    (tmp_path / "in").mkdir()
    _deep_file(tmp_path / "in" / f"a{suffix}", rgb16, codec, pix_fmt)
    deep = ImageFrames(tmp_path / "in", bits=16)
    assert deep.info.bits == 16 and deep.info.pix_fmt == ("RGBA;16" if "rgba" in pix_fmt else "RGB;16")
    want = np.rint(rgb16 * (65280 / 65535))
    assert np.array_equal(deep[0].numpy(), want) and deep[0].numpy()[0, 0, 0] == 65280
    assert np.array_equal(ImageFrames(tmp_path / "in")[0].numpy(), rgb16 >> 8)  # 8 bits: Pillow's
    out = tmp_path / "out" / f"%02d{suffix}"
    with ImageWriter(out, W, H) as writer:
        writer.write(deep[0:1])
    again = ImageFrames(out, bits=16)
    assert again.info.bits == 16 and torch.equal(again[0], deep[0])


def test_sixteen_bit_frames_go_to_png_and_tiff_only(tmp_path, clip):
    frames = clip[:2].to(torch.int32).mul(256).to(torch.uint16)
    with pytest.raises(VideoError, match="16-bit frames are written as PNG or TIFF, not .jpg"):
        with ImageWriter(tmp_path / "%03d.jpg", W, H) as writer:
            writer.write(frames)
    with pytest.raises(VideoError, match="not .webp"):
        with ImageWriter(tmp_path / "named", W, H, names=["a.png", "b.webp"]) as writer:
            writer.write(frames)
    with pytest.raises(TypeError, match="uint8 RGB"):
        with ImageWriter(tmp_path / "w", W, H) as writer:
            writer.write(frames.int())


def _png16(path, values: np.ndarray, colour_type: int, interlaced: bool = False) -> None:
    """A PNG of bit depth 16 written by hand (not by FFmpeg or Pillow): ``values`` uint16 [H, W, C], C the
    colour type's samples; interlaced by Adam7's seven passes."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    big = values.astype(">u2")
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)] \
        if interlaced else [(0, 0, 1, 1)]
    raw = b"".join(b"\0" + row.tobytes() for x0, y0, dx, dy in passes for row in big[y0::dy, x0::dx]
                   if big[y0::dy, x0::dx].size)
    ihdr = struct.pack(">IIBBBBB", values.shape[1], values.shape[0], 16, colour_type, 0, 0, int(interlaced))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) +
                     chunk(b"IEND", b""))


def test_sixteen_bit_png_kinds(tmp_path):
    """Grey+alpha at 16 bits (Pillow: 8-bit RGBA) keeps its depth; an interlaced 16-bit RGB PNG, which
    FFmpeg's decoder mis-reads, is read by Pillow at 8 bits (said by info.bits), right in every row; a
    write of values above white (65280) gives white, not a wrapped dark value."""
    rng = np.random.default_rng(6)
    grey = rng.integers(0, 65536, (H, W, 2)).astype(np.uint16)
    (tmp_path / "la").mkdir()
    _png16(tmp_path / "la" / "a.png", grey, 4)
    frames = ImageFrames(tmp_path / "la", bits=16)
    assert frames.info.bits == 16 and frames.info.alpha
    assert np.array_equal(frames[0].numpy(), np.repeat(np.rint(grey[..., :1] * (65280 / 65535)), 3, axis=-1))
    rgb = rng.integers(0, 65536, (H, W, 3)).astype(np.uint16)
    (tmp_path / "il").mkdir()
    _png16(tmp_path / "il" / "a.png", rgb, 2, interlaced=True)
    frames = ImageFrames(tmp_path / "il", bits=16)
    assert frames.info.bits == 8 and np.array_equal(frames[0].numpy(), (rgb >> 8).astype(np.uint16) << 8)
    assert np.array_equal(ImageFrames(tmp_path / "il")[0].numpy(), rgb >> 8)
    (tmp_path / "plain").mkdir()
    _png16(tmp_path / "plain" / "a.png", rgb, 2)
    assert np.array_equal(ImageFrames(tmp_path / "plain")[0].numpy(), rgb >> 8)  # 8 bits: Pillow's, as before
    over = np.full((1, H, W, 3), 65280, np.uint16)
    over[0, 0, 0] = [65281, 65535, 65280]
    with ImageWriter(tmp_path / "w" / "%d.png", W, H) as writer:
        writer.write(over)
    assert (Image.open(tmp_path / "w" / "1.png").convert("RGB").getpixel((0, 0))) == (255, 255, 255)


def test_exif_orientation_turns_frames(tmp_path):
    """Each of EXIF's eight orientations gives the frame as Pillow's exif_transpose (every viewer) shows it,
    the sequence's size the shown one (quarter turns swap the sides), in 8 and 16 bits."""
    from PIL import ImageOps

    rgb = np.random.default_rng(7).integers(0, 256, (H, W, 3)).astype(np.uint8)
    for orientation in range(1, 9):
        folder = tmp_path / f"o{orientation}"
        folder.mkdir()
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(rgb).save(folder / "a.png", exif=exif.tobytes())
        with Image.open(folder / "a.png") as image:
            want = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        frames = ImageFrames(folder)
        assert (frames.info.height, frames.info.width) == want.shape[:2], orientation
        assert np.array_equal(frames[0].numpy(), want), orientation
        assert np.array_equal(ImageFrames(folder, bits=16)[0].numpy(), want.astype(np.uint16) << 8)
    # a turned frame among upright ones of the shown size is one sequence; of the stored size, not
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(rgb.transpose(1, 0, 2)).save(mixed / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(mixed / "b.png", exif=exif.tobytes())
    assert ImageFrames(mixed).shape == (2, W, H, 3)
    Image.fromarray(rgb).save(mixed / "c.png")
    with pytest.raises(VideoError, match="where the sequence's first image"):
        ImageFrames(mixed)
