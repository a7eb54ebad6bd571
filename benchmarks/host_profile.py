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
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from attn_bench import SHAPES, capture_graph  # noqa: E402

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="S")
    p.add_argument("--mix", default="5,4,3")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--graphs", action="store_true", help="also time each variant replayed from a CUDA graph")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_profile needs CUDA; nothing measured.")
        return 0

    g, i, w = (int(x) for x in args.mix.split(","))
    report = []

    def say(line):
        print(line, flush=True)
        report.append(line)
        if args.out:  # written as it goes: a failed graph capture may end the process
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "host_profile.txt").write_text("\n".join(report))

    for shape in args.shapes.split(","):
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
                say(f"{name:<44} CUDA graph replay: " + (f"{gpu:.3f} ms/call" if gpu is not None else why))
    return 0


if __name__ == "__main__":
    sys.exit(main())
