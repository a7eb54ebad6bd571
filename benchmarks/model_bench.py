"""The OASIS DiT and the whole super-resolution call on one GPU, random weights at Wan2.1-1.3B's size.

    python benchmarks/model_bench.py --out benchmarks/results/<date>_<card>_<commit>

Measures, in one run, bf16:
* the 30-layer DiT forward, routed (5 global / 4 intra / 3 window (3,5,5) heads per layer) and
  all-global (every head on the same cuDNN path), at grid A (9,45,80) = 33 frames 720x1280 and
  B (27,45,80) = 105 frames, eager and under torch.compile;
* the sum of its parts: one routed attention layer alone, plus the block's matmuls at the
  card's measured matmul rate, times 30 (how much time is lost between kernels);
* ``OasisVSR`` on 33 LQ frames of 180x320 -> 720x1280, by stage, with our Wan VAE decoder (``--vae``).

Writes ``model_bench.json`` and ``model_bench.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attn_bench import (_check_out_dir, _commit, _Parser, _positive_int, _require_cuda, environment,  # noqa: E402
                        measure_ceilings)

import oasis_kernels as ok  # noqa: E402
from oasis import WanConfig, WanDiT  # noqa: E402

GRIDS = {"A": (9, 45, 80), "B": (27, 45, 80)}
ROUTED = ["global"] * 5 + ["intra"] * 4 + ["window"] * 3


def cuda_ms(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        out.append(start.elapsed_time(stop))
    return out


def summary(times: list[float]) -> dict:
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": len(times)}


def build_dit(cfg: WanConfig, device) -> WanDiT:
    with torch.device("meta"):
        model = WanDiT(cfg)
    model.to_empty(device=device)
    model.init_weights().cast(torch.bfloat16).eval()
    model.set_context(torch.randn(cfg.text_len, cfg.text_dim, device=device) * 0.1)
    return model


def block_matmul_flops(cfg: WanConfig, tokens: int) -> float:
    """Forward FLOPs of one block's matmuls (the constant context's K/V are cached, not counted)."""
    d, f, L = cfg.dim, cfg.ffn_dim, cfg.text_len
    per_token = 4 * d * d + 2 * d * d + 2 * d * f  # self q/k/v/o, cross q/o, FFN in and out
    cross_attention = 2 * L * d  # scores and values against the context
    return 2.0 * tokens * (per_token + cross_attention)


def attention_layer_ms(grid, modes, reps: int, device) -> float:
    n = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(1, n, 12, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    plan = ok.RoutingPlan(grid, modes)
    with torch.no_grad():
        return statistics.median(cuda_ms(lambda: ok.routed_attention(q, k, v, plan), reps, warmup=3))


def bench_dit(model: WanDiT, cfg, args, ceilings, device, mode: str) -> dict:
    """``mode``: "eager" or "regions" (WanDiT.compile_regions, with ``--inductor-options``)."""
    model.compile_regions(mode == "regions", **compile_options(args))
    out = {}
    for name in args.grids:
        grid = GRIDS[name]
        t, h, w = grid
        tokens = t * h * w
        z = torch.randn(1, cfg.in_channels, t, 2 * h, 2 * w, device=device, dtype=torch.bfloat16)
        row = {"grid": grid, "tokens": tokens}
        reps = args.reps if name == "A" else max(2, args.reps // 2)
        for label, routing in (("all_global", None), ("routed", [ROUTED] * cfg.num_layers)):
            model.set_routing(routing)
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with torch.no_grad():
                model(z, 799.0)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            with torch.no_grad():
                row[label] = summary(cuda_ms(lambda: model(z, 799.0), reps))
            row[label]["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            row[label]["first_call_s"] = first
            print(f"{mode} {name} {label}: {row[label]['ms']:.1f} ms (first call {first:.1f} s)", flush=True)
        row["speedup"] = row["all_global"]["ms"] / row["routed"]["ms"]
        attn = {label: attention_layer_ms(grid, modes, 10, device)
                for label, modes in (("routed", ROUTED), ("all_global", ["global"] * 12))}
        mm_ms = block_matmul_flops(cfg, tokens) / (ceilings["matmul_TFLOPs"] * 1e12) * 1e3
        for label in ("routed", "all_global"):
            ideal = cfg.num_layers * (attn[label] + mm_ms)
            row[label].update(attention_layer_ms=attn[label], ideal_ms=ideal, vs_ideal=row[label]["ms"] / ideal)
        row["block_matmul_ms_at_ceiling"] = mm_ms
        print(f"{mode} {name}: speedup {row['speedup']:.2f}x, routed {row['routed']['vs_ideal']:.3f}x its parts",
              flush=True)
        out[name] = row
    return out


def kernel_kind(name: str) -> str:
    n = name.lower()
    if "attn" in n or "fmha" in n or "flash" in n or "sdpa" in n or "_fwd_kernel" in n or "cudnn" in n:
        return "attention"
    if "gemm" in n or "nvjet" in n or "xmma" in n or "cutlass" in n or "sm90" in n:
        return "matmul"
    if n.startswith("triton_"):
        return "fused elementwise (inductor)"
    if "adam" in n or "multi_tensor_apply" in n:
        return "optimizer"
    if "elementwise" in n:
        return "elementwise (eager)"
    if "reduce_kernel" in n:
        return "reduction"
    return "other: " + name[:60]


def kernels_by_kind(prof, top: int = 12) -> dict:
    """A torch.profiler run's GPU time grouped by ``kernel_kind``: {kind: {"ms", "kernels": the
    ``top`` costliest of that kind as {name: (ms, launches)}}}."""
    kinds: dict = {}
    for ev in prof.key_averages():
        us = ev.device_time_total
        if us <= 0:
            continue
        kind = kernel_kind(ev.key).split(":")[0]
        entry = kinds.setdefault(kind, {"ms": 0.0, "kernels": {}})
        entry["ms"] += us / 1e3
        entry["kernels"][ev.key[:90]] = (round(us / 1e3, 3), ev.count)
    for entry in kinds.values():
        entry["kernels"] = dict(sorted(entry["kernels"].items(), key=lambda kv: -kv[1][0])[:top])
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]["ms"]))


def compile_options(args) -> dict:
    """torch.compile's keywords for the regions: Inductor's options from ``--inductor-options``."""
    return {"options": args.inductor_options} if args.inductor_options else {}


def profile_forward(model: WanDiT, cfg, device, args) -> dict:
    """GPU time of one routed forward at A (compiled regions) grouped by kernel kind."""
    from torch.profiler import ProfilerActivity, profile

    t, h, w = GRIDS["A"]
    z = torch.randn(1, cfg.in_channels, t, 2 * h, 2 * w, device=device, dtype=torch.bfloat16)
    model.set_routing([ROUTED] * cfg.num_layers)
    model.compile_regions(**compile_options(args))
    with torch.no_grad():
        model(z, 799.0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(z, 799.0)
            torch.cuda.synchronize()
    kinds = kernels_by_kind(prof)
    print(json.dumps(kinds, indent=1), flush=True)
    return kinds


def bench_compiled(model: WanDiT, cfg, args, device) -> dict:
    out = {}
    model.compile_regions(False)
    compiled = torch.compile(model)
    for name in args.grids:
        t, h, w = GRIDS[name]
        z = torch.randn(1, cfg.in_channels, t, 2 * h, 2 * w, device=device, dtype=torch.bfloat16)
        row = {}
        for label, routing in (("routed", [ROUTED] * cfg.num_layers), ("all_global", None)):
            model.set_routing(routing)
            start = time.perf_counter()
            with torch.no_grad():
                compiled(z, 799.0)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            with torch.no_grad():
                row[label] = summary(cuda_ms(lambda: compiled(z, 799.0), args.reps, warmup=1))
            row[label]["first_call_s"] = first
            print(f"compiled {name} {label}: {row[label]['ms']:.1f} ms (first call {first:.0f} s)", flush=True)
        out[name] = row
    return out


def bench_vsr(model: WanDiT, cfg, args, device) -> dict:
    from oasis.pipeline import OasisVSR
    from oasis.projector import LatentProjector
    from oasis.vae import WanDecoder
    from oasis.wan_vae import WanVAEDecoder

    if args.vae == "diffusers":
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan()
    else:
        vae = WanVAEDecoder()
    vae = vae.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)
    pipe = OasisVSR(model, LatentProjector().to(device), WanDecoder(vae), context=model.context)  # compiles regions
    if args.inductor_options:  # again, with the options
        model.compile_regions(**compile_options(args))
    model.set_routing([ROUTED] * cfg.num_layers)
    video = torch.randint(0, 256, (33, 180, 320, 3), dtype=torch.uint8)
    x = video.permute(3, 0, 1, 2)[None].float().div(127.5).sub(1).to(device)
    stages = {}
    with torch.no_grad():
        for _ in range(2):  # the second round is timed
            torch.cuda.synchronize()
            for name, fn in (("project", lambda: pipe.project(x)), ("dit", lambda: pipe.restore(z_low)),
                             ("decode", lambda: pipe.decode(z_high))):
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                result = fn()
                torch.cuda.synchronize()
                stages[name] = {"s": time.perf_counter() - start, "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}
                if name == "project":
                    z_low = result
                elif name == "dit":
                    z_high = result
    plan = pipe.plan(33, 180, 320)
    torch.cuda.reset_peak_memory_stats()
    calls = []
    for _ in range(3):  # the median of three whole calls, uint8 in and out (the host's share varies)
        start = time.perf_counter()
        out = pipe(video, progress=False)
        torch.cuda.synchronize()
        calls.append(time.perf_counter() - start)
    assert out.shape == (33, 720, 1280, 3)
    res = {"vae": args.vae, "stages": stages, "call_s": statistics.median(calls), "calls_s": calls,
           "call_peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
           "plan": {"chunk_frames": plan.chunk_frames, "tile": plan.tile,
                    "estimated_GiB": plan.estimated_bytes / 2**30},
           "weights_GiB": pipe._weight_bytes() / 2**30}
    print(json.dumps(res, indent=1), flush=True)  # the call's numbers first: the file part may be skipped
    try:
        import av  # noqa: F401
    except ImportError:
        print("to a file: skipped (PyAV is not installed: pip install av)", flush=True)
        res["to_file_skipped"] = "PyAV is not installed"
    else:
        res["to_file"] = bench_to_file(pipe)
    return res


def bench_to_file(pipe, frames: int = 99) -> dict:
    """What ``oasis-vsr`` does after the call: ``frames`` frames 180x320 (three chunks of 33) restored
    into a 720p H.264 file, each chunk written in turn (the GPU idle while it is encoded) or on a thread
    one chunk behind (``oasis.cli._write_behind``: the next chunk restored meanwhile), in turns in one
    process; then 16-bit frames into a 10-bit file (the uint16 path on the GPU). Wall seconds, the
    median of two rounds each."""
    import tempfile

    from oasis.cli import _write_behind
    from oasis.video import VideoWriter

    def in_turn(blocks, write):
        for block in blocks:
            write(block)

    video = torch.randint(0, 256, (frames, 180, 320, 3), dtype=torch.uint8)
    deep = video.to(torch.int32).mul_(257).to(torch.uint16)
    runs = {"in turn": [], "behind": [], "behind, 16-bit frames, 10-bit file": []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(2):
            for name, how, source, pix_fmt in (("in turn", in_turn, video, "yuv420p"),
                                               ("behind", _write_behind, video, "yuv420p"),
                                               ("behind, 16-bit frames, 10-bit file", _write_behind, deep,
                                                "yuv420p10le")):
                start = time.perf_counter()
                with VideoWriter(Path(folder) / "out.mp4", 1280, 720, 24, pix_fmt=pix_fmt) as out:
                    how(pipe.stream(source, chunk_frames=33, progress=False), out.write)
                runs[name].append(time.perf_counter() - start)
    res = {name: {"s": statistics.median(t), "runs_s": t, "frames_per_s": frames / statistics.median(t)}
           for name, t in runs.items()}
    print("to a file:", {k: round(v["s"], 3) for k, v in res.items()}, flush=True)
    return res


def render(results: dict) -> str:
    env = results["env"]
    md = [f"# OASIS DiT and pipeline, {env.get('gpu', 'cpu')}, {env['date'][:10]}, commit {_commit(env, 7)}", "",
          f"torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}; "
          f"bf16, random weights at Wan2.1-1.3B's size (30 layers, dim 1536, 12 heads of 128); routed = 5 global / "
          f"4 intra / 3 window (3,5,5) heads per layer. Matmul ceiling {results['ceilings']['matmul_TFLOPs']:.0f} "
          f"TFLOP/s (8192^3 bf16).", "",
          "| mode | grid | all-global (ms) | routed (ms) | speedup | routed / its parts | all-global / its parts | peak GiB |",
          "|---|---|---|---|---|---|---|---|"]
    rows = [("eager", n, r) for n, r in results.get("dit", {}).items()]
    rows += [("compiled regions", n, r) for n, r in results.get("dit_regions", {}).items()]
    for mode, name, r in rows:
        md.append(f"| {mode} | {name} {tuple(r['grid'])} | {r['all_global']['ms']:.1f} | {r['routed']['ms']:.1f} | "
                  f"{r['speedup']:.2f}x | {r['routed']['vs_ideal']:.3f}x | {r['all_global']['vs_ideal']:.3f}x | "
                  f"{r['routed']['peak_GiB']:.1f} |")
    md += ["", "Parts = 30 x (one attention layer alone + the block's matmul FLOPs at the ceiling)."]
    if results.get("compiled"):
        md += ["", "torch.compile (default mode):", "", "| grid | routed (ms) | all-global (ms) | first call (s) |",
               "|---|---|---|---|"]
        for name, r in results["compiled"].items():
            md.append(f"| {name} | {r['routed']['ms']:.1f} | {r['all_global']['ms']:.1f} | "
                      f"{r['routed']['first_call_s']:.0f} |")
    if results.get("vsr"):
        v = results["vsr"]
        vae = f"diffusers' ({env.get('diffusers')})" if v.get("vae", "diffusers") == "diffusers" else "our"
        md += ["", f"OasisVSR, 33 frames 180x320 -> 720x1280 ({vae} VAE decoder):", "",
               "| stage | s | peak GiB |", "|---|---|---|"]
        for name, s in v["stages"].items():
            md.append(f"| {name} | {s['s']:.3f} | {s['peak_GiB']:.1f} |")
        md.append(f"| whole call (uint8 in and out) | {v['call_s']:.3f} | {v['call_peak_GiB']:.1f} |")
        if v.get("to_file"):
            md += ["", "99 frames 180x320 into a 720p video file (oasis-vsr's loop):", "",
                   "| chunks written | s | frames/s |", "|---|---|---|"]
            md += [f"| {name} | {r['s']:.3f} | {r['frames_per_s']:.1f} |" for name, r in v["to_file"].items()]
        elif v.get("to_file_skipped"):
            md += ["", f"Into a video file: not timed ({v['to_file_skipped']})."]
    return "\n".join(md) + "\n"


def parse_args(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", nargs="+", default=["A", "B"], choices=sorted(GRIDS))
    p.add_argument("--reps", type=_positive_int, default=5)
    p.add_argument("--modes", nargs="+", default=["eager", "regions"], choices=["eager", "regions"],
                   help="eager, and/or the blocks' regions compiled (WanDiT.compile_regions)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model) (the whole model)")
    p.add_argument("--profile", action="store_true", help="kernel time by kind for one routed forward at A")
    p.add_argument("--inductor-options", type=json.loads, default=None, metavar="JSON",
                   help='Inductor options for the compiled regions, e.g. \'{"triton.multi_kernel": 1}\' '
                        "(persistent and looped reductions both compiled, the faster kept)")
    p.add_argument("--vsr", action="store_true", help="also time OasisVSR end to end")
    p.add_argument("--vae", choices=["oasis", "diffusers"], default="oasis", help="the decoder --vsr uses")
    p.add_argument("--out", type=Path, help="folder for model_bench.json / .md")
    args = p.parse_args(argv)
    if args.inductor_options is not None and not isinstance(args.inductor_options, dict):
        p.error(f"--inductor-options: a JSON object of Inductor options, got {args.inductor_options!r}")
    _check_out_dir(p, args.out)
    _require_cuda(p, "model_bench times the DiT at GPU sizes")
    if args.vsr and args.vae == "diffusers":
        import importlib.util

        if importlib.util.find_spec("diffusers") is None:
            p.error("--vae diffusers: diffusers is not installed")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda")
    torch.manual_seed(0)
    cfg = WanConfig()
    compared = ("diffusers",) if args.vsr and args.vae == "diffusers" else ()
    results = {"env": environment(device, libraries=compared), "ceilings": measure_ceilings(device),
               "inductor_options": args.inductor_options}

    def save():  # after every section, so a run cut short keeps what it measured
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "model_bench.json").write_text(json.dumps(results, indent=1, default=str))
            (args.out / "model_bench.md").write_text(render(results))

    model = build_dit(cfg, device)
    if "eager" in args.modes:
        results["dit"] = bench_dit(model, cfg, args, results["ceilings"], device, "eager")
        save()
    if "regions" in args.modes:
        results["dit_regions"] = bench_dit(model, cfg, args, results["ceilings"], device, "regions")
        save()
    if args.profile:
        results["profile"] = profile_forward(model, cfg, device, args)
        save()
    if args.vsr:
        results["vsr"] = bench_vsr(model, cfg, args, device)
        save()
    if args.compile:
        results["compiled"] = bench_compiled(model, cfg, args, device)
        save()
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
