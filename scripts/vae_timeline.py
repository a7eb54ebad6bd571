"""Where a WanVAE decode's (and encode's) wall time goes besides its kernels: the GPU's idle time between
kernels, split by cause, and what the same call costs replayed from a CUDA graph (no host at all).

    python scripts/vae_timeline.py --out DIR [--latent 9 90 160] [--chunk 1] [--piece 2] [--encode-chunk 1]

For each of decode and encode (bf16, random weights, channels-last, each geometry on its tuned cuDNN
engine as ``WanVAE.autotune = True`` does):
- ``wall``: median seconds of a synchronised call; ``enqueue``: the host's time until the call returns
  (the GPU still working when it is much smaller than wall); ``GPU span``: CUDA events recorded as the
  call starts and returns (wall less the host's time around the GPU's); the card's energy a call, power
  and SM clock during those calls and during the profiled one (``benchmarks/card_power.py``);
- from one call under ``torch.profiler``: ``busy``, the union of the GPU's kernel, copy and set
  intervals, and the idle time between them, each gap put down to the host (the next kernel's launch
  began after the previous kernel ended: the host was late by that much) or to the device (the launch
  was queued in time: the GPU's own latency between kernels); the host-late time per part (the decoder's
  and encoder's ``head`` and ``tail`` calls, once a chunk or group) and per aten op around the late launches;
- ``graph``: the whole call captured as one CUDA graph and replayed (median of 5), and the memory the
  capture took: the floor a graphed decode could reach, not a path of the package.
Writes ``vae_timeline.json`` and ``vae_timeline.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from attn_bench import environment  # noqa: E402
from card_power import CardMeter, describe  # noqa: E402

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def timed(fn, reps):
    """(median wall s, median enqueue s, median GPU span s) of ``reps`` synchronised calls; the span runs from
    an event recorded as the call starts to one recorded as it returns (idle GPU time before the call's first
    kernel included)."""
    walls, enq, spans = [], [], []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a.record()
        fn()
        b.record()
        enq.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        spans.append(a.elapsed_time(b) / 1e3)
    return statistics.median(walls), statistics.median(enq), statistics.median(spans)


def metered(fn, calls=1):
    """``fn()`` under :class:`card_power.CardMeter`: (its result, the card's summary per call). The GPU is drained
    first: work still queued from before (the warm-up calls) would count in the window."""
    torch.cuda.synchronize()
    with CardMeter() as meter:
        result = fn()
        torch.cuda.synchronize()
    return result, meter.summary(calls)


def _label_parts(module):
    """Each call of ``module.head`` and ``module.tail`` (the decoder's and encoder's two halves: a clip in chunks
    calls each once a chunk or group) under a profiler label ``head i`` / ``tail i``; restored by the returned
    undo."""
    undo = []
    for part in ("head", "tail"):
        orig = getattr(module, part)
        count = [0]

        def labelled(*a, _orig=orig, _part=part, _count=count, **k):
            with torch.profiler.record_function(f"{_part} {_count[0]}"):
                _count[0] += 1
                return _orig(*a, **k)

        setattr(module, part, labelled)
        undo.append(lambda _part=part: delattr(module, _part))  # the instance attribute gone, the method back
    return lambda: [u() for u in undo]


def gaps(trace: dict) -> dict:
    """The idle time between GPU events of a chrome trace, by cause, chunk and aten op (see the module doc)."""
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in ev if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    launch = {e["args"]["correlation"]: e for e in ev
              if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    ops = sorted((e for e in ev if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    chunks = sorted((e for e in ev if e.get("cat") == "user_annotation" and e["name"].split(" ")[0] in ("head", "tail")),
                    key=lambda e: e["ts"])
    starts = [e["ts"] for e in ops]

    def innermost_op(ts):
        best = None
        for i in range(bisect.bisect_right(starts, ts) - 1, max(-1, bisect.bisect_right(starts, ts) - 400), -1):
            e = ops[i]
            if e["ts"] <= ts <= e["ts"] + e["dur"] and (best is None or e["dur"] < best["dur"]):
                best = e
        return best["name"] if best else "(none)"

    def part_of(ts):
        for e in reversed(chunks):
            if e["ts"] <= ts:
                return e["name"] if ts <= e["ts"] + e["dur"] else f"after {e['name']}"
        return "before the first part"

    busy, host, device = 0.0, 0.0, 0.0
    by_chunk = collections.defaultdict(lambda: [0.0, 0.0, 0.0])  # host-late, device, busy (us)
    by_op = collections.Counter()
    sizes = collections.Counter()
    end = None
    for e in gpu:
        t0, t1 = e["ts"], e["ts"] + e["dur"]
        if end is not None and t0 > end:
            gap = t0 - end
            la = launch.get(e.get("args", {}).get("correlation"))
            late = 0.0 if la is None else min(gap, max(0.0, la["ts"] - end))
            host += late
            device += gap - late
            key = part_of(la["ts"] if la is not None else t0)
            by_chunk[key][0] += late
            by_chunk[key][1] += gap - late
            if late > 0:
                by_op[innermost_op(la["ts"])] += late
            sizes["<2us" if gap < 2 else "2-10us" if gap < 10 else "10-100us" if gap < 100 else ">=100us"] += gap
        lo = t0 if end is None else max(t0, end)
        if t1 > lo:
            busy += t1 - lo
            la = launch.get(e.get("args", {}).get("correlation"))
            by_chunk[part_of(la["ts"] if la is not None else t0)][2] += t1 - lo
        end = t1 if end is None else max(end, t1)
    span = (end - gpu[0]["ts"]) if gpu else 0.0
    return {"events": len(gpu), "span_ms": span / 1e3, "busy_ms": busy / 1e3, "idle_host_late_ms": host / 1e3,
            "idle_device_ms": device / 1e3,
            "by_chunk_ms": {k: [round(x / 1e3, 3) for x in v] for k, v in by_chunk.items()},
            "host_late_by_op_ms": {k: round(v / 1e3, 3) for k, v in by_op.most_common(15)},
            "idle_by_gap_size_ms": {k: round(v / 1e3, 3) for k, v in sizes.items()}}


def profiled(fn, module) -> dict:
    undo = _label_parts(module)
    try:
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    finally:
        undo()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        return gaps(json.loads(Path(f.name).read_text()))


def graphed(fn, reps=5) -> dict:
    """The call captured whole as one CUDA graph: replay seconds (median) and the capture's memory."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    reserved0 = torch.cuda.memory_reserved()
    g = torch.cuda.CUDAGraph()
    t0 = time.perf_counter()
    with torch.cuda.graph(g, stream=side):
        out = fn()
    capture_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    res = {"replay_s": statistics.median(times), "capture_s": capture_s, "capture_peak_GiB": peak / 2**30,
           "reserved_added_GiB": (torch.cuda.memory_reserved() - reserved0) / 2**30}
    del g, out
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", nargs=3, type=int, default=[9, 90, 160], metavar=("T", "H", "W"))
    p.add_argument("--chunk", type=int, default=1)
    p.add_argument("--piece", type=int, default=2)
    p.add_argument("--encode-chunk", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-graph", action="store_true", help="skip the whole-call CUDA graphs")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("vae_timeline.py: needs a CUDA device")
    from oasis import WanVAE

    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    vae = WanVAE().to(dev, dt).eval().requires_grad_(False).channels_last()
    vae.autotune = True
    t, h, w = args.latent
    z = torch.randn(1, 16, t, h, w, device=dev, dtype=dt)
    res = {"env": environment(dev), "latent": args.latent, "chunk": args.chunk, "piece": args.piece,
           "encode_chunk": args.encode_chunk}
    with torch.no_grad():
        video = vae.decode(z, args.chunk, piece_frames=args.piece)
        calls = {"decode": (lambda: vae.decode(z, args.chunk, piece_frames=args.piece), vae.decoder),
                 "encode": (lambda: vae.encode(video, args.encode_chunk), vae.encoder)}
        for name, (fn, module) in calls.items():
            fn()
            fn()  # the tuned engines chosen and built, the kernels loaded
            (wall, enq, span), card = metered(lambda: timed(fn, args.reps), args.reps)
            r = {"wall_s": wall, "enqueue_s": enq, "gpu_span_s": span, "card": card}
            r["profile"], r["card_profiled"] = metered(lambda: profiled(fn, module))
            if not args.no_graph:
                try:
                    r["graph"] = graphed(fn)
                except Exception as e:  # report it, keep going
                    r["graph"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            res[name] = r
            print(name, json.dumps(r), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vae_timeline.json").write_text(json.dumps(res, indent=1, default=str))
    lines = [f"# WanVAE timeline, {res['env'].get('gpu', '')}, {res['env'].get('commit', '')}", "",
             "| call | wall s | enqueue s | GPU span s | GPU busy ms (profiled) | profiled span ms | idle: host late ms "
             "| idle: device ms | graph replay s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in calls:
        r = res[name]
        pr, g = r["profile"], r.get("graph", {})
        lines.append(f"| {name} | {r['wall_s']:.3f} | {r['enqueue_s']:.3f} | {r['gpu_span_s']:.3f} | {pr['busy_ms']:.1f} | "
                     f"{pr['span_ms']:.1f} | "
                     f"{pr['idle_host_late_ms']:.1f} | {pr['idle_device_ms']:.1f} | "
                     f"{g.get('replay_s', float('nan')):.3f} |")
    for name in calls:
        pr = res[name]["profile"]
        lines += ["", f"{name}, the card during the timed calls: " + describe(res[name]["card"]),
                  f"{name}, the card during the profiled call (the profiler's start and end included): "
                  + describe(res[name]["card_profiled"]),
                  f"{name}, per part (host late, device, busy ms): " +
                  "; ".join(f"{k} {v}" for k, v in pr["by_chunk_ms"].items()),
                  f"{name}, host late by op: " + "; ".join(f"{k} {v}" for k, v in pr["host_late_by_op_ms"].items()),
                  f"{name}, idle by gap size: " + json.dumps(pr["idle_by_gap_size_ms"]),
                  f"{name}, graph: " + json.dumps(res[name].get("graph"))]
    md = "\n".join(lines) + "\n"
    (args.out / "vae_timeline.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
