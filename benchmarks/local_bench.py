#!/usr/bin/env python
"""Tile sweep of the local-head Triton kernels: each config of the fwd, dQ and dK/dV kernels timed
alone, beside the public op (autotuned) and its HBM floor, in one run.

    python benchmarks/local_bench.py --shapes B --mode window --out DIR
    python benchmarks/local_bench.py --shapes S,A,B --backends triton,cuda --api-only --out DIR

The public-op rows (``api fwd``, ``api fwd+bwd``) use only ``oasis_kernels``' public API, so
running this file with another checkout first on ``PYTHONPATH`` times that version's op in the
same process (``--api-only``), which is how docs/PERF.md compares a change with its baseline.

With ``--out``, the rows go to ``local_bench_<shapes>_<mode>[_<tag>].json`` (e.g.
``local_bench_S-A-B_window_new.json``): runs of other shapes, modes or tags into one folder are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from attn_bench import (SHAPES, _check_out_dir, _ints, _names, _Parser, _positive_int,  # noqa: E402
                        _require_cuda, _triple, environment, measure_ceilings)

import oasis_kernels as ok  # noqa: E402

#: (BT, BH, BW, BLOCK_N, num_warps, num_stages, sliced walk) candidates, timed one by one
SWEEP = [
    (4, 4, 4, 64, 4, 2, True), (4, 4, 4, 64, 4, 3, True), (4, 4, 4, 64, 8, 2, True), (8, 4, 4, 64, 8, 2, True),
    (2, 4, 4, 64, 4, 2, True), (4, 4, 4, 64, 4, 2, False), (2, 4, 8, 64, 4, 2, False), (2, 4, 8, 32, 4, 3, False),
    # 128-query tiles and 8 warps, for intra-frame heads (whole-frame key runs)
    (2, 8, 8, 64, 8, 2, False), (2, 8, 8, 32, 8, 2, False), (2, 4, 8, 64, 8, 2, False), (1, 8, 8, 64, 4, 2, False),
    # narrow key blocks, deeper pipelines (intra-only launches walk unmasked full blocks)
    (2, 4, 8, 32, 4, 4, False), (2, 8, 8, 32, 8, 3, False), (2, 4, 8, 16, 4, 4, False), (2, 4, 8, 32, 8, 3, False),
]
#: the public op's backends for local heads (--backends)
LOCAL_BACKENDS = ("triton", "cuda", "auto")


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="B", help=f"comma list of presets: {', '.join(SHAPES)} (default B)")
    p.add_argument("--mode", choices=["window", "intra"], default="window")
    p.add_argument("--heads", type=_positive_int, default=12)
    p.add_argument("--head-dim", type=_positive_int, default=128)
    p.add_argument("--window", default="3,5,5", help="window size Pt,Ph,Pw, odd (default 3,5,5)")
    p.add_argument("--api-only", action="store_true", help="time only the public op (for a baseline checkout)")
    p.add_argument("--backends", default="triton", help="the public op's rows with each of these local backends "
                   f"({', '.join(LOCAL_BACKENDS)}; default triton)")
    p.add_argument("--tag", default="", help="label of this run's rows (and its file name)")
    p.add_argument("--configs", default="", help=f"comma list of SWEEP indices 0..{len(SWEEP) - 1} to time "
                   "(default all)")
    p.add_argument("--out", default=None, help="directory for the JSON")
    args = p.parse_args(argv)
    if args.api_only and args.configs:
        p.error(f"--configs {args.configs}: picks sweep configs, and --api-only times none")
    if "/" in args.tag:
        p.error(f"--tag {args.tag}: names the file, so no '/'")
    try:
        args.shapes = _names(args.shapes, "--shapes", SHAPES, "preset(s)")
        args.window = _triple(args.window, "--window", ok.normalize_window)
        args.backends = _names(args.backends, "--backends", LOCAL_BACKENDS, "backend(s)")
        args.configs = _ints(args.configs, "--configs") if args.configs else list(range(len(SWEEP)))
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    outside = [i for i in args.configs if not 0 <= i < len(SWEEP)]
    if outside:
        p.error(f"--configs: {outside} not in 0..{len(SWEEP) - 1} (the SWEEP indices)")
    _check_out_dir(p, args.out)
    _require_cuda(p, "local_bench times GPU kernels")
    return args


def output_name(args) -> str:
    """The JSON's name: shapes, mode and tag, so that runs of other shapes into one --out are kept."""
    return f"local_bench_{'-'.join(args.shapes)}_{args.mode}{'_' + args.tag if args.tag else ''}.json"


