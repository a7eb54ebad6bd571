"""The Wan VAE's decode and encode under two or more ``WanVAE.conv_kernel`` settings, in interleaved rounds.

A decode in a loop runs at the card's power limit (docs/PERF.md entry 18z), so its time drifts with the card's
temperature and clock over a run; settings timed one after the other (as vae_bench's variants are) see different
cards. Here each round times every setting in turn (vae_bench's ``timed``): one untimed call, ``--calls`` timed ones
back to back, the card's energy, power and SM clock measured meanwhile (benchmarks/card_power.py), then one for its
output. Each setting's output in the first round is compared with the first setting's (max abs difference).

    python benchmarks/vae_ab.py --out benchmarks/results/<date>_<card>_<commit>/ab [--kernels cudnn auto cuda]
        [--rounds 3] [--calls 5] [--what decode encode] [--latent 9 90 160]

Random weights (Wan2.1's config, bf16, channels-last, autotuned cuDNN engines), random latents ``[1, 16, T, H, W]``
and a random clip of the matching ``4 (T - 1) + 1`` frames of ``8H x 8W``; decode in chunks of 1 latent frame and
2-frame pieces, encode in chunks of 1 (the defaults OasisVSR and the trainer use). Writes ``vae_ab.json`` and
``vae_ab.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attn_bench import _check_out_dir, _commit, _Parser, _positive_int, _require_cuda, environment  # noqa: E402
from card_power import describe  # noqa: E402
from vae_bench import timed  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from oasis.wan_vae import CONV_KERNELS  # noqa: E402

CALLS = ("decode", "encode")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", nargs="+", choices=CONV_KERNELS, default=["cudnn", "auto", "cuda"],
                   help="the conv_kernel settings, timed in this order each round (the first is the reference)")
    p.add_argument("--what", nargs="+", choices=CALLS, default=list(CALLS))
    p.add_argument("--rounds", type=_positive_int, default=3)
    p.add_argument("--calls", type=_positive_int, default=5, help="timed calls per setting and round")
    p.add_argument("--latent", nargs=3, type=_positive_int, default=[9, 90, 160], metavar=("T", "H", "W"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if len(set(args.kernels)) != len(args.kernels):
        p.error(f"--kernels: each setting once, got {' '.join(args.kernels)}")
    _check_out_dir(p, args.out)
    _require_cuda(p, "vae_ab times the VAE on a GPU")
    return args


def run(args) -> dict:
    from oasis import WanVAE

    dev = torch.device("cuda")
    torch.manual_seed(0)
    vae = WanVAE().to(dev, torch.bfloat16).eval().requires_grad_(False).channels_last()
    vae.autotune = True
    t, h, w = args.latent
    z = torch.randn(1, vae.config.z_dim, t, h, w, device=dev, dtype=torch.bfloat16)
    video = torch.rand(1, 3, 4 * (t - 1) + 1, 8 * h, 8 * w, device=dev, dtype=torch.bfloat16) * 2 - 1
    calls = {"decode": lambda: vae.decode(z, 1, piece_frames=2), "encode": lambda: vae.encode(video, 1)}
    res = {"env": environment(dev), "latent": args.latent, "rounds": args.rounds, "calls": args.calls, "runs": {}}
    with torch.no_grad():
        for what in args.what:
            call, runs, first = calls[what], {k: {"s": [], "card": []} for k in args.kernels}, None
            for r in range(args.rounds):
                for k in args.kernels:
                    vae.conv_kernel = k
                    # one untimed call (the first also tunes the setting's geometries), then the timed ones, the
                    # card metered; the output of a call after them
                    out, t = timed(call, args.calls)
                    runs[k]["s"] += t["all_s"]
                    runs[k]["card"].append(t["card"])
                    if r == 0:
                        first = out if first is None else first
                        runs[k]["max_abs_diff_vs_first"] = (out.float() - first.float()).abs().max().item()
                        runs[k]["finite"] = bool(out.isfinite().all())
                    del out
                    print(what, r, k, [round(s, 4) for s in t["all_s"]], describe(t["card"]), flush=True)
            del first
            for v in runs.values():
                v["median_s"], v["min_s"] = statistics.median(v["s"]), min(v["s"])
            res["runs"][what] = runs
    return res


def render(res: dict) -> str:
    env = res["env"]
    t, h, w = res["latent"]
    md = [f"# Wan VAE by conv_kernel, interleaved rounds, {env.get('gpu')}, {env['date'][:10]}, commit {_commit(env, 7)}",
          "", f"bf16, random weights, latents [{t}, {h}, {w}] <-> {4 * (t - 1) + 1} frames {8 * h}x{8 * w}; decode chunk 1, "
          f"2-frame pieces; encode chunk 1. {res['rounds']} rounds, each setting in turn: one untimed call, then "
          f"{res['calls']} timed back to back, then one for its output.", "",
          "| call | conv_kernel | s (median of all) | fastest | J a call, by round | max abs diff vs the first |",
          "|---|---|---|---|---|---|"]
    for what, runs in res["runs"].items():
        for k, v in runs.items():
            joules = ", ".join("-" if "error" in c else f"{c['J_per_call']:.0f}" for c in v["card"])
            diff = f"{v['max_abs_diff_vs_first']:.4g}" + ("" if v["finite"] else " (not finite)")
            md.append(f"| {what} | {k} | {v['median_s']:.4f} | {v['min_s']:.4f} | {joules} | {diff} |")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    md = render(res)
    print(md, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vae_ab.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "vae_ab.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
