"""The Wan2.1 VAE: diffusers' AutoencoderKLWan against oasis.WanVAE (same random weights, bf16).

Decode: latents ``[1, 16, 9, 90, 160]`` -> 33 frames 720x1280 (and ``--long`` latent frames, 105
frames by default, ours only). Encode: the same clip back. For each variant: median seconds (wall
clock, synchronised), peak GPU memory of the call, the largest difference from diffusers' output, and what
the card did meanwhile (joules a call, mean power against the limit, SM clock: benchmarks/card_power.py).
The convolutions' FLOPs are counted once (torch.utils.flop_counter) and their kernel time summed from
one profiled decode, so the table gives the convolutions' achieved TFLOP/s against the bf16 GEMM rate
measured in the same run.

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
from attn_bench import (_check_out_dir, _commit, _non_negative_int, _Parser, _positive_int,  # noqa: E402
                        _require_cuda, environment)
from card_power import CardMeter, describe  # noqa: E402
from conv_bench import gemm_time  # noqa: E402


# name: (channels-last, chunk, piece_frames, WanVAE.autotune, WanVAE.conv_kernel): autotune True = each geometry
# on the fastest of cuDNN's engines through its frontend (when installed); "benchmark" = PyTorch's cuDNN benchmark
# mode alone (the choice before the frontend path: the baseline in the same run). conv_kernel "auto" is the
# default since 2026-12-06 (the CUDA kernel on the 192-wide layers); results before that name "cudnn"'s path
# without a suffix
DECODE = {
    "ours, chunk 1, pieces 2, PyTorch's engines": (True, 1, 2, "benchmark", "cudnn"),
    "ours, chunk 1, pieces 2": (True, 1, 2, True, "auto"),
    "ours, chunk 1, pieces 2, cuDNN convolutions": (True, 1, 2, True, "cudnn"),
    "ours, chunk 1, pieces 1": (True, 1, 1, True, "auto"),
    # whole 4-frame runs at 720p: half the cache copies and norm-pass tail writes of 2-frame pieces per
    # frame, 0.8 GiB more at the peak (docs/PERF.md 18s, 18t)
    "ours, chunk 1, pieces 4": (True, 1, 4, True, "auto"),
    "ours, chunk 3, pieces 2": (True, 3, 2, True, "auto"),
    "ours, all frames": (True, None, None, True, "auto"),
    "ours, chunk 1, pieces 2, CUDA convolutions": (True, 1, 2, True, "cuda"),
}
# name: as DECODE; all channels-last (the default OasisVSR sets on CUDA); 53ad54f's results have
# channels-first and no autotune
ENCODE = {
    "ours, chunk 1, PyTorch's engines": (True, 1, None, "benchmark", "cudnn"),
    "ours, chunk 1": (True, 1, None, True, "auto"),
    "ours, chunk 1, cuDNN convolutions": (True, 1, None, True, "cudnn"),
    "ours, chunk 1, pieces 2": (True, 1, 2, True, "auto"),
    "ours, chunk 2, pieces 2": (True, 2, 2, True, "auto"),
    # 8 frames a call at the full frame rate: half the cache copies of chunk 1 per frame, more memory
    "ours, chunk 2": (True, 2, None, True, "auto"),
    "ours, chunk 1, CUDA convolutions": (True, 1, None, True, "cuda"),
}


def timed(fn, reps):
    start = time.perf_counter()
    fn()  # the warm-up: with autotune, each new convolution geometry is timed here (first_s)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    with CardMeter() as meter:  # what the card did during the timed calls (its power cap: docs/PERF.md 18z)
        for _ in range(reps):
            start = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            del out
    out = fn()
    torch.cuda.synchronize()
    return out, {"s": statistics.median(times), "min_s": min(times), "all_s": times, "first_s": first,
                 "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
                 "peak_above_inputs_GiB": (torch.cuda.max_memory_allocated() - base) / 2**30,
                 "card": meter.summary(calls=reps)}


CONV_KERNEL = ("fprop", "implicit_gemm", "convolution", "convfwd", "conv2d", "conv3d", "wgrad", "dgrad")


def _bmm_flop(a_shape, b_shape, *_, out_shape=None, **__) -> int:
    """FLOPs of ``bmm``, either overload: torch's own formula takes ``bmm.dtype``'s third argument (the output
    dtype) for its ``out_shape`` and raises (torch 2.11-2.13), so a decode whose attention runs
    ``bmm(..., out_dtype=float32)`` could not be counted."""
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


def conv_flops(fn) -> float:
    """FLOPs of the convolutions that one call of ``fn`` runs through PyTorch's convolution op."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.bmm: _bmm_flop}) as counter:
        fn()
    return sum(v for k, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(k))


