"""Training-data throughput: HQ clips and their degradations (``oasis.data.PairDataset``) per second.

For each mode (consistent, inconsistent) it loads pairs of the paper's size (17 frames 320x640 ->
80x160 LQ, synthetic HQ clips; a video folder with ``--videos``) with ``--workers`` DataLoader
processes: ``--clips`` pairs, or 4 per worker (2 at least) where that is more. It reports the steady rate, from
the arrival of the first wave of clips (one per worker: the workers' start-up and first clip,
reported apart as "first wave s") to the last, the rate over the whole row, and the seconds per clip
and worker this rate implies (what a worker spends on a clip only where the workers set the rate: the
source alone and the degradation side alone tell which side does). The issue's bar: at least 4x the
clips/s a training step consumes; divide a step's clips (batch x accumulate x GPUs) by its seconds
and compare with the steady rate (a trainer's loader starts once and keeps its workers busy).

``--device cuda`` degrades in the main process as ``oasis-train``'s ``degrade_on = "device"`` does:
the workers load HQ clips only, and ``--threads`` threads (``degrade_threads``) degrade them with
that many clips in flight (their first wave: one clip per thread or worker, whichever are more).
With ``--in-workers`` as well, the workers degrade their own clips on that device
(``degrade_on = "workers-device"``: spawned workers, each with a CUDA context; ``--threads`` unused), and
the main process only moves the pairs to the device. A second table degrades HQ clips already in
pinned memory: the degradation side alone, to set against the source alone ("the source alone": one
clip made in the main thread).

``--make-videos N`` first writes N libx264 videos of ``--video-size`` frames into ``--videos`` (a
temporary folder without it) from synthetic clips, so the workers decode real files as a trainer's
``VideoFolder`` does, instead of drawing synthetic clips (~0.3-0.5 s of one core each).

    python benchmarks/degrade_bench.py --workers 0 2 --out benchmarks/results/<date>_<card>_<commit>
    python benchmarks/degrade_bench.py --device cuda --workers 4 --threads 0 4 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attn_bench import (_check_out_dir, _commit, _non_negative_int, _Parser, _positive_int,  # noqa: E402
                        _require_cuda, cpu_name, environment)


def gpu_ms_per_clip(data, device, clips: int = 8) -> float:
    """GPU kernel time one clip's degradations take (what they take from training on the same GPU):
    ``clips`` clips degraded in this thread under the profiler, their kernels' time summed."""
    from torch.profiler import ProfilerActivity, profile

    hqs = [data.source.clip(n) for n in range(clips)]
    data.degrade(hqs[0].to(device), 0)  # warm-up
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for n, hq in enumerate(hqs):
            data.degrade(hq.to(device), n)
        torch.cuda.synchronize(device)
    # kernels only: the HQ clip's copy to the device (a memcpy) is the loader's, not the degradations'
    kernels = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")
               and not e.key.lower().startswith(("memcpy", "memset"))]
    return sum(e.self_device_time_total for e in kernels) / 1e3 / clips


def make_videos(folder: Path, count: int, size) -> None:
    """``count`` libx264 videos (crf 18) of ``size`` = (frames, height, width) synthetic frames, at 25 fps,
    a keyframe at least every 50 frames (2 s, as camera and streaming encoders place them)."""
    from concurrent.futures import ThreadPoolExecutor

    from oasis.video import synthetic_clip, write_video

    folder.mkdir(parents=True, exist_ok=True)

    def one(i):
        write_video(folder / f"synthetic_{i:03d}.mp4", synthetic_clip(*size, seed=1000 + i), 25, crf=18,
                    keyframe_interval=50)

    with ThreadPoolExecutor(min(count, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(count)))


def source_ms_per_clip(make, clips: int = 4) -> float:
    """ms per clip of ``make(index)`` in this thread (after one clip)."""
    make(0)
    t = time.perf_counter()
    for n in range(1, clips + 1):
        make(n)
    return (time.perf_counter() - t) / clips * 1e3


