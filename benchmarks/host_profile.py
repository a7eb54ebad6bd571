#!/usr/bin/env python
"""Where the time of a routed forward(+backward) goes: host (Python, dispatch, launches) or GPU.

    python benchmarks/host_profile.py --shapes S --mix 5,4,3 --out DIR [--cprofile]

Per shape and variant (our op with several backends, and PyTorch's SDPA on the same heads):
``wall``, the time per call of a loop with the host waiting for the GPU only at its end, and
``enqueue``, the host time to issue the calls. When enqueue is close to wall, the call is
host-bound and its GPU work hides behind the host. ``gpu`` is the time per call of the same
work replayed from a CUDA graph (no host at all, ``--graphs``), where capture works. Each variant is also
run once under ``torch.cuda.set_sync_debug_mode("warn")`` so a call that makes the host wait
for the GPU is named. ``--cprofile`` adds a Python profile of our fwd+bwd.

With ``--out``, ``host_profile.txt`` (the environment line first, then what was printed) and
``host_profile.json`` (the environment, the settings and the rows) are written as the run goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from attn_bench import (SHAPES, _check_out_dir, _commit, _ints, _names, _Parser, _positive_int,  # noqa: E402
                        _require_cuda, capture_graph, environment)

import oasis_kernels as ok  # noqa: E402


def host_time(fn, n, warmup=0):
    """``(enqueue, wall)`` ms per call of ``n`` back-to-back calls of ``fn`` after ``warmup`` more:
    the host time to issue them, and the time until the GPU has finished them."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t_enqueue = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return t_enqueue, (time.perf_counter() - t0) / n * 1e3


def _graph_ms(fn, n):
    """GPU time per call from a CUDA graph of ``n`` calls; None (and the reason) where capture fails."""
    try:
        g = capture_graph(fn, calls=n)
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 5 / n, ""
    except Exception as exc:  # report, keep going
        torch.cuda.synchronize()
        import traceback
        traceback.print_exc()
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def _syncs(fn) -> list[str]:
    """Messages of the calls in one ``fn()`` that synchronize the host with the GPU."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sorted({str(w.message).splitlines()[0][:120] for w in caught})


def variants(plan, q, k, v, dout):
    """name -> callable, each one forward or forward+backward of the same layer or its global heads."""
    g = plan.heads_of("global")
    out = {}
    for backend in ("auto", "triton"):
        def fwd(backend=backend):
            with torch.no_grad():
                ok.routed_attention(q, k, v, plan, backend=backend)

        def step(backend=backend):
            o = ok.routed_attention(q, k, v, plan, backend=backend)
            torch.autograd.grad(o, (q, k, v), dout)

        out[f"ours {backend} fwd"], out[f"ours {backend} fwd+bwd"] = fwd, step
    if g:
        sel = slice(g[0], g[-1] + 1)
        qg, kg, vg = (x.detach()[:, :, sel].transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        dg = dout[:, :, sel].transpose(1, 2).contiguous()
        for name, kind in (("cudnn", torch.nn.attention.SDPBackend.CUDNN_ATTENTION),
                           ("flash", torch.nn.attention.SDPBackend.FLASH_ATTENTION)):
            def sdpa_step(kind=kind):
                with torch.nn.attention.sdpa_kernel(kind):
                    o = F.scaled_dot_product_attention(qg, kg, vg)
                torch.autograd.grad(o, (qg, kg, vg), dg)

            out[f"SDPA {name}, {len(g)} global heads, fwd+bwd"] = sdpa_step
    return out


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="S", help=f"comma list of presets: {', '.join(SHAPES)} (default S)")
    p.add_argument("--mix", default="5,4,3", help="global,intra,window head counts (default 5,4,3)")
    p.add_argument("--head-dim", type=_positive_int, default=128)
    p.add_argument("--calls", type=_positive_int, default=50, help="calls per timing (default 50)")
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--graphs", action="store_true", help="also time each variant replayed from a CUDA graph")
    p.add_argument("--out", default=None, help="directory for host_profile.txt and host_profile.json")
    args = p.parse_args(argv)
    try:
        args.shapes = _names(args.shapes, "--shapes", SHAPES, "preset(s)")
        args.mix = _ints(args.mix, "--mix", 3)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if min(args.mix) < 0 or sum(args.mix) == 0:
        p.error(f"--mix: head counts must be >= 0 with at least one head, got {args.mix}")
    _check_out_dir(p, args.out)
    _require_cuda(p, "host_profile times GPU work")
    return args


def write_report(out: Path, text: list[str], record: dict) -> None:
    """``host_profile.txt`` (``text``) and ``host_profile.json`` (``record``) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_profile.txt").write_text("\n".join(text) + "\n")
    (out / "host_profile.json").write_text(json.dumps(record, indent=1, default=str))


def env_line(env: dict) -> str:
    return (f"{env.get('gpu', 'cpu')}, torch {env['torch']}, triton {env['triton']}, cuDNN {env.get('cudnn')}, "
            f"driver {env.get('driver')}, commit {_commit(env)}, "
            f"{env['date']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    g, i, w = args.mix
    env = environment(torch.device("cuda"))
    report = []
    record = {"env": env, "args": vars(args), "rows": []}

    def say(line):
        print(line, flush=True)
        report.append(line)
        if args.out:  # written as it goes: a failed graph capture may end the process
            write_report(Path(args.out), report, record)

    say(env_line(env))
    for shape in args.shapes:
        plan = ok.RoutingPlan.from_counts(SHAPES[shape], g, i, w, (3, 5, 5))
        q, k, v = (torch.randn(1, plan.num_tokens, plan.heads, args.head_dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        say(f"## {shape} {plan.grid} {plan}")
        say(f"{'variant':<44} {'enqueue ms':>10} {'wall ms':>8}  syncs")
        fns = variants(plan, q, k, v, dout)
        for name, fn in fns.items():
            for _ in range(10):
                fn()
            enqueue, wall = host_time(fn, args.calls)
            syncs = _syncs(fn)
            record["rows"].append({"shape": shape, "variant": name, "enqueue_ms": enqueue, "wall_ms": wall,
                                   "syncs": syncs})
            say(f"{name:<44} {enqueue:10.3f} {wall:8.3f}  {len(syncs)} {'; '.join(syncs)}")
        if args.cprofile:
            fn = variants(plan, q, k, v, dout)["ours auto fwd+bwd"]
            prof = cProfile.Profile()
            torch.cuda.synchronize()
            prof.enable()
            for _ in range(args.calls):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            for key in ("tottime", "cumtime"):
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(30)
                say(f"### cProfile of {args.calls} x ours auto fwd+bwd, by {key}\n{buf.getvalue()}")
        if args.graphs:
            # last: a failed capture can leave the process's CUDA state unusable
            for name, fn in fns.items():
                gpu, why = _graph_ms(fn, 5)
                row = next(r for r in record["rows"] if (r["shape"], r["variant"]) == (shape, name))
                row["graph_ms" if gpu is not None else "graph_error"] = gpu if gpu is not None else why
                say(f"{name:<44} CUDA graph replay: " + (f"{gpu:.3f} ms/call" if gpu is not None else why))
    return 0


if __name__ == "__main__":
    sys.exit(main())
