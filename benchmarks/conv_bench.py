"""The Wan VAE decoder's convolutions one by one: which layout and cuDNN setting runs them fastest,
and how close each comes to the card's matmul rate.

For every distinct convolution of the decoder (latents ``[1, 16, 9, 90, 160]`` -> 33 frames 720p) it
times, on random bf16 data with the cache's two frames in front:

- ``ncdhw``: ``F.conv3d`` on contiguous tensors (PyTorch's default), cuDNN's heuristic algorithm;
- ``ncdhw_bench``: the same with ``torch.backends.cudnn.benchmark`` (cuDNN times its algorithms);
- ``ndhwc``, ``ndhwc_bench``: input and weight ``channels_last_3d``, benchmark off and on;
- ``conv2d_sum``: the 3x3x3 convolution as three channels-last 3x3 ``conv2d`` over frame-shifted
  inputs, summed (a check on whether cuDNN's 3D path lags its 2D one);
- ``ndhwc_pad16`` (convolutions to fewer than 16 channels): the weight padded to 16 with zeros;
- ``tuned``: :func:`oasis.vae_conv.conv` inside ``tuning()``: the fastest of the engine
  configurations cuDNN's heuristics A and B list, timed at the first call (needs the cuDNN frontend; the
  engine chosen is in the JSON);

and the matmul ceiling: ``torch.mm`` of 8192x8192x8192 and of the convolution's own implicit-GEMM
shape (M = output positions, K = 27 * Cin, N = Cout; M capped so the operands fit).

    python benchmarks/conv_bench.py --out benchmarks/results/<date>_<card>_<commit>
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attn_bench import _check_out_dir, _commit, _Parser, _positive_int, _require_cuda, environment  # noqa: E402
from model_bench import cuda_ms  # noqa: E402

# (name, Cin, Cout, output frames for the whole clip, H, W, kernel): the decoder's 3D convolutions at
# latents [9, 90, 160]; "2d" rows are the spatial upsamplers' per-frame 3x3 convolutions.
SHAPES = [
    ("up0 384->384 3x3x3", 384, 384, 9, 90, 160, 3),
    ("up1 384->384 3x3x3", 384, 384, 17, 180, 320, 3),
    ("up1 192->384 3x3x3", 192, 384, 17, 180, 320, 3),
    ("up2 192->192 3x3x3", 192, 192, 33, 360, 640, 3),
    ("up3 96->96 3x3x3", 96, 96, 33, 720, 1280, 3),
    ("conv_out 96->3 3x3x3", 96, 3, 33, 720, 1280, 3),
    ("up1 upsample 384->192 3x3 (2d)", 384, 192, 33, 360, 640, 2),
    ("up2 upsample 192->96 3x3 (2d)", 192, 96, 33, 720, 1280, 2),
]


def cuda_time(fn, reps: int) -> float:
    """Median seconds of ``fn`` by CUDA events, after one warm-up call."""
    return statistics.median(cuda_ms(fn, reps)) / 1e3


def gemm_time(m: int, k: int, n: int, dev, reps: int) -> float:
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=dev, dtype=torch.bfloat16)
    return cuda_time(lambda: a @ b, reps)


def _tuned(x, w, padding):
    from oasis import vae_conv

    def run():
        with vae_conv.tuning():
            return vae_conv.conv(x, w, padding=padding)
    return run


def conv_variants(cin, cout, t, h, w, k, dev):
    dt = torch.bfloat16
    if k == 2:  # a per-frame 2D convolution
        x = torch.randn(t, cin, h, w, device=dev, dtype=dt)
        wt = torch.randn(cout, cin, 3, 3, device=dev, dtype=dt) * 0.02
        xl, wl = x.contiguous(memory_format=torch.channels_last), wt.contiguous(memory_format=torch.channels_last)
        return {
            "ncdhw": (False, lambda: F.conv2d(x, wt, padding=1)),
            "ncdhw_bench": (True, lambda: F.conv2d(x, wt, padding=1)),
            "ndhwc": (False, lambda: F.conv2d(xl, wl, padding=1)),
            "ndhwc_bench": (True, lambda: F.conv2d(xl, wl, padding=1)),
            "tuned": (False, _tuned(xl, wl, 1)),
        }
    x = torch.randn(1, cin, t + 2, h, w, device=dev, dtype=dt)
    wt = torch.randn(cout, cin, 3, 3, 3, device=dev, dtype=dt) * 0.02
    xl, wl = x.contiguous(memory_format=torch.channels_last_3d), wt.contiguous(memory_format=torch.channels_last_3d)
    w2 = [wt[:, :, i].contiguous(memory_format=torch.channels_last) for i in range(3)]

    def frames(i):  # frames i .. i+t of the channels-last input as a batch of images (a view)
        return xl[:, :, i:i + t].transpose(1, 2).reshape(t, cin, h, w)

    def conv2d_sum():
        out = F.conv2d(frames(0), w2[0], padding=1)
        out += F.conv2d(frames(1), w2[1], padding=1)
        out += F.conv2d(frames(2), w2[2], padding=1)
        return out

    variants = {
        "ncdhw": (False, lambda: F.conv3d(x, wt, padding=(0, 1, 1))),
        "ncdhw_bench": (True, lambda: F.conv3d(x, wt, padding=(0, 1, 1))),
        "ndhwc": (False, lambda: F.conv3d(xl, wl, padding=(0, 1, 1))),
        "ndhwc_bench": (True, lambda: F.conv3d(xl, wl, padding=(0, 1, 1))),
        "conv2d_sum": (True, conv2d_sum),
        "tuned": (False, _tuned(xl, wl, (0, 1, 1))),
    }
    if cout < 16:  # a few output channels: cuDNN may do better with the weight padded to 16 (zeros), sliced after
        wp = torch.zeros(16, cin, 3, 3, 3, device=dev, dtype=dt)
        wp[:cout] = wt
        wp = wp.contiguous(memory_format=torch.channels_last_3d)
        variants["ndhwc_pad16"] = (True, lambda: F.conv3d(xl, wp, padding=(0, 1, 1))[:, :cout])
    return variants


def _tuned_engine() -> str | None:
    """The engine configuration the tuned variant's last new geometry runs on."""
    from oasis import vae_conv

    plans = [p for p in vae_conv._PLANS.values() if p is not None]
    return plans[-1].name if plans else vae_conv.frontend_missing()