def memory_row(data, device, threads: int, clips: int) -> dict:
    """The degradation side alone: ``clips`` samples degraded from 8 HQ clips held in pinned memory."""
    from oasis.data import DeviceDegrader, _source_frames

    cuda = device.type == "cuda"
    held = [_source_frames(data.source, n) for n in range(8)]
    held = [h.pin_memory() for h in held] if cuda else held
    with DeviceDegrader(device, threads) as degrader:
        degrader.submit(data, [0], held[0][None]).result()  # warm-up
        if cuda:
            torch.cuda.synchronize(device)
        arrivals, pending, start = [], [], time.perf_counter()
        for n in range(clips):
            pending.append(degrader.submit(data, [n], held[n % 8][None]))
            while len(pending) > max(threads, 1):
                arrived(pending.pop(0), device, arrivals)
        while pending:
            arrived(pending.pop(0), device, arrivals)
    total = arrivals[-1] - start
    return {"clips": clips, "s": total, "clips_per_s": clips / total}


class MatmulLoad:
    """A stand-in for the training step beside the degradations: bf16 4096^3 matmuls issued back to back
    on ``device`` from a thread of the main process (a new stream) while ``with`` runs; ``rate`` is their
    TFLOP/s over that time, to set against :func:`matmul_rate_alone` (how much the degradations' GPU work
    and the other processes' CUDA contexts take from a step)."""

    def __init__(self, device):
        import threading

        self.device, self.rate, self._stop = device, None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        a = torch.randn(4096, 4096, device=self.device, dtype=torch.bfloat16)
        count, start = 0, time.perf_counter()
        with torch.cuda.stream(torch.cuda.Stream(self.device)):
            while not self._stop.is_set():
                for _ in range(10):
                    torch.mm(a, a)
                torch.cuda.current_stream(self.device).synchronize()
                count += 10
        self.rate = count * 2 * 4096**3 / (time.perf_counter() - start) / 1e12

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class CardMemory:
    """The card's memory in use by every process (``cudaMemGetInfo``), read every ``interval`` s from a
    thread while ``with`` runs: ``before`` at its start, ``peak`` the most seen. Less the main process's own
    growth (``main_growth``: its caching allocator's peak reserve over its reserve at the start), what the
    peak adds is what processes it does not see took: the loader workers' CUDA contexts and allocators."""

    def __init__(self, device, interval: float = 0.02):
        import threading

        self.device, self.interval = device, interval
        self.before = self.peak = self.main_growth = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            self._stop.wait(self.interval)

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        self._reserved = torch.cuda.memory_reserved(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.before = self.peak = self._used()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used())
        self.main_growth = torch.cuda.max_memory_reserved(self.device) - self._reserved

    @property
    def others(self) -> int:
        """Bytes the other processes added at the peak (not below 0)."""
        return max(self.peak - self.before - self.main_growth, 0)


def matmul_rate_alone(device, seconds: float = 3.0) -> float:
    with MatmulLoad(device) as load:
        time.sleep(seconds)
    return load.rate


def arrived(pending, device, arrivals):
    pending.result()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    arrivals.append(time.perf_counter())