def conv_profile(fn, flops_fn=None) -> dict:
    """FLOPs of the convolutions in one call of ``flops_fn`` (default ``fn``; it must run them through
    PyTorch's convolution op, where the flop counter sees them), and their GPU kernel time in a profiled
    call of ``fn`` after one unprofiled call: the kernels whose names say they are convolutions
    (``CONV_KERNEL``), whether PyTorch or the cuDNN frontend launched them."""
    from torch.profiler import ProfilerActivity, profile

    flops = conv_flops(flops_fn or fn)
    fn()  # a geometry new to the tuner times its engines in its first call: not in the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sorted((e for e in events if str(e.device_type).endswith("CUDA")), key=lambda e: -e.self_device_time_total)
    conv_us = sum(e.self_device_time_total for e in kernels if any(n in e.key.lower() for n in CONV_KERNEL))
    all_us = sum(e.self_device_time_total for e in kernels)
    top = [{"kernel": e.key[:120], "s": e.self_device_time_total / 1e6, "calls": e.count} for e in kernels[:20]]
    return {"conv_TFLOP": flops / 1e12, "conv_kernel_s": conv_us / 1e6, "other_kernel_s": (all_us - conv_us) / 1e6,
            "conv_TFLOP/s": flops / max(conv_us, 1e-9) / 1e6, "top_kernels": top}


def accuracy_vs_float64(ref, ours, dev) -> dict:
    """Max abs error of diffusers' and our bf16 decode and encode against ours in float64."""
    import copy

    exact = copy.deepcopy(ours).double().channels_last(False)
    z = torch.randn(1, 16, 3, 30, 40, device=dev, dtype=torch.float64)
    video = exact.decode(z)
    want_z = exact.encode(video)
    zb, vb = z.bfloat16(), video.bfloat16()
    out = {"decode": {"diffusers": (ref.decode(zb).sample.double() - video).abs().max().item(),
                      "ours": (ours.decode(zb, chunk=1).double() - video).abs().max().item()},
           "encode (mean)": {"diffusers": (ref.encode(vb).latent_dist.mean.double() - want_z).abs().max().item(),
                             "ours": (ours.encode(vb, chunk=1).double() - want_z).abs().max().item()}}
    print("accuracy", json.dumps(out), flush=True)
    return out


