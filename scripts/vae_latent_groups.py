"""The Wan VAE with its latent-size layers on groups of latent frames (``oasis.wan_vae.LATENT_STAGE_FRAMES``):
decode and encode of 33 frames 720x1280 for each group size, in turns within one process (docs/PERF.md entry 18v).

    python scripts/vae_latent_groups.py --out DIR [--groups 1 3 5 9] [--rounds 2] [--reps 3]

Group 1 is the decode and encode before the grouping (each chunk's latent frame through those layers alone); the
first group of ``--groups`` (1 by default) is the reference of the difference column.
bf16, random weights, channels-last, each geometry on its tuned cuDNN engine (``WanVAE.autotune = True``), chunk 1
and 2-frame pieces (the defaults of ``oasis.vae.WanDecoder``), encode chunk 1. Per group size: the median wall
seconds over all rounds, the peak memory above the inputs, and the largest difference from the first group's output.
Writes ``vae_latent_groups.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from attn_bench import environment  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", nargs=3, type=int, default=[9, 90, 160], metavar=("T", "H", "W"))
    p.add_argument("--groups", nargs="+", type=int, default=[1, 3, 5, 9])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("vae_latent_groups.py: needs a CUDA device")
    from oasis import WanVAE, wan_vae

    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    vae = WanVAE().to(dev, dt).eval().requires_grad_(False).channels_last()
    vae.autotune = True
    z = torch.randn(1, 16, *args.latent, device=dev, dtype=dt)
    calls = {"decode": lambda: vae.decode(z, 1, piece_frames=2)}
    times = {(c, g): [] for c in ("decode", "encode") for g in args.groups}
    peaks, outs = {}, {}
    with torch.no_grad():
        video = vae.decode(z, 1, piece_frames=2)
        calls["encode"] = lambda: vae.encode(video, 1)
        for g in args.groups:  # warm-up: every geometry tuned and built before any timing
            wan_vae.LATENT_STAGE_FRAMES = g
            for name, fn in calls.items():
                fn()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                y = fn()
                torch.cuda.synchronize()
                peaks[(name, g)] = (torch.cuda.max_memory_allocated() - base) / 2**30
                outs[(name, g)] = y.float().cpu()
                del y
        for _ in range(args.rounds):
            for g in args.groups:
                wan_vae.LATENT_STAGE_FRAMES = g
                for name, fn in calls.items():
                    for _ in range(args.reps):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        fn()
                        torch.cuda.synchronize()
                        times[(name, g)].append(time.perf_counter() - t0)
    rows = []
    for (name, g), ts in times.items():
        ref = outs[(name, args.groups[0])]
        rows.append({"call": name, "group": g, "s": statistics.median(ts), "min_s": min(ts), "runs_s": ts,
                     "peak_above_inputs_GiB": peaks[(name, g)],
                     "max_abs_diff_vs_first": (outs[(name, g)] - ref).abs().max().item()})
        print(json.dumps(rows[-1]), flush=True)
    res = {"env": environment(dev), "latent": args.latent, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vae_latent_groups.json").write_text(json.dumps(res, indent=1, default=str))
    md = [f"# WanVAE, the latent-size layers on groups of latent frames, {res['env'].get('gpu')}, "
          f"{res['env'].get('commit')}", "",
          f"Decode chunk 1, 2-frame pieces, and encode chunk 1, latents {args.latent}; median of {args.rounds} rounds "
          f"x {args.reps} in turns.", "",
          "| call | group | s | min s | peak above inputs GiB | max abs diff vs group " f"{args.groups[0]} |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['call']} | {r['group']} | {r['s']:.4f} | {r['min_s']:.4f} | {r['peak_above_inputs_GiB']:.3f} | "
           f"{r['max_abs_diff_vs_first']:.4g} |" for r in rows]
    (args.out / "vae_latent_groups.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
