"""The compiled elementwise passes of WanBlock's region 1 alone, on a GPU at grid A's size (32400
tokens x 1536 channels, bf16; ``--grid``), in the forms docs/PERF.md entry 19 compares:

* q/k RMSNorm + RoPE: Wan's interleaved pairs (the model before entry 19) against the rotate-half
  channel order (``oasis.dit.apply_rope`` since entry 19);
* the modulated LayerNorm ``(norm1(x) * (1 + scale) + shift).to(bf16)`` in float32: ``F.layer_norm``
  (the model's; Inductor lowers it to a Welford reduction), mean and variance as two plain
  reductions, and E[x^2] - E[x]^2 in one; each one's largest error against float64, on a typical
  row and on rows whose mean is 8x their spread.

Then one block's two compiled regions (``WanBlock.attention_inputs`` / ``after_attention``, random
weights, random attention output) under the profiler: each kernel's time per call, to name the
kernels of ``model_bench.py --profile`` (with ``TORCH_LOGS=output_code``, Inductor's source of each).

Prints one line per form (median ms of 50, GB/s on the bytes the pass must move); ``--out`` writes
them as JSON.

    python scripts/norm_variants.py --out norm_variants.json
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from oasis import WanConfig
from oasis.dit import apply_rope, rope_tables, rotate_half_order

CFG = WanConfig()
DIM, HEADS, D, EPS = CFG.dim, CFG.num_heads, CFG.head_dim, CFG.eps


def median_ms(fn, *args, reps=50):
    for _ in range(3):
        fn(*args)
    if not torch.cuda.is_available():  # a smoke run of the script's code on the CPU
        start = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def rms(x, w):  # oasis.dit.RMSNorm
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * w.to(x.dtype)


def rope_interleaved(x, cos, sin):  # oasis.dit.apply_rope before entry 19
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)


def qk_pass(rope):
    def f(q, k, wq, wk, cos, sin):
        return (rope(rms(q, wq).unflatten(-1, (HEADS, D)), cos, sin),
                rope(rms(k, wk).unflatten(-1, (HEADS, D)), cos, sin))
    return f


def ln_layer_norm(x, shift, scale):  # WanBlock.attention_inputs
    return (F.layer_norm(x.float(), (DIM,), eps=EPS) * (1 + scale) + shift).to(x.dtype)


def ln_two_pass(x, shift, scale):
    xf = x.float()
    d = xf - xf.mean(-1, keepdim=True)
    return (d * torch.rsqrt(d.square().mean(-1, keepdim=True) + EPS) * (1 + scale) + shift).to(x.dtype)


def ln_moments(x, shift, scale):
    xf = x.float()
    m = xf.mean(-1, keepdim=True)
    var = (xf.square().mean(-1, keepdim=True) - m * m).clamp_min(0)
    return ((xf - m) * torch.rsqrt(var + EPS) * (1 + scale) + shift).to(x.dtype)


def region_kernels(dev, grid, n, calls=3) -> dict:
    """{region: {kernel: us per call}} of one WanBlock's compiled regions at ``grid``."""
    from torch.profiler import ProfilerActivity, profile

    from oasis.dit import _FP32_PARAMS, WanBlock

    block = WanBlock(CFG).to(dev).eval()
    for name, p in block.named_parameters():
        p.data = p.data.to(torch.float32 if any(k in name for k in _FP32_PARAMS) else torch.bfloat16)
    x = torch.randn(1, n, DIM, device=dev).to(torch.bfloat16)
    e = 0.1 * torch.randn(1, 6, DIM, device=dev)
    rope = rope_tables(grid, CFG, dev, torch.float32)
    kv = block.cross_attn.context_kv(torch.randn(1, CFG.text_len, DIM, device=dev).to(torch.bfloat16))
    attn = torch.randn(1, n, HEADS, D, device=dev).to(torch.bfloat16)
    out = {}
    for name, fn, args in (("region 1 (attention_inputs)", WanBlock.attention_inputs, (block, x, e, rope)),
                           ("region 2 (after_attention)", WanBlock.after_attention, (block, x, attn, e, kv))):
        compiled = torch.compile(fn)
        compiled(*args)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                compiled(*args)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        times = {ev.key[:100]: round(ev.device_time_total / calls, 1) for ev in prof.key_averages()
                 if ev.device_time_total > 0}
        out[name] = dict(sorted(times.items(), key=lambda kv: -kv[1]))
        print(f"{name}, us per call:", flush=True)
        for kernel, us in out[name].items():
            print(f"  {us:8.1f}  {kernel}", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, nargs=3, default=[9, 45, 80], help="token grid T H W (default A)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    grid = tuple(args.grid)
    N = grid[0] * grid[1] * grid[2]
    torch.manual_seed(0)
    bf = torch.bfloat16
    rows = []

    def report(name, ms, nbytes, **extra):
        row = {"pass": name, "ms": ms, "GBps": nbytes / ms / 1e6, **extra}
        rows.append(row)
        print(f"{name}: {ms:.4f} ms, {row['GBps']:.0f} GB/s" + "".join(f", {k} {v:.3g}" for k, v in extra.items()),
              flush=True)

    # q/k RMSNorm + RoPE: read q and k, write them (bf16)
    q, k = (torch.randn(1, N, DIM, device=dev, dtype=bf) for _ in range(2))
    wq, wk = (1 + 0.1 * torch.randn(DIM, device=dev, dtype=bf) for _ in range(2))
    cos, sin = rope_tables(grid, CFG, dev, torch.float32)
    half = torch.tensor(rotate_half_order(D), device=dev)

    def to_half(t):  # each head's channels in rotate-half order
        return t.unflatten(-1, (HEADS, D)).index_select(-1, half).flatten(-2)

    old = torch.compile(qk_pass(rope_interleaved))
    new = torch.compile(qk_pass(apply_rope))
    args_old = (q, k, wq, wk, cos, sin)
    args_new = (to_half(q), to_half(k), to_half(wq), to_half(wk), cos, sin)
    with torch.no_grad():
        diff = (new(*args_new)[0] - to_half(old(*args_old)[0].flatten(-2)).unflatten(-1, (HEADS, D))).abs().max().item()
        qk_bytes = 4 * N * DIM * 2
        report("q/k RMSNorm + RoPE, interleaved pairs", median_ms(old, *args_old), qk_bytes)
        report("q/k RMSNorm + RoPE, rotate-half", median_ms(new, *args_new), qk_bytes, max_diff_vs_interleaved=diff)

        # the modulated LayerNorm: read x, write its normed form (bf16)
        shift = 0.1 * torch.randn(1, 1, DIM, device=dev)
        scale = 0.1 * torch.randn(1, 1, DIM, device=dev)
        typical = torch.randn(1, N, DIM, device=dev).to(bf)
        offset = (torch.randn(1, N, DIM, device=dev) + 8).to(bf)
        for name, fn in (("F.layer_norm (Welford)", ln_layer_norm), ("mean, then variance", ln_two_pass),
                         ("E[x^2] - E[x]^2", ln_moments)):
            compiled = torch.compile(fn)
            errors = {}
            for label, x in (("typical", typical), ("offset", offset)):
                exact = ln_layer_norm(x.double(), shift.double(), scale.double())
                errors[f"max_err_{label}"] = (compiled(x, shift, scale).double() - exact).abs().max().item()
            report(f"modulated LayerNorm, {name}", median_ms(compiled, typical, shift, scale), 2 * N * DIM * 2,
                   **errors)
        kernels = region_kernels(dev, grid, N)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"grid": grid, "tokens": N, "rows": rows, "region_kernels": kernels}, indent=1))


if __name__ == "__main__":
    main()
