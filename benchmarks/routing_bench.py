#!/usr/bin/env python
"""Routing statistics cost vs one global-attention forward, per head (issue: <= 2x).

    python benchmarks/routing_bench.py --grid 9,45,80 --out DIR

One head, D=128, bf16: ``head_statistics`` (Triton, every query, then every 4th) against
cuDNN's global attention forward for that head, in one run; the statistics of a subsample of
queries are checked against the torch reference first.

Writes ``routing_bench_<GPU>_<T>x<H>x<W>_<commit>.{json,md}`` under ``--out`` (default
benchmarks/results/), so runs of other grids or commits beside it are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from attn_bench import (_check_out_dir, _commit, _Parser, _positive_int, _require_cuda, _triple,  # noqa: E402
                        environment)
import oasis_kernels as ok  # noqa: E402
from oasis_kernels.routing import head_statistics, head_statistics_reference  # noqa: E402


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="9,45,80", help="latent grid T,H,W (default 9,45,80)")
    p.add_argument("--window", default="3,5,5", help="window size Pt,Ph,Pw, odd (default 3,5,5)")
    p.add_argument("--head-dim", type=_positive_int, default=128)
    p.add_argument("--out", default=None, help="directory for the JSON and markdown (default benchmarks/results)")
    args = p.parse_args(argv)
    try:
        args.grid = _triple(args.grid, "--grid", ok.normalize_grid)
        args.window = _triple(args.window, "--window", ok.normalize_window)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    _check_out_dir(p, args.out)
    _require_cuda(p, "routing_bench times GPU kernels")
    return args


def output_stem(env: dict, grid) -> str:
    """The files' name: the card, the grid and the commit, so that a run does not replace another's."""
    return f"routing_bench_{env['gpu'].replace(' ', '_')}_{'x'.join(map(str, grid))}_{env['commit'][:7]}"


def main(argv=None) -> int:
    args = parse_args(argv)
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    grid, window = tuple(args.grid), tuple(args.window)
    n = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(1, n, 1, args.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    # correctness on a subsample of queries
    got = head_statistics(q, k, grid, window, query_stride=16, backend="triton")
    want = head_statistics_reference(q, k, grid, window, query_stride=16)
    errs = {f: (getattr(got, f) - getattr(want, f)).abs().max().item() for f in ("kl_intra", "kl_window", "lse_global")}
    print("max abs err vs reference (every 16th query):", errs)

    def attn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    t_attn = triton.testing.do_bench(attn, warmup=25, rep=200, return_mode="median")
    res = {"grid": grid, "window": window, "N": n, "head_dim": args.head_dim, "errors": errs,
           "global_attention_fwd_ms (SDPA cuDNN, one head)": t_attn}
    from oasis_kernels.kernels import routing_stats

    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")  # noqa: E731
    # the stages of head_statistics, each alone (same calls as routing/stats.py)
    plans = {m: ok.RoutingPlan.uniform(grid, 1, m, window) for m in (ok.Mode.INTRA, ok.Mode.WINDOW)}
    lse_local = torch.stack([ok.attention_lse(q, k, plans[m]) for m in plans])
    lse_g = routing_stats.routing_stats_global(q, k, args.head_dim ** -0.5, 1)[0]
    radii = tuple(min(p_ // 2, s_ - 1) for p_, s_ in zip(window, grid))
    stages = {
        "stage global pass (lse_g, E_g[s])": lambda: routing_stats.routing_stats_global(q, k, args.head_dim ** -0.5, 1),
        "stage intra LSE (attention op)": lambda: ok.attention_lse(q, k, plans[ok.Mode.INTRA]),
        "stage window LSE (attention op)": lambda: ok.attention_lse(q, k, plans[ok.Mode.WINDOW]),
        "stage local KL pass": lambda: routing_stats.routing_stats_local(
            q, k, lse_g, lse_local, grid, radii, args.head_dim ** -0.5, 1e-6),
    }
    for name, fn in stages.items():
        res[f"{name} ms"] = bench(fn)
    default = dict(routing_stats.CONFIG)
    for cfg in (default, dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
                dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2), dict(BLOCK_M=64, BLOCK_N=64, num_warps=4,
                                                                                num_stages=3)):
        routing_stats.CONFIG.clear()
        routing_stats.CONFIG.update(cfg)
        tag = "BM{BLOCK_M}_BN{BLOCK_N}_w{num_warps}_s{num_stages}".format(**cfg)
        for stride in (1, 4):
            t = bench(lambda: head_statistics(q, k, grid, window, query_stride=stride, backend="triton"))
            res[f"statistics_ms {tag} (query_stride={stride})"] = t
            res[f"ratio_to_attention {tag} (query_stride={stride})"] = t / t_attn
    routing_stats.CONFIG.clear()
    routing_stats.CONFIG.update(default)
    env = environment(torch.device("cuda"))
    res["env"] = env
    for key, val in res.items():
        if key != "env":
            print(f"{key}: {val}")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(env, grid)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    lines = [f"# routing statistics vs global attention: {env['gpu']}, N={n}, D={args.head_dim}, bf16, one head", "",
             f"torch {env['torch']}, triton {env['triton']}, commit `{_commit(env)}`, {env['date']}", "",
             "| what | ms | vs attention fwd |", "|---|---|---|",
             f"| global attention fwd, SDPA cuDNN | {t_attn:.3f} | 1.00x |"]
    for key, val in res.items():
        if key.startswith("statistics_ms"):
            ratio = res[key.replace("statistics_ms", "ratio_to_attention")]
            lines.append(f"| head_statistics {key[len('statistics_ms '):]} | {val:.3f} | {ratio:.2f}x |")
        elif key.startswith("stage "):
            lines.append(f"| {key[len('stage '):-3]} | {val:.3f} | {val / t_attn:.2f}x |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
