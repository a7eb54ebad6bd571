#!/usr/bin/env python
"""Where the time of one routed forward+backward goes: host (Python, dispatch, launches) or GPU.

    python benchmarks/host_profile.py --shapes S --mix 5,4,3 --out DIR

Per shape: the wall time of a call with the host waiting for the GPU after it, the host time
to enqueue it (no wait), and the GPU time of each kernel from ``torch.profiler``. When the
enqueue time is close to the wall time, the call is host-bound and its GPU work hides behind
the host.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from attn_bench import SHAPES  # noqa: E402

import oasis_kernels as ok  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="S")
    p.add_argument("--mix", default="5,4,3")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_profile needs CUDA; nothing measured.")
        return 0
    from torch.profiler import ProfilerActivity, profile

    g, i, w = (int(x) for x in args.mix.split(","))
    report = []
    for shape in args.shapes.split(","):
        plan = ok.RoutingPlan.from_counts(SHAPES[shape], g, i, w, (3, 5, 5))
        q, k, v = (torch.randn(1, plan.num_tokens, plan.heads, args.head_dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)

        def step():
            out = ok.routed_attention(q, k, v, plan, backend=args.backend)
            torch.autograd.grad(out, (q, k, v), dout)

        for _ in range(20):
            step()
        torch.cuda.synchronize()
        n = 50
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        t_enqueue = (time.perf_counter() - t0) / n * 1e3
        torch.cuda.synchronize()
        t_wall = (time.perf_counter() - t0) / n * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        gpu_us = sum(e.self_device_time_total for e in prof.key_averages()) / 10
        head = (f"{shape} {plan.grid} {plan}: wall {t_wall:.3f} ms/step, host enqueue {t_enqueue:.3f} ms/step, "
                f"GPU kernels {gpu_us / 1e3:.3f} ms/step")
        print(head)
        print(table)
        report += [head, table]
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "host_profile.txt").write_text("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
