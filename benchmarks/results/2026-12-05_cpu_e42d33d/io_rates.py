"""Host-side rates of oasis-vsr's I/O on the development machine (2 cores, no GPU): the opening pass of
VideoFrames against reading, PNG write time by zlib level, writing one chunk behind against in turn
(a stand-in GPU stage that sleeps), and libx265 into MP4 against Matroska (60 two-frame files each)."""
import io, json, os, sys, time, collections
import av, numpy as np, torch
from PIL import Image
from oasis.cli import _write_behind
from oasis.video import VideoFrames, VideoWriter, read_video, synthetic_clip

res = {"commit": os.environ.get("OASIS_COMMIT"), "cpus": os.cpu_count()}
clip = synthetic_clip(30, 270, 480)
hd = torch.nn.functional.interpolate(clip.permute(0, 3, 1, 2).float(), size=(1080, 1920), mode="bilinear")
hd = hd.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
with VideoWriter("/tmp/io_hd.mp4", 1920, 1080, 30, crf=23) as w:
    for _ in range(4):
        w.write(hd)
t = time.perf_counter(); v = VideoFrames("/tmp/io_hd.mp4"); res["opening_fps_1080p"] = len(v) / (time.perf_counter() - t)
t = time.perf_counter()
for a in range(0, len(v), 33):
    v[a:a + 33]
res["streamed_read_fps_1080p"] = len(v) / (time.perf_counter() - t); v.close()
t = time.perf_counter(); n = len(read_video("/tmp/io_hd.mp4")[0]); res["read_video_fps_1080p"] = n / (time.perf_counter() - t)
frame = hd[0, :720, :1280].numpy()
for lvl in (1, 6):
    t = time.perf_counter()
    for _ in range(4):
        Image.fromarray(frame).save(io.BytesIO(), format="png", compress_level=lvl)
    res[f"png_720p_level{lvl}_ms"] = (time.perf_counter() - t) / 4 * 1e3
big = torch.nn.functional.interpolate(synthetic_clip(33, 180, 320).permute(0, 3, 1, 2).float(), scale_factor=4,
                                      mode="bilinear").round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
def blocks(n, s):
    for _ in range(n):
        time.sleep(s); yield big.clone()
def in_turn(bl, write):
    for b in bl: write(b)
for gpu_s in (0.6, 1.4):
    for name, how in (("in_turn", in_turn), ("behind", _write_behind)):
        t = time.perf_counter()
        with VideoWriter("/tmp/io_enc.mp4", 1280, 720, 24) as w:
            how(blocks(4, gpu_s), w.write)
        res[f"4_chunks_720p_standin_{gpu_s}s_{name}_s"] = time.perf_counter() - t
for fmt in ("mp4", "matroska"):
    c = collections.Counter()
    for _ in range(60):
        try:
            with av.open(io.BytesIO(), mode="w", format=fmt) as out:
                st = out.add_stream("libx265", rate=24); st.width = st.height = 64; st.pix_fmt = "yuv420p10le"
                st.options = {"x265-params": "log-level=none"}
                for k in range(2):
                    f = av.VideoFrame(64, 64, "yuv420p10le")
                    for pl in f.planes: pl.update(bytes(pl.buffer_size))
                    f.pts = k
                    for p in st.encode(f): out.mux(p)
                for p in st.encode(None): out.mux(p)
            c["ok"] += 1
        except Exception as e:
            c[type(e).__name__] += 1
    res[f"libx265_{fmt}_60_files"] = dict(c)
print(json.dumps(res, indent=1))
