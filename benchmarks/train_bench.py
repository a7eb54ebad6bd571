"""The OASIS DiT's training step on one GPU: forward + backward + AdamW at the paper's clip.

17 frames 320x640 give latents [B, 16, 5, 40, 80] and the token grid (5, 20, 40) = 4000 tokens per
clip. Random weights at Wan2.1-1.3B's size, float32 master weights, bf16 autocast, activation
checkpointing on every block (``--checkpoint-blocks`` times other numbers of blocks, 0 for off), AdamW
fused (``--adamw fused foreach`` times both); routed (5 global / 4 intra / 3 window heads per layer)
and all-global in the same run, for each batch in ``--batches`` until one does not fit.
Reports the median step time, tokens/s, peak memory and the model FLOPs utilisation: the step's
FLOPs (the block matmuls x 3 for forward + backward, the attention of the heads as routed: global
4 N^2 d, intra 4 N (H W) d, window 4 N 75 d per head forward, x 3.5 with the backward; the
checkpointed forward's recompute not counted) over the bf16 matmul rate measured in the same run:
over the whole step ("MFU"), and over its forward + backward without AdamW's step ("fwd+bwd MFU",
where AdamW is timed apart, not under --step-graph).

    python benchmarks/train_bench.py --out benchmarks/results/<date>_<card>_<commit>
    python benchmarks/train_bench.py --tiny --device cpu --steps 1        # a smoke run of the code

On the CPU (``--device cpu``) the step runs in float32 without autocast and no matmul rate is
measured, so no MFU is given; the report says so.
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
from attn_bench import _check_out_dir, _commit, _Parser, _positive_int, _require_cuda, environment  # noqa: E402
from conv_bench import gemm_time  # noqa: E402
from model_bench import ROUTED, block_matmul_flops  # noqa: E402

from oasis import WanConfig, WanDiT  # noqa: E402
from oasis.train import COMPILE_MODES, compile_dit  # noqa: E402

TINY = WanConfig(dim=48, ffn_dim=96, num_heads=3, num_layers=2, text_dim=32, text_len=8, freq_dim=32)


def step_flops(cfg: WanConfig, grid, modes_per_layer, batch: int) -> float:
    """Model FLOPs of one training step (forward + backward) for ``batch`` clips."""
    t, h, w = grid
    n, d = t * h * w, cfg.dim // cfg.num_heads
    per_mode = {"global": 4.0 * n * n * d, "intra": 4.0 * n * h * w * d, "window": 4.0 * n * min(75, n) * d}
    attention = sum(per_mode[m] for modes in modes_per_layer for m in modes)
    matmuls = cfg.num_layers * block_matmul_flops(cfg, n)
    return batch * (3.0 * matmuls + 3.5 * attention)


def forward_backward(model, latents, t, device_type: str, autocast: bool, cast_cache: bool = True) -> None:
    """The step's forward (bf16 autocast where ``autocast``) and the backward of its loss."""
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=cast_cache):
        v = model(latents, t)
    v.float().square().mean().backward()


def one_step(model, opt, latents, t, device, autocast) -> tuple[float, float]:
    """One training step: (forward + backward seconds, optimizer seconds), synchronised between."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    forward_backward(model, latents, t, device.type, autocast)
    sync()
    middle = time.perf_counter()
    opt.step()
    sync()
    return middle - start, time.perf_counter() - middle


def timed_steps(model, opt, latents, t, steps: int, device, autocast, warmup: int = 1) -> list[tuple[float, float]]:
    """``steps`` steps after ``warmup`` (whose compiles, graph recordings and allocations are not counted)."""
    for _ in range(warmup):
        one_step(model, opt, latents, t, device, autocast)
    return [one_step(model, opt, latents, t, device, autocast) for _ in range(steps)]


def graphed_steps(model, opt, latents, t, steps: int, warmup: int = 3) -> list[tuple[float, None]]:
    """The whole step (forward, backward, AdamW) captured as one CUDA graph after ``warmup`` eager
    steps on a side stream (PyTorch's whole-network capture; AdamW ``capturable``), then replayed
    ``steps`` times: the step without the host's share. (seconds, None) per replay."""
    def body():
        forward_backward(model, latents, t, "cuda", True, cast_cache=False)  # no cast cache across replays
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # the captured backward makes the gradients, in the graph's memory
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start, None))
    opt.zero_grad(set_to_none=True)
    del graph
    return times