VARIANTS = ["ncdhw", "ncdhw_bench", "ndhwc", "ndhwc_bench", "conv2d_sum", "ndhwc_pad16", "tuned"]


def parse_args(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=_positive_int, default=5)
    p.add_argument("--chunk-frames", type=_positive_int, default=4,
                   help="also time every convolution on this many output frames (one latent frame's worth)")
    p.add_argument("--piece-frames", type=_positive_int, default=2,
                   help="and on this many (the decoder's pieces in its last two stages)")
    p.add_argument("--only", help="time only the convolutions whose name contains this")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.only is not None and not any(args.only in name for name, *_ in SHAPES):
        p.error(f"--only {args.only!r}: no convolution's name contains it; the names: "
                + "; ".join(name for name, *_ in SHAPES))
    _check_out_dir(p, args.out)
    _require_cuda(p, "conv_bench times GPU convolutions")
    return args


def render(res: dict, reps: int) -> str:
    """The markdown report of ``res`` (``main``'s record)."""
    env = res["env"]
    md = [f"# Wan VAE decoder convolutions, {env.get('gpu')}, {env['date'][:10]}, commit {_commit(env, 7)}", "",
          f"bf16, random data, median of {reps} by CUDA events; bf16 GEMM 8192^3: {res['square_gemm_TFLOP/s']:.0f} "
          "TFLOP/s. TFLOP/s per variant (ms in the JSON); `gemm` is torch.mm of the implicit-GEMM shape.", "",
          "| conv | frames | TFLOP | " + " | ".join(VARIANTS) + " | gemm |",
          "|---|---|---|" + "---|" * (len(VARIANTS) + 1)]
    for r in res["rows"]:
        cells = [f"{r['TFLOP/s'][v]:.0f}" if v in r["TFLOP/s"] else "-" for v in VARIANTS]
        md.append(f"| {r['conv']} | {r['frames']} | {r['TFLOP']:.2f} | " + " | ".join(cells)
                  + f" | {r['TFLOP/s']['gemm_same_shape']:.0f} |")
    return "\n".join(md) + "\n"


def main(argv=None):
    args = parse_args(argv)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    square = 2 * 8192**3 / gemm_time(8192, 8192, 8192, dev, 10) / 1e12
    rows = []
    for name, cin, cout, t_all, h, w, k in SHAPES:
        if args.only and args.only not in name:
            continue
        for t in sorted({t_all, min(args.chunk_frames, t_all), min(args.piece_frames, t_all)}):
            flops = 2 * cin * cout * (27 if k == 3 else 9) * t * h * w
            row = {"conv": name, "frames": t, "H": h, "W": w, "TFLOP": flops / 1e12, "ms": {}, "TFLOP/s": {}}
            for variant, (bench, fn) in conv_variants(cin, cout, t, h, w, k, dev).items():
                torch.backends.cudnn.benchmark = bench
                try:
                    s = cuda_time(fn, args.reps)
                except (ImportError, RuntimeError) as e:  # e.g. no room for the whole clip at once
                    row.setdefault("failed", {})[variant] = str(e)[:200]
                    continue
                row["ms"][variant] = s * 1e3
                row["TFLOP/s"][variant] = flops / s / 1e12
            row["tuned_engine"] = _tuned_engine()
            torch.backends.cudnn.benchmark = False
            m, kk = min(t * h * w, 1 << 20), cin * (27 if k == 3 else 9)
            row["TFLOP/s"]["gemm_same_shape"] = 2 * m * kk * cout / gemm_time(m, kk, cout, dev, args.reps) / 1e12
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    res = {"env": environment(dev), "square_gemm_TFLOP/s": square, "rows": rows}
    md = render(res, args.reps)
    print(md, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "conv_bench.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "conv_bench.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
