"""Figures measured on the development machine (2 cores, no GPU) behind docs/OASIS.md's image opening check,
its inconsistent-clip operation count and libx264's round trip; the same script run on the tree before those
changes (--tree) and after.

1. ImageFrames' opening check (oasis.images._check_whole, where the tree has it) on a noisy 1080p frame:
   PNG (compress level 1) verify against a full decode, JPEG (quality 95) at an eighth against a full decode;
   median of 10.
2. Host operations per 17-frame 160x320 clip (PyTorch dispatcher count, the torch JPEG, caches warmed by 40
   clips, the mean of 10), consistent and inconsistent.
3. libx264's round trip (9 frames of noise, 40x20 and 49x25, 20 kb/s), each call after another encode (a 30x45
   clip at 2 Mb/s or 5 kb/s): how many of 24 calls give the first call's frames, with and without x264's
   macroblock tree."""
import io, json, os, statistics, sys, time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else ".")
from PIL import Image  # noqa: E402

from oasis.degrade import Degradation, DegradeConfig  # noqa: E402

res = {"commit": os.environ.get("OASIS_COMMIT"), "cpus": os.cpu_count(), "torch": torch.__version__}
torch.set_num_threads(2)

# 1. image checks
try:
    from oasis.images import _check_whole
except ImportError:
    _check_whole = None
rng = np.random.default_rng(0)
img = (np.linspace(0, 255, 1920)[None, :, None] + rng.integers(0, 30, (1080, 1920, 3))).clip(0, 255).astype(np.uint8)
Image.fromarray(img).save("/tmp/cpu_checks.png", compress_level=1)
Image.fromarray(img).save("/tmp/cpu_checks.jpg", quality=95)


def median_ms(fn, reps=10):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def full(path):
    with Image.open(path) as im:
        im.load()


res["images"] = {}
for path in ("/tmp/cpu_checks.png", "/tmp/cpu_checks.jpg"):
    row = {"bytes": os.path.getsize(path), "decode_ms": median_ms(lambda: full(path))}
    if _check_whole is not None:
        row["check_ms"] = median_ms(lambda: _check_whole(path))
    res["images"][os.path.splitext(path)[1][1:]] = row


# 2. operations per clip
class Count(TorchDispatchMode):
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        Count.n += 1
        return func(*args, **(kwargs or {}))


d = Degradation(DegradeConfig(jpeg_impl="torch"))
clip = torch.rand(17, 3, 160, 320, generator=torch.Generator().manual_seed(0))
res["operations_per_clip"] = {}
for mode in ("consistent", "inconsistent"):
    for seed in range(40):
        d(clip, 1000 + seed, mode)
    Count.n = 0
    with Count():
        for seed in range(10):
            d(clip, seed, mode)
    res["operations_per_clip"][mode] = Count.n / 10

# 3. libx264's round trip
import av  # noqa: E402


def roundtrip(frames, codec, bitrate, mbtree):
    buf = io.BytesIO()
    n, h, w, _ = frames.shape
    ph, pw = h + h % 2, w + w % 2
    frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    with av.open(buf, "w", format="mp4" if codec == "libx264" else "avi") as out:
        opts = {} if mbtree or codec != "libx264" else {"x264-params": "mbtree=0"}
        s = out.add_stream(codec, rate=25, options=opts)
        s.width, s.height, s.pix_fmt, s.bit_rate = pw, ph, "yuv420p", bitrate
        s.codec_context.thread_count = 1
        for i, f in enumerate(frames):
            fr = av.VideoFrame.from_ndarray(f, format="rgb24")
            fr.pts = i
            for p in s.encode(fr):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    buf.seek(0)
    with av.open(buf) as src:
        return np.stack([f.to_ndarray(format="rgb24") for f in src.decode(video=0)])[:, :h, :w]


other = rng.integers(0, 255, (6, 30, 45, 3), dtype=np.uint8)
res["x264_same_of_24"] = {}
for mbtree in (True, False):
    key = "macroblock tree on (x264's default)" if mbtree else "mbtree=0"
    res["x264_same_of_24"][key] = {}
    for h, w in ((20, 40), (25, 49)):
        clip8 = np.random.default_rng(1).integers(0, 255, (9, h, w, 3), dtype=np.uint8)
        first = roundtrip(clip8, "libx264", 20_000, mbtree)
        same = 0
        for k in range(24):
            roundtrip(other, "libx264", (2_000_000, 5_000)[k % 2], mbtree)
            same += np.array_equal(roundtrip(clip8, "libx264", 20_000, mbtree), first)
        res["x264_same_of_24"][key][f"{w}x{h}"] = same
json.dump(res, sys.stdout, indent=1)
