"""The OASIS DiT's training step on one GPU: forward + backward + AdamW at the paper's clip.

17 frames 320x640 give latents [B, 16, 5, 40, 80] and the token grid (5, 20, 40) = 4000 tokens per
clip. Random weights at Wan2.1-1.3B's size, float32 master weights, bf16 autocast, activation
checkpointing per block on (``--no-checkpointing`` for off); routed (5 global / 4 intra / 3 window
heads per layer) and all-global in the same run, for each batch in ``--batches`` until one does not fit.
Reports the median step time, tokens/s, peak memory and the model FLOPs utilisation: the step's
FLOPs (the block matmuls x 3 for forward + backward, the attention of the heads as routed: global
4 N^2 d, intra 4 N (H W) d, window 4 N 75 d per head forward, x 3.5 with the backward; the
checkpointed forward's recompute not counted) over the bf16 matmul rate measured in the same run.

    python benchmarks/train_bench.py --out benchmarks/results/<date>_<card>_<commit>
    python benchmarks/train_bench.py --tiny --device cpu --steps 1        # a smoke run of the code
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
from attn_bench import environment  # noqa: E402
from conv_bench import gemm_time  # noqa: E402
from model_bench import ROUTED, block_matmul_flops  # noqa: E402

from oasis import WanConfig, WanDiT  # noqa: E402

TINY = WanConfig(dim=48, ffn_dim=96, num_heads=3, num_layers=2, text_dim=32, text_len=8, freq_dim=32)


def step_flops(cfg: WanConfig, grid, modes_per_layer, batch: int) -> float:
    """Model FLOPs of one training step (forward + backward) for ``batch`` clips."""
    t, h, w = grid
    n, d = t * h * w, cfg.dim // cfg.num_heads
    per_mode = {"global": 4.0 * n * n * d, "intra": 4.0 * n * h * w * d, "window": 4.0 * n * min(75, n) * d}
    attention = sum(per_mode[m] for modes in modes_per_layer for m in modes)
    matmuls = cfg.num_layers * block_matmul_flops(cfg, n)
    return batch * (3.0 * matmuls + 3.5 * attention)


def timed_steps(model, opt, latents, t, steps: int, device, autocast) -> list[float]:
    times = []
    for i in range(steps + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            v = model(latents, t)
        v.float().square().mean().backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny demo config (for a smoke run of this script)")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="the blocks' regions around the attention compiled (WanDiT.compile_regions; "
                        "oasis-train's compile = true)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("train_bench: needs CUDA (or --device cpu --tiny); nothing measured")
        return 0
    cfg = TINY if args.tiny else WanConfig()
    latent = (5, 8, 16) if args.tiny else (5, 40, 80)
    grid = (latent[0], latent[1] // 2, latent[2] // 2)
    autocast = device.type == "cuda"
    rate = 2 * 8192**3 / gemm_time(8192, 8192, 8192, device, 10) if device.type == "cuda" else None
    torch.manual_seed(0)
    model = WanDiT(cfg).init_weights().to(device).train()
    model.set_context(torch.randn(cfg.text_len, cfg.text_dim, device=device) * 0.1)
    model.activation_checkpointing = not args.no_checkpointing
    if args.compile:
        model.compile_regions()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999))
    routed = [ROUTED] * cfg.num_layers if not args.tiny else [["global", "intra", "window"]] * cfg.num_layers
    rows = []
    for name, routing in (("routed", routed), ("all-global", None)):
        model.set_routing(routing)
        modes = [["global"] * cfg.num_heads] * cfg.num_layers if routing is None else routing
        for batch in args.batches:
            latents = torch.randn(batch, cfg.in_channels, *latent, device=device)
            t = torch.full((batch,), 799.0, device=device)
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times = timed_steps(model, opt, latents, t, args.steps, device, autocast)
            except torch.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                rows.append({"mode": name, "batch": batch, "fits": False})
                print(json.dumps(rows[-1]), flush=True)
                break
            s = statistics.median(times)
            flops = step_flops(cfg, grid, modes, batch)
            row = {"mode": name, "batch": batch, "fits": True, "step_s": s, "tokens_per_s": batch * grid[0] * grid[1]
                   * grid[2] / s, "TFLOP": flops / 1e12, "TFLOP/s": flops / s / 1e12,
                   "mfu": None if rate is None else flops / s / rate,
                   "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
    res = {"env": environment(device), "config": "tiny" if args.tiny else "Wan2.1-1.3B", "grid": grid,
           "checkpointing": not args.no_checkpointing, "compiled_regions": args.compile,
           "matmul_TFLOP/s": None if rate is None else rate / 1e12,
           "rows": rows}
    one = {r["mode"]: r for r in rows if r.get("fits") and r["batch"] == 1}
    if "routed" in one and "all-global" in one:
        res["routed_speedup_batch1"] = one["all-global"]["step_s"] / one["routed"]["step_s"]
    md = [f"# OASIS DiT training step, {res['env'].get('gpu', res['env'].get('cpu'))}, {res['env']['date'][:10]}, "
          f"commit {res['env']['commit'][:7]}", "",
          f"{res['config']}, grid {grid} per clip (17 frames 320x640), float32 weights, bf16 autocast, "
          f"activation checkpointing {'on' if res['checkpointing'] else 'off'}, "
          f"{'compiled regions' if args.compile else 'eager'}, AdamW; median of {args.steps} steps "
          f"after a warm-up. bf16 GEMM 8192^3: {res['matmul_TFLOP/s'] or 0:.0f} TFLOP/s.", "",
          "| mode | batch | step s | tokens/s | TFLOP/s | MFU | peak GiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["fits"]:
            md.append(f"| {r['mode']} | {r['batch']} | out of memory | | | | |")
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.0f}%"
        peak = "-" if r["peak_GiB"] is None else f"{r['peak_GiB']:.1f}"
        md.append(f"| {r['mode']} | {r['batch']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                  f"{r['TFLOP/s']:.1f} | {mfu} | {peak} |")
    if "routed_speedup_batch1" in res:
        md += ["", f"Routed against all-global at batch 1: {res['routed_speedup_batch1']:.2f}x."]
    print("\n".join(md))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_bench.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "train_bench.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
