"""The Wan2.1 VAE decoder: diffusers' AutoencoderKLWan.decode against oasis.wan_vae.WanVAEDecoder
(same random weights, bf16), 9 latent frames -> 33 frames 720x1280 by default.

    python benchmarks/vae_bench.py --out benchmarks/results/<date>_<card>_<commit>
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


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, {"s": statistics.median(times), "min_s": min(times), "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--latent", nargs=3, type=int, default=[9, 90, 160], metavar=("T", "H", "W"))
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("vae_bench: needs CUDA; nothing measured")
        return 0
    from diffusers import AutoencoderKLWan

    from oasis.wan_vae import WanVAEConfig, WanVAEDecoder

    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    ref = AutoencoderKLWan().to(dev, dt).eval().requires_grad_(False)
    ours = WanVAEDecoder(WanVAEConfig.from_dict(dict(ref.config))).to(dev).eval().requires_grad_(False)
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))})
    ours.to(dt)
    z = torch.randn(1, 16, *args.latent, device=dev, dtype=dt)
    rows = {}
    with torch.no_grad():
        want, rows["diffusers"] = timed(lambda: ref.decode(z).sample, args.reps)
        print("diffusers", rows["diffusers"], flush=True)
        torch.backends.cudnn.benchmark = True
        _, rows["diffusers, cudnn.benchmark"] = timed(lambda: ref.decode(z).sample, args.reps)
        print("diffusers, cudnn.benchmark", rows["diffusers, cudnn.benchmark"], flush=True)
        variants = [("ours, chunk 1", 1, False, False), ("ours, chunk 1, compiled norms", 1, False, True),
                    ("ours, chunk 2, compiled norms", 2, False, True)]
        for name, chunk, cl, comp in variants:
            fmt = torch.channels_last_3d if cl else torch.contiguous_format
            ours.channels_last(cl).compile_norms(comp)
            got, rows[name] = timed(lambda: ours(z.contiguous(memory_format=fmt), chunk=chunk), args.reps)
            rows[name]["max_abs_diff_vs_diffusers"] = (got.float() - want.float()).abs().max().item()
            print(name, rows[name], flush=True)
    res = {"env": environment(dev), "latent": args.latent, "rows": rows}
    md = [f"# Wan VAE decode, {res['env'].get('gpu')}, {res['env']['date'][:10]}, commit {res['env']['commit'][:7]}", "",
          f"bf16, random weights, latents {args.latent} -> {4 * (args.latent[0] - 1) + 1} frames "
          f"{8 * args.latent[1]}x{8 * args.latent[2]}; median of {args.reps} after a warm-up.", "",
          "| decoder | s | peak GiB | max abs diff vs diffusers |", "|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {r['s']:.3f} | {r['peak_GiB']:.1f} | {r.get('max_abs_diff_vs_diffusers', 0):.3g} |")
    print("\n".join(md))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vae_bench.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "vae_bench.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
