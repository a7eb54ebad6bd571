#!/usr/bin/env python
"""The VAE's CUDA 3x3x3 convolution (oasis.vae_cuda) against the path the decoder runs today, call by call.

Every 3x3x3 convolution call of a 720p decode (latents [9, 90, 160], chunk 1, 2-frame pieces) that the CUDA
kernel takes, with how many times the decode makes it (counted on the CPU by running the decoder at latents
[9, 12, 20] and scaling the sizes; docs/PERF.md entry 18j). Per call:

- ``today``: the causal cache's two frames copied in front of the new ones (the new ones are already in
  the buffer: the norm pass writes them there), the convolution on cuDNN's fastest listed engine
  (``oasis.vae_conv.conv`` under ``tuning()``), then the bias (+ residual) pass;
- ``cuda``: ``oasis.vae_cuda.conv3d_k3`` with the cache as its own tensor, bias and residual in its epilogue.

Both are checked against a float32 convolution of the same bf16 inputs (max abs error). The sum over the
decode's calls is the decode time this kernel would change.

    python benchmarks/conv_k3_bench.py [--reps 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from attn_bench import environment  # noqa: E402
from model_bench import cuda_ms  # noqa: E402

# (Cin, Cout, new frames T, H, W, bias + residual, calls in a 720p decode): conv1 of a residual block
# takes no bias (the norm pass after it adds it) and no residual; conv2 takes both. The 96-channel calls
# (102 of the decode's) stay on cuDNN (oasis.vae_cuda.why_not)
CALLS = [
    (192, 192, 2, 360, 640, False, 48), (192, 192, 2, 360, 640, True, 48),
    (192, 192, 1, 360, 640, False, 3), (192, 192, 1, 360, 640, True, 3),
    (192, 384, 2, 180, 320, False, 8), (192, 384, 1, 180, 320, False, 1),
    (384, 384, 2, 180, 320, False, 16), (384, 384, 2, 180, 320, True, 24),
    (384, 384, 1, 180, 320, False, 2), (384, 384, 1, 180, 320, True, 3),
    (384, 384, 1, 90, 160, False, 45), (384, 384, 1, 90, 160, True, 45),
]


def one_call(cin, cout, t, h, w, res, reps, dev):
    from oasis import vae_conv, vae_cuda
    from oasis.vae_kernels import add_bias_

    cl = torch.channels_last_3d
    g = torch.Generator(device=dev).manual_seed(cin * 7 + cout + t * 131 + h)
    x = torch.randn(1, cin, t, h, w, device=dev, generator=g).bfloat16().contiguous(memory_format=cl)
    prev = torch.randn(1, cin, 2, h, w, device=dev, generator=g).bfloat16().contiguous(memory_format=cl)
    weight = (torch.randn(cout, cin, 3, 3, 3, device=dev, generator=g) * (27 * cin) ** -0.5).bfloat16()
    weight_cl = weight.contiguous(memory_format=cl)
    bias = torch.randn(cout, device=dev, generator=g).bfloat16() if res else None
    residual = torch.randn(1, cout, t, h, w, device=dev, generator=g).bfloat16().contiguous(
        memory_format=cl) if res else None
    buf = torch.empty(1, cin, t + 2, h, w, device=dev, dtype=torch.bfloat16, memory_format=cl)
    buf[:, :, 2:].copy_(x)

    def today():
        buf[:, :, :2].copy_(prev)
        with vae_conv.tuning():
            y = vae_conv.conv(buf, weight_cl, None, None, padding=(0, 1, 1))
        return add_bias_(y, bias, residual)

    def cuda():
        return vae_cuda.conv3d_k3(x, weight, bias, prev=prev, residual=residual)

    exact = F.conv3d(torch.cat([prev, x], 2).float(), weight.float(), None if bias is None else bias.float(),
                     padding=(0, 1, 1))
    if residual is not None:
        exact += residual.float()
    row = {"cin": cin, "cout": cout, "frames": t, "h": h, "w": w, "bias_residual": res,
           "tflop": 2 * 27 * cin * cout * t * h * w / 1e12}
    for name, fn in (("today", today), ("cuda", cuda)):
        y = fn()  # the first call (the tuner's timing for today's path)
        torch.cuda.synchronize()
        row[f"{name}_err"] = (y.float() - exact).abs().max().item()
        row[f"{name}_finite"] = bool(y.isfinite().all())
        row[f"{name}_ms"] = statistics.median(cuda_ms(fn, reps))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="directory for conv_k3_bench.json and .md")
    a = p.parse_args(argv)
    if a.reps < 1:
        p.error(f"--reps must be positive, got {a.reps}")
    if a.out is not None and a.out.exists() and not a.out.is_dir():
        p.error(f"--out {a.out} is a file")
    if not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    from oasis import vae_cuda

    ok, how = vae_cuda.library()
    if not ok:
        p.error(f"the CUDA convolution is not available: {how}")
    dev = torch.device("cuda")
    env = environment(dev)
    rows = []
    for cin, cout, t, h, w, res, count in CALLS:
        with torch.no_grad():  # as the decode runs: the tuned cuDNN path takes no autograd
            row = one_call(cin, cout, t, h, w, res, a.reps, dev)
        row["calls"] = count
        rows.append(row)
        print(f"{cin:>4}->{cout:<4} T={t} {h}x{w} {'b+r' if res else '   '} x{count:<3} today {row['today_ms']:7.3f} ms "
              f"({row['tflop'] / row['today_ms'] * 1e3:5.0f} TFLOP/s) cuda {row['cuda_ms']:7.3f} ms "
              f"({row['tflop'] / row['cuda_ms'] * 1e3:5.0f}); err {row['today_err']:.3g} / {row['cuda_err']:.3g}",
              flush=True)
    total = {k: sum(r[f"{k}_ms"] * r["calls"] for r in rows) / 1e3 for k in ("today", "cuda")}
    flop = sum(r["tflop"] * r["calls"] for r in rows)
    lines = [f"# The VAE's CUDA 3x3x3 convolution against today's path, {env.get('gpu', '?')}, {env['date'][:10]}, "
             f"commit {env['commit']}{' (dirty)' if env.get('dirty') else ''}", "",
             "Per call of a 720p decode (chunk 1, 2-frame pieces); today = cache copy + cuDNN's fastest listed engine "
             "+ bias/residual pass; median of %d; max abs error against a float32 convolution of the same inputs." % a.reps,
             "", "| Cin->Cout | T | H x W | bias+res | calls | today ms | cuda ms | today TFLOP/s | cuda TFLOP/s | "
             "err today | err cuda |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cin']}->{r['cout']} | {r['frames']} | {r['h']}x{r['w']} | {'yes' if r['bias_residual'] else 'no'} "
                     f"| {r['calls']} | {r['today_ms']:.3f} | {r['cuda_ms']:.3f} | {r['tflop'] / r['today_ms'] * 1e3:.0f} | "
                     f"{r['tflop'] / r['cuda_ms'] * 1e3:.0f} | {r['today_err']:.3g} | {r['cuda_err']:.3g} |")
    lines += ["", f"Over the decode's {sum(r['calls'] for r in rows)} calls ({flop:.1f} TFLOP): today {total['today']:.3f} s, "
              f"cuda {total['cuda']:.3f} s ({(total['cuda'] - total['today']) * 1e3:+.1f} ms)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "conv_k3_bench.json").write_text(json.dumps({"env": env, "rows": rows, "total_s": total}, indent=1))
        (a.out / "conv_k3_bench.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