def main(argv=None) -> int:
    args = parse_args(argv)
    import triton
    import triton.testing

    window = args.window
    dev = torch.device("cuda")
    env = environment(dev)
    ceil = measure_ceilings(dev)
    rows = []
    for shape in args.shapes:
        grid = SHAPES[shape]
        n = grid[0] * grid[1] * grid[2]
        modes = ["w" if args.mode == "window" else "i"] * args.heads
        plan = ok.RoutingPlan(grid, modes, window)
        q, k, v = (torch.randn(1, n, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        floor = 4 * q.numel() * q.element_size() / (ceil["copy_GBps"] * 1e6)

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

        for backend in args.backends:
            def api_fwd():
                return ok.routed_attention(q, k, v, plan, backend=backend)

            def api_fwdbwd():
                out = ok.routed_attention(q, k, v, plan, backend=backend)
                torch.autograd.grad(out, (q, k, v), dout)

            t_fwd = bench(api_fwd)
            t_fb = bench(api_fwdbwd)
            label = "autotuned" if backend == "triton" else backend
            rows.append(dict(shape=shape, kernel="api fwd", config=label, ms=t_fwd, x_floor=t_fwd / floor))
            # backward floor: q, k, v, o, dO read and dQ, dK, dV written once = twice the forward's
            rows.append(dict(shape=shape, kernel="api fwd+bwd", config=label, ms=t_fb, x_floor=t_fb / (3 * floor)))
        if not args.api_only:
            picked = [SWEEP[i] for i in args.configs]
            rows += sweep(q.detach(), k.detach(), v.detach(), dout, plan, floor, bench, shape, picked)
        print(f"{shape} {grid} floor {floor:.3f} ms")
    tag = args.tag or env.get("commit", "")
    print(f"\n{'shape':5} {'kernel':12} {'config':28} {'ms':>8} {'x floor':>8}   [{tag}]")
    for r in rows:
        print(f"{r['shape']:5} {r['kernel']:12} {r['config']:28} {r['ms']:8.3f} {r['x_floor']:8.2f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"env": env, "ceilings": ceil, "args": vars(args), "rows": rows}
        (out / output_name(args)).write_text(json.dumps(record, indent=1))
    return 0


def sweep(q, k, v, dout, plan, floor, bench, shape, configs=SWEEP):
    """Each kernel of the Triton backend launched with each of ``configs`` (no autotuner)."""
    import triton

    from oasis_kernels.backends.triton_local import _radii
    from oasis_kernels.kernels import local_attention as la

    rows = []
    b, n, h, d = q.shape
    table = torch.arange(h, dtype=torch.int32, device=q.device)
    n_window = h if plan.modes[0] == ok.Mode.WINDOW else 0
    radii = _radii(plan, n_window)
    launch = (table, n_window, plan.grid, radii, d ** -0.5)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    for bt, bh, bw, bn, warps, stages, sliced in configs:
        if sliced and (bh + 2 * radii[1]) * (bw + 2 * radii[2]) > bn:
            continue
        cfg = triton.Config({"BT": bt, "BH": bh, "BW": bw, "BLOCK_N": bn, "SLICED": sliced}, num_warps=warps,
                            num_stages=stages)
        label = f"({bt},{bh},{bw}) N{bn} w{warps} s{stages} {'sliced' if sliced else 'general'}"
        kernels = (
            ("fwd", lambda: la.local_attention_forward(q, k, v, out, lse, *launch, config=cfg), floor),
            # the backward (delta kernel, then dQ and dK/dV in one launch) against its floor, 2x the forward's
            ("bwd", lambda: la.local_attention_backward(dout, q, k, v, out, lse, dq, dk, dv, *launch, config=cfg),
             2 * floor),
        )
        for name, fn, fl in kernels:
            try:
                fn()
                t = bench(fn)
            except Exception as exc:  # a config that does not compile or fit is reported, not fatal
                print(f"{label} {name}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            rows.append(dict(shape=shape, kernel=name, config=label, ms=t, x_floor=t / fl))
    return rows


if __name__ == "__main__":
    sys.exit(main())