def coder_rows(threads: int, clips: int = 8) -> list[dict]:
    """The JPEG and codec stages alone, in one thread and in ``threads``: whether they release the GIL."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from oasis.degrade import _jpeg, video_roundtrip

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    frames = torch.rand(17, 3, 160, 320, generator=torch.Generator().manual_seed(0))
    arr = (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    stages = {"jpeg": lambda: _jpeg(frames, [60] * 17), "libx264": lambda: video_roundtrip(arr, "libx264", 400_000),
              "mpeg4": lambda: video_roundtrip(np.ascontiguousarray(arr), "mpeg4", 400_000)}
    rows = []
    try:
        for name, stage in stages.items():
            stage()
            t = time.perf_counter()
            for _ in range(clips):
                stage()
            serial = time.perf_counter() - t
            with ThreadPoolExecutor(threads) as pool:
                t = time.perf_counter()
                list(pool.map(lambda _: stage(), range(clips)))
                threaded = time.perf_counter() - t
            rows.append({"stage": name, "threads": threads, "serial_ms": serial / clips * 1e3,
                         "threaded_ms": threaded / clips * 1e3, "speedup": serial / threaded})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        torch.set_num_threads(before)
    return rows


def parse_args(argv=None):
    """The settings, checked before any clip is made: the clip size, the --videos folder (opened here
    unless --make-videos writes it) and the device."""
    from oasis.data import ClipSpec, VideoFolder
    from oasis.degrade import JPEG_IMPLS

    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=_positive_int, default=12)
    p.add_argument("--workers", type=_non_negative_int, nargs="+", default=[0, 2],
                   help="DataLoader workers, each its own rows (0: the main process)")
    p.add_argument("--size", type=_positive_int, nargs=3, default=[17, 320, 640], metavar=("F", "H", "W"))
    p.add_argument("--videos", type=Path, help="a folder of HQ videos instead of synthetic clips")
    p.add_argument("--make-videos", type=_non_negative_int, default=0, metavar="N",
                   help="first write N videos of --video-size synthetic frames (libx264) into --videos (or a "
                        "temporary folder) and read those")
    p.add_argument("--video-size", type=_positive_int, nargs=3, default=[120, 540, 960], metavar=("F", "H", "W"),
                   help="frames and size of the --make-videos videos (a keyframe every 50 frames at most: longer "
                        "videos than 50 + the crop's span have crops that start decoding past their first one)")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   help="degrade on this device in the main process (oasis-train's degrade_on = "
                        "\"device\"), the workers only loading HQ clips; default: in the workers")
    p.add_argument("--in-workers", action="store_true",
                   help="with --device: the workers degrade their clips on it (oasis-train's degrade_on = "
                        "\"workers-device\") instead of the main process's threads")
    p.add_argument("--matmul-load", action="store_true",
                   help="with --device cuda: bf16 matmuls run beside each loader row from a thread of the main "
                        "process, a stand-in for the training step; their TFLOP/s during the row against alone")
    p.add_argument("--threads", type=_non_negative_int, nargs="+", default=[4],
                   help="with --device: degradation threads (oasis-train's degrade_threads; 0: in the loop)")
    p.add_argument("--coders", type=_non_negative_int, default=0,
                   help="also time the CPU stages alone (JPEG, libx264, mpeg4 on a 17x160x320 clip, torch "
                        "single-threaded) in 1 and this many threads: do they run side by side? (0: not timed)")
    p.add_argument("--jpeg", nargs="+", default=["auto"], choices=JPEG_IMPLS,
                   help="DegradeConfig.jpeg_impl for the JPEG steps, each its own rows (auto: PIL for clips on "
                        "the CPU, oasis.jpeg on a GPU)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.in_workers and args.device is None:
        p.error("--in-workers needs --device")
    if args.matmul_load and args.device != "cuda":
        p.error("--matmul-load: the matmuls beside the rows need --device cuda")
    try:
        args.spec = ClipSpec(*args.size)
    except ValueError as exc:
        p.error(f"--size {' '.join(map(str, args.size))}: {exc}")
    args.folder = None
    if args.make_videos:
        if args.videos is not None and args.videos.exists() and not args.videos.is_dir():
            p.error(f"--videos {args.videos}: is a file, not a folder")
        if args.videos is not None and args.videos.is_dir() and any(args.videos.iterdir()):
            p.error(f"--make-videos writes into an empty or new --videos folder; {args.videos} has files")
        frames, height, width = args.video_size
        if frames < args.spec.span or height < args.spec.height or width < args.spec.width:
            p.error(f"--video-size {frames} {height} {width}: smaller than one --size crop "
                    f"({args.spec.span} frames {args.spec.height}x{args.spec.width})")
    elif args.videos is not None:
        try:  # opened now: a missing folder or one without a usable video is said before any timing
            args.folder = VideoFolder(args.videos, args.spec)
        except ValueError as exc:
            p.error(f"--videos: {exc}")
    _check_out_dir(p, args.out)
    if args.device == "cuda":
        _require_cuda(p)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else None
    if args.in_workers:
        args.threads = [0]
    from oasis.data import DeviceDegrader, PairDataset, SyntheticVideos, VideoFolder
    from oasis.degrade import Degradation

    spec = args.spec
    source = args.folder if args.folder is not None else SyntheticVideos(spec)
    if args.make_videos:
        import tempfile

        if args.videos is None:
            args.videos = Path(tempfile.mkdtemp(prefix="oasis-videos-"))
        t = time.perf_counter()
        make_videos(args.videos, args.make_videos, args.video_size)
        print(f"wrote {args.make_videos} videos of {args.video_size} to {args.videos} in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        source = VideoFolder(args.videos, spec)
    from oasis.data import _source_frames

    if args.videos:  # each video's packet index, built once per process, out of the timing
        for path, _ in source.videos:
            source._packet_index(path)
    source_ms = source_ms_per_clip(lambda n: _source_frames(source, n))
    # a video folder's crops decoded from each video's start instead of the keyframe before them
    from_start_ms = source_ms_per_clip(source.frames_from_start) if args.videos else None
    print(json.dumps({"source_ms_per_clip": source_ms, "from_start_ms": from_start_ms}), flush=True)
    rows, memory = [], []
    alone = matmul_rate_alone(device) if args.matmul_load and device is not None and device.type == "cuda" else None
    settings = [(m, j) for m in ("consistent", "inconsistent") for j in args.jpeg]
    for mode, jpeg in settings:
        data = PairDataset(source, Degradation(jpeg_impl=jpeg), mode)
        if device is not None:
            for threads in args.threads:
                memory.append({"mode": mode, "jpeg": jpeg, "threads": threads,
                               **memory_row(data, device, threads, max(args.clips, 4 * threads))})
                print(json.dumps(memory[-1]), flush=True)
        for workers, threads in [(w, t) for w in args.workers for t in (args.threads if device else [0])]:
            # a steady rate needs a clip after the first wave
            clips = max(args.clips, 4 * workers, 4 * threads if device else 0, 2)
            cuda = device is not None and device.type == "cuda"
            loader = torch.utils.data.DataLoader(
                data if device is None else data.on_device_in_workers(device) if args.in_workers else data.hq_only(),
                batch_sampler=[[i] for i in range(clips)], num_workers=workers, pin_memory=cuda,
                multiprocessing_context="spawn" if args.in_workers and cuda and workers else None)
            load = MatmulLoad(device) if args.matmul_load and cuda else contextlib.nullcontext()
            # the workers' GPU memory, where they degrade on the GPU (oasis.train.DEGRADE_WORKER_BYTES' measure)
            card = CardMemory(device) if args.in_workers and cuda and workers else contextlib.nullcontext()
            with card, load:  # bf16 matmuls beside the row, where asked
                start = time.perf_counter()
                arrivals = []
                if args.in_workers:  # (lq, hq) degraded by the workers: onto the device, as the trainer takes them
                    for lq, hq in loader:
                        lq, hq = lq.to(device, non_blocking=True), hq.to(device, non_blocking=True)
                        if cuda:
                            torch.cuda.synchronize(device)
                        arrivals.append(time.perf_counter())
                elif device is None:
                    for _ in loader:
                        arrivals.append(time.perf_counter())
                else:  # (index, HQ clip): degraded here, as the trainer does, `threads` clips in flight
                    with DeviceDegrader(device, threads) as degrader:
                        pending = []
                        for a, b in loader:
                            pending.append(degrader.submit(data, a.tolist(), b))
                            while len(pending) > threads:
                                arrived(pending.pop(0), device, arrivals)
                        while pending:
                            arrived(pending.pop(0), device, arrivals)
            wave = max(workers, threads, 1)  # the first wave: every worker's (thread's) start-up and first clip
            total = arrivals[-1] - start
            steady = (len(arrivals) - wave) / (arrivals[-1] - arrivals[wave - 1])
            on = ("workers on " if args.in_workers else "") + (args.device or "workers")
            row = {"mode": mode, "jpeg": jpeg, "workers": workers, "degrade_on": on, "threads": threads,
                   "clips": len(arrivals),
                   "s": total,
                   "first_wave_s": arrivals[wave - 1] - start, "clips_per_s": steady,
                   "clips_per_s_whole_row": len(arrivals) / total,
                   # the seconds a clip would cost each of the first wave's workers (or threads) if they
                   # set the rate; the source alone and the degradation side alone say which does
                   "s_per_clip_per_worker_at_this_rate": wave / steady,
                   "matmul_TFLOPs_beside": getattr(load, "rate", None),
                   "workers_gpu_bytes": getattr(card, "others", None)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    coders = coder_rows(args.coders) if args.coders else []
    gpu_ms = {}
    if device is not None and device.type == "cuda":
        for mode, jpeg in settings:
            gpu_ms[f"{mode}, {jpeg}"] = gpu_ms_per_clip(PairDataset(source, Degradation(jpeg_impl=jpeg), mode), device)
            print(json.dumps({"gpu_ms_per_clip": gpu_ms}), flush=True)
    res = {"matmul_TFLOPs_alone": alone,
           "coders": coders, "gpu_ms_per_clip": gpu_ms, "source_ms_per_clip": source_ms, "source_from_start_ms_per_clip": from_start_ms,
           "memory_rows": memory, "cpu_count": os.cpu_count(), "size": args.size,
           # the libraries the degradations go through: PyAV's codecs, Pillow's JPEG
           "env": environment(device if device is not None else torch.device("cpu"), libraries=("av", "Pillow")),
           "source": str(args.videos) if args.videos else "synthetic", "rows": rows}
    if args.make_videos:
        res["source"] = f"{args.make_videos} libx264 videos of {args.video_size[0]} frames {args.video_size[1]}x" \
                        f"{args.video_size[2]} (synthetic frames, crf 18, a keyframe every 50 frames at most)"
    res["env"]["cpu"] = cpu_name()
    gpu = f" + {res['env']['gpu']}" if "gpu" in res["env"] else ""
    where = "in the workers" if not args.device else \
        f"on {args.device} in the {'workers' if args.in_workers else 'main process'}"
    md = [f"# Training-data throughput, {res['env']['cpu']} x{os.cpu_count()}{gpu}, {res['env']['date'][:10]}, "
          f"commit {_commit(res['env'], 7)}", "",
          f"PyAV {res['env']['av']}, Pillow {res['env']['Pillow']}, torch {res['env']['torch']}.", "",
          f"{args.size[0]} frames {args.size[1]}x{args.size[2]} -> x4 LQ, {res['source']} clips, "
          f"max({args.clips}, 4 x workers) per row, DataLoader workers (0: the main process). Steady clips/s: "
          "after the first wave (one clip per worker, with the workers' start-up).", "",
          f"Degradations run {where}.",
          "", "| mode | JPEG | workers | degradation threads | clips | steady clips/s | whole-row clips/s | "
          "first wave s | s per clip per worker at this rate |", "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['mode']} | {r['jpeg']} | {r['workers']} | {r['threads'] if args.device else '-'} | {r['clips']} | "
           f"{r['clips_per_s']:.2f} | {r['clips_per_s_whole_row']:.2f} | {r['first_wave_s']:.1f} | "
           f"{r['s_per_clip_per_worker_at_this_rate']:.2f} |" for r in rows]
    if alone:
        md += ["", f"bf16 4096^3 matmuls from a thread of the main process beside each row (a stand-in for the "
               f"training step), against {alone:.0f} TFLOP/s alone:", "",
               "| mode | workers | threads | TFLOP/s beside | of alone |", "|---|---|---|---|---|"]
        md += [f"| {r['mode']} | {r['workers']} | {r['threads']} | {r['matmul_TFLOPs_beside']:.0f} | "
               f"{r['matmul_TFLOPs_beside'] / alone:.2f} |" for r in rows if r["matmul_TFLOPs_beside"]]
    held = [r for r in rows if r["workers_gpu_bytes"] is not None]
    if held:
        md += ["", "GPU memory the workers held at the row's peak: the card's use (every process) less its use "
               "before the row and the main process's own growth:", "",
               "| mode | workers | GiB in all | GiB a worker |", "|---|---|---|---|"]
        md += [f"| {r['mode']} | {r['workers']} | {r['workers_gpu_bytes'] / 2**30:.2f} | "
               f"{r['workers_gpu_bytes'] / r['workers'] / 2**30:.2f} |" for r in held]
    md += ["", f"The source alone: {source_ms:.0f} ms per HQ clip in the main thread" +
           (f" ({from_start_ms:.0f} ms decoding each video from its start)." if from_start_ms else ".")]
    if memory:
        md += ["", "The degradation side alone (HQ clips in pinned memory):", "",
               "| mode | JPEG | degradation threads | clips | clips/s |", "|---|---|---|---|---|"]
        md += [f"| {r['mode']} | {r['jpeg']} | {r['threads']} | {r['clips']} | {r['clips_per_s']:.2f} |" for r in memory]
    if gpu_ms:
        md += ["", "GPU kernel time per clip (8 clips degraded in one thread under the profiler): " +
               ", ".join(f"{k}: {v:.1f} ms" for k, v in gpu_ms.items()) + "."]
    if coders:
        md += ["", f"The CPU stages alone (17x160x320 uint8, torch single-threaded), 8 clips in 1 and {args.coders} "
               "threads:", "", "| stage | ms per clip, 1 thread | ms per clip, threads | speedup |", "|---|---|---|---|"]
        md += [f"| {r['stage']} | {r['serial_ms']:.1f} | {r['threaded_ms']:.1f} | {r['speedup']:.2f} |" for r in coders]
    print("\n".join(md))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "degrade_bench.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "degrade_bench.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