def parse_args(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", nargs=3, type=_positive_int, default=[9, 90, 160], metavar=("T", "H", "W"))
    p.add_argument("--long", type=_non_negative_int, default=27,
                   help="latent frames of the long decode (ours only; 0: skip)")
    p.add_argument("--reps", type=_positive_int, default=3)
    p.add_argument("--profile", choices=sorted(DECODE), default="ours, chunk 1, pieces 2",
                   help="the decode variant profiled and run on --long latent frames")
    p.add_argument("--profile-encode", choices=sorted(ENCODE), default="ours, chunk 1, pieces 2")
    p.add_argument("--profile-diffusers", action="store_true", help="also profile diffusers' decode")
    p.add_argument("--decode", nargs="+", choices=sorted(DECODE), default=sorted(DECODE), metavar="VARIANT",
                   help="the decode variants to time (default: all)")
    p.add_argument("--encode", nargs="+", choices=sorted(ENCODE), default=sorted(ENCODE), metavar="VARIANT",
                   help="the encode variants to time (default: all)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    _check_out_dir(p, args.out)
    _require_cuda(p, "vae_bench times the VAE on a GPU")
    import importlib.util

    if importlib.util.find_spec("diffusers") is None:  # every run compares with diffusers' VAE
        p.error("vae_bench compares with diffusers' AutoencoderKLWan: diffusers is not installed")
    return args


def render(res: dict, args) -> str:
    """The markdown report of ``res`` (``main``'s record)."""
    env = res["env"]
    t, h, w = args.latent
    frames = 4 * (t - 1) + 1
    md = [f"# Wan VAE, {env.get('gpu')}, {env['date'][:10]}, commit {_commit(env, 7)}", "",
          f"bf16, random weights, latents {args.latent} <-> {frames} frames {8 * h}x{8 * w}; median of "
          f"{args.reps} after a warm-up. Peak: torch.cuda.max_memory_allocated during the call (the VAE's "
          f"{res['weights_GiB']:.2f} GiB of weights and the input included). diffusers {env.get('diffusers')}.",
          ""]
    for title, table in (("Decode", res["decode"]), ("Encode", res["encode"])):
        base = table["diffusers"]["s"]
        md += [f"{title}:", "", "| variant | s | x diffusers | peak GiB | max abs diff vs diffusers | first call s |",
               "|---|---|---|---|---|---|"]
        for name, r in table.items():
            diff = r.get("max_abs_diff_vs_diffusers")
            ratio = "-" if " frames" in name and "all frames" not in name else f"{base / r['s']:.2f}"
            md.append(f"| {name} | {r['s']:.3f} | {ratio} | {r['peak_GiB']:.2f} | "
                      f"{'-' if diff is None else f'{diff:.3g}'} | {r['first_s']:.2f} |")
        md += ["", "The card during the timed calls:", ""]
        md += [f"- {name}: {describe(r['card'])}" for name, r in table.items() if "card" in r]
        md.append("")
    prof = res["convolutions"]
    md += [f"Convolutions (bf16 GEMM 8192^3 in this run: {res['gemm_TFLOP/s']:.0f} TFLOP/s):", "",
           "| call | conv TFLOP | conv kernel s | conv TFLOP/s | other kernels s |", "|---|---|---|---|---|"]
    for name, c in prof.items():
        md.append(f"| {name} | {c['conv_TFLOP']:.1f} | {c['conv_kernel_s']:.3f} | {c['conv_TFLOP/s']:.0f} | "
                  f"{c['other_kernel_s']:.3f} |")
    for name, c in prof.items():
        md += ["", f"Kernels of {name}, by GPU time:", "", "| kernel | s | calls |", "|---|---|---|"]
        md += [f"| `{k['kernel'][:90]}` | {k['s']:.4f} | {k['calls']} |" for k in c["top_kernels"]]
    md += ["", "Error against float64 (our VAE in float64 on the GPU; latents [3, 30, 40], the clip 9 frames "
           "240x320): max abs error of each bf16 output.", "", "| | diffusers bf16 | ours bf16 |", "|---|---|---|"]
    for k, v in res["accuracy"].items():
        md.append(f"| {k} | {v['diffusers']:.3g} | {v['ours']:.3g} |")
    return "\n".join(md) + "\n"


def main(argv=None):
    args = parse_args(argv)
    from diffusers import AutoencoderKLWan

    from oasis import WanVAE, WanVAEConfig

    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    ref = AutoencoderKLWan().to(dev, dt).eval().requires_grad_(False)
    ours = WanVAE(WanVAEConfig.from_dict(dict(ref.config))).to(dev).eval().requires_grad_(False)
    ours.load_state_dict(ref.state_dict())
    ours.to(dt)
    t, h, w = args.latent
    z = torch.randn(1, 16, t, h, w, device=dev, dtype=dt)
    gemm = 2 * 8192**3 / gemm_time(8192, 8192, 8192, dev, 10) / 1e12
    rows, enc_rows, prof = {}, {}, {}

    def report(table, name, got, want, r):
        if want is not None:
            r["max_abs_diff_vs_diffusers"] = (got.float() - want.float()).abs().max().item()
        table[name] = r
        print(name, json.dumps(r), flush=True)

    with torch.no_grad():
        want, r = timed(lambda: ref.decode(z).sample, args.reps)
        report(rows, "diffusers", want, None, r)
        if args.profile_diffusers:
            prof["diffusers decode"] = conv_profile(lambda: ref.decode(z).sample)
        video = want.clamp(-1, 1)
        for name, (cl, chunk, piece, tune, kernel) in DECODE.items():
            if name not in args.decode:
                continue
            ours.channels_last(cl).autotune = tune
            ours.conv_kernel = kernel
            got, r = timed(lambda: ours.decode(z, chunk=chunk, piece_frames=piece), args.reps)
            report(rows, name, got, want, r)
            del got

        def dec(mode, chunk, piece, kernel):
            ours.autotune = mode
            ours.conv_kernel = kernel if mode is True else "cudnn"  # the flops are counted through PyTorch's convs
            return ours.decode(z, chunk=chunk, piece_frames=piece)

        # the profiled variant and its baseline with PyTorch's engines (the flops counted through PyTorch)
        for name in dict.fromkeys((args.profile, "ours, chunk 1, pieces 2, PyTorch's engines")):
            cl, chunk, piece, tune, kernel = DECODE[name]
            ours.channels_last(cl)
            prof[f"{name} (decode)"] = conv_profile(lambda: dec(tune, chunk, piece, kernel),
                                                    lambda: dec("benchmark", chunk, piece, kernel))
        cl, chunk, piece, tune, kernel = DECODE[args.profile]
        ours.channels_last(cl).autotune = tune
        ours.conv_kernel = kernel
        if args.long:
            zl = torch.randn(1, 16, args.long, h, w, device=dev, dtype=dt)
            got, r = timed(lambda: ours.decode(zl, chunk=chunk, piece_frames=piece), max(1, args.reps - 1))
            report(rows, f"{args.profile}, {4 * args.long - 3} frames", got, None, r)
            del got, zl
        want_e, r = timed(lambda: ref.encode(video).latent_dist.mean, args.reps)
        report(enc_rows, "diffusers", want_e, None, r)
        for name, (cl, chunk, piece, tune, kernel) in ENCODE.items():
            if name not in args.encode:
                continue
            ours.channels_last(cl).autotune = tune
            ours.conv_kernel = kernel
            got, r = timed(lambda: ours.encode(video, chunk=chunk, piece_frames=piece), args.reps)
            report(enc_rows, name, got, want_e, r)
        cl, chunk, piece, tune, kernel = ENCODE[args.profile_encode]
        ours.channels_last(cl)

        def enc(mode):
            ours.autotune = mode
            ours.conv_kernel = kernel if mode is True else "cudnn"
            return ours.encode(video, chunk=chunk, piece_frames=piece)

        prof[f"{args.profile_encode} (encode)"] = conv_profile(lambda: enc(tune), lambda: enc("benchmark"))
        ours.autotune, ours.conv_kernel = True, "auto"  # the defaults
        accuracy = accuracy_vs_float64(ref, ours, dev)
    res = {"env": environment(dev, libraries=("diffusers",)), "latent": args.latent, "gemm_TFLOP/s": gemm,
           "decode": rows, "encode": enc_rows, "convolutions": prof, "accuracy": accuracy,
           "weights_GiB": sum(p.numel() for p in ours.parameters()) * 2 / 2**30}
    md = render(res, args)
    print(md, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vae_bench.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "vae_bench.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