def profile_step(model, opt, latents, t, device) -> dict:
    """GPU time of one step by kernel kind, and the step's wall time against its kernels' sum (the
    difference is where the GPU waits for the host, or kernels overlap)."""
    from model_bench import kernels_by_kind
    from torch.profiler import ProfilerActivity, profile

    one_step(model, opt, latents, t, device, True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd_bwd, optimizer = one_step(model, opt, latents, t, device, True)
    kinds = kernels_by_kind(prof)
    return {"wall_ms": 1e3 * (fwd_bwd + optimizer), "optimizer_wall_ms": 1e3 * optimizer,
            "kernel_ms": sum(k["ms"] for k in kinds.values()), "kinds": kinds}


def parse_args(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=_positive_int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--steps", type=_positive_int, default=5)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="default cuda (cpu: with --tiny)")
    p.add_argument("--tiny", action="store_true", help="the tiny demo config (for a smoke run of this script)")
    p.add_argument("--no-checkpointing", action="store_true", help="the same as --checkpoint-blocks 0")
    p.add_argument("--checkpoint-blocks", type=int, nargs="+",
                   help="numbers of blocks with activation checkpointing, each timed (default: all blocks); "
                        "the rest keep their activations")
    p.add_argument("--adamw", nargs="+", choices=("fused", "foreach"), default=["fused"],
                   help="AdamW implementations, each timed (oasis-train uses fused)")
    p.add_argument("--step-graph", action="store_true",
                   help="capture each setting's whole step (forward, backward, AdamW) as one CUDA graph and "
                        "time its replays (CUDA only; not with --compile graphs)")
    p.add_argument("--modes", nargs="+", choices=("routed", "all-global"), default=["routed", "all-global"],
                   help="the routings timed (each compiles anew under --compile graphs)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one routed step at the first batch: GPU time by kernel kind (CUDA only)")
    p.add_argument("--compile", nargs="?", const="regions", choices=COMPILE_MODES,
                   help="compile the DiT as oasis-train's compile setting does: regions (the blocks' code "
                        "around the attention; the default without a value), graphs (the whole DiT compiled "
                        "and replayed as CUDA graphs)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.step_graph and (args.device != "cuda" or args.compile == "graphs"):
        p.error("--step-graph needs --device cuda and another --compile than graphs")
    if args.profile and args.device != "cuda":
        p.error("--profile: profiles GPU kernels; needs --device cuda")
    if args.no_checkpointing and args.checkpoint_blocks:
        p.error("--no-checkpointing and --checkpoint-blocks: give one of them")
    layers = (TINY if args.tiny else WanConfig()).num_layers  # known before the model is built
    outside = [k for k in args.checkpoint_blocks or [] if not 0 <= k <= layers]
    if outside:
        p.error(f"--checkpoint-blocks: a number of blocks in 0..{layers} (the {'tiny' if args.tiny else 'Wan2.1-1.3B'} "
                f"DiT's), got {' '.join(map(str, outside))}")
    _check_out_dir(p, args.out)
    if args.device == "cuda":
        _require_cuda(p, "--device cuda")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    cfg = TINY if args.tiny else WanConfig()
    latent = (5, 8, 16) if args.tiny else (5, 40, 80)
    grid = (latent[0], latent[1] // 2, latent[2] // 2)
    autocast = device.type == "cuda"
    rate = 2 * 8192**3 / gemm_time(8192, 8192, 8192, device, 10) if device.type == "cuda" else None
    torch.manual_seed(0)
    model = WanDiT(cfg).init_weights().to(device).train()
    model.set_context(torch.randn(cfg.text_len, cfg.text_dim, device=device) * 0.1)
    compile_dit(model, args.compile or False, device)
    routed = [ROUTED] * cfg.num_layers if not args.tiny else [["global", "intra", "window"]] * cfg.num_layers
    checkpointing = [0] if args.no_checkpointing else args.checkpoint_blocks or [cfg.num_layers]
    rows = []
    profile = None
    for impl in args.adamw:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), capturable=args.step_graph,
                                **{impl: True})
        for blocks in checkpointing:
            model.activation_checkpointing = blocks
            for name, routing in [(n, r) for n, r in (("routed", routed), ("all-global", None)) if n in args.modes]:
                if args.compile == "graphs":
                    # each setting compiles the whole model anew: forget the last one's graphs, or
                    # their count reaches torch.compile's recompile limit (an error under fullgraph)
                    torch._dynamo.reset()
                model.set_routing(routing)
                modes = [["global"] * cfg.num_heads] * cfg.num_layers if routing is None else routing
                for batch in args.batches:
                    latents = torch.randn(batch, cfg.in_channels, *latent, device=device)
                    t = torch.full((batch,), 799.0, device=device)
                    setting = {"adamw": impl, "checkpointed_blocks": blocks, "mode": name, "batch": batch,
                               "step_graph": args.step_graph}
                    try:
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        if args.step_graph:
                            times = graphed_steps(model, opt, latents, t, args.steps)
                        else:  # CUDA graphs of --compile graphs: recorded on a shape's second call
                            times = timed_steps(model, opt, latents, t, args.steps, device, autocast,
                                                warmup=2 if args.compile == "graphs" else 1)
                        if args.profile and profile is None and name == "routed" and device.type == "cuda":
                            profile = {**setting, **profile_step(model, opt, latents, t, device)}
                    except torch.OutOfMemoryError:
                        opt.zero_grad(set_to_none=True)
                        torch.cuda.empty_cache()
                        rows.append({**setting, "fits": False})
                        print(json.dumps(rows[-1]), flush=True)
                        break
                    s = statistics.median(a + (b or 0.0) for a, b in times)
                    flops = step_flops(cfg, grid, modes, batch)
                    optimizer_s = None if args.step_graph else statistics.median(b for _, b in times)
                    row = {**setting, "fits": True, "step_s": s, "optimizer_s": optimizer_s,
                           "tokens_per_s": batch * grid[0] * grid[1] * grid[2] / s, "TFLOP": flops / 1e12,
                           "TFLOP/s": flops / s / 1e12, "mfu": None if rate is None else flops / s / rate,
                           "fwd_bwd_mfu": None if rate is None or optimizer_s is None else
                           flops / statistics.median(a for a, _ in times) / rate,
                           "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        del opt
    res = {"env": environment(device), "config": "tiny" if args.tiny else "Wan2.1-1.3B", "grid": grid,
           "compile": args.compile, "matmul_TFLOP/s": None if rate is None else rate / 1e12,
           "rows": rows, "profile": profile}
    res["routed_speedup_batch1"] = {}
    for r in rows:
        if r["mode"] == "routed" and r["batch"] == 1 and r["fits"]:
            other = [o for o in rows if o["mode"] == "all-global" and o["fits"] and o["batch"] == 1
                     and (o["adamw"], o["checkpointed_blocks"]) == (r["adamw"], r["checkpointed_blocks"])]
            if other:
                res["routed_speedup_batch1"][f"{r['adamw']}, {r['checkpointed_blocks']} checkpointed"] = \
                    other[0]["step_s"] / r["step_s"]
    frames, height, width = 4 * (latent[0] - 1) + 1, 8 * latent[1], 8 * latent[2]
    numerics = "float32 weights, bf16 autocast" if autocast else "float32 weights and math (no autocast)"
    rate_text = (f"bf16 GEMM 8192^3: {res['matmul_TFLOP/s']:.0f} TFLOP/s." if rate is not None else
                 "No matmul rate measured on the CPU, so no MFU.")
    md = [f"# OASIS DiT training step, {res['env'].get('gpu', res['env'].get('cpu'))}, {res['env']['date'][:10]}, "
          f"commit {_commit(res['env'], 7)}", "",
          f"{res['config']}, grid {grid} per clip ({frames} frames {height}x{width}), {numerics}, "
          f"{f'compiled: {args.compile}' if args.compile else 'eager'}"
          f"{', each step replayed as one CUDA graph' if args.step_graph else ''}; median of {args.steps} steps after a warm-up; "
          f"'optimizer s' is AdamW's step alone. Checkpointed blocks of {cfg.num_layers}. {rate_text}", "",
          "| AdamW | checkpointed | mode | batch | step s | optimizer s | tokens/s | TFLOP/s | MFU | fwd+bwd MFU | "
          "peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['adamw']} | {r['checkpointed_blocks']} | {r['mode']} | {r['batch']} |"
        if not r["fits"]:
            md.append(f"{head} out of memory | | | | | | |")
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.0f}%"
        fb_mfu = "-" if r["fwd_bwd_mfu"] is None else f"{100 * r['fwd_bwd_mfu']:.0f}%"
        peak = "-" if r["peak_GiB"] is None else f"{r['peak_GiB']:.1f}"
        opt_s = "in the graph" if r["optimizer_s"] is None else f"{r['optimizer_s']:.3f}"
        md.append(f"{head} {r['step_s']:.3f} | {opt_s} | {r['tokens_per_s']:.0f} | "
                  f"{r['TFLOP/s']:.1f} | {mfu} | {fb_mfu} | {peak} |")
    for key, x in res["routed_speedup_batch1"].items():
        md.append(f"\nRouted against all-global at batch 1 ({key}): {x:.2f}x.")
    if profile is not None:
        md += ["", f"One routed step profiled (AdamW {profile['adamw']}, {profile['checkpointed_blocks']} checkpointed, "
                   f"batch {profile['batch']}): wall {profile['wall_ms']:.1f} ms (AdamW {profile['optimizer_wall_ms']:.1f}), "
                   f"kernels {profile['kernel_ms']:.1f} ms.", "", "| kernel kind | ms |", "|---|---|"]
        md += [f"| {kind} | {v['ms']:.1f} |" for kind, v in profile["kinds"].items()]
    print("\n".join(md))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_bench.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "train_bench.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
