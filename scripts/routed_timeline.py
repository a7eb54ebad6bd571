"""GPU timeline of one routed fwd+bwd step (device diagnostic): every kernel with its stream,
start and end, for the routed layer and for its global heads alone (cuDNN SDPA), so the
routed layer's excess over its global heads can be read kernel by kernel.

    python scripts/routed_timeline.py OUT_DIR [--shape S] [--graph]

Steps are separated by a synchronize and an idle millisecond, so each starts on an idle GPU;
with ``--graph`` each step is a CUDA-graph replay (no host in the way). Prints the median
step's kernels and writes ``timeline_<shape>.json`` (all steps) to OUT_DIR.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from attn_bench import SHAPES, capture_graph  # noqa: E402

import oasis_kernels as ok  # noqa: E402


def kernel_events(prof) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    evs = [e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(evs, key=lambda e: e["ts"])


def split_steps(evs, gap_us=20.0) -> list[list[dict]]:
    """Kernels grouped into steps: a new step starts after an idle gap of ``gap_us``."""
    steps, cur, end = [], [], None
    for e in evs:
        if end is not None and e["ts"] - end > gap_us:
            steps.append(cur)
            cur = []
        cur.append(e)
        end = max(end or 0.0, e["ts"] + e["dur"])
    if cur:
        steps.append(cur)
    return steps


def describe(step) -> dict:
    t0 = step[0]["ts"]
    span = max(e["ts"] + e["dur"] for e in step) - t0
    rows = [dict(stream=e["args"].get("stream"), start=round(e["ts"] - t0, 2), dur=round(e["dur"], 2),
                 name=e["name"][:90]) for e in step]
    busy = {}
    for r in rows:
        busy[r["stream"]] = busy.get(r["stream"], 0.0) + r["dur"]
    return dict(span_us=round(span, 2), busy_us={str(k): round(v, 2) for k, v in busy.items()}, kernels=rows)


def run(name, step_fn, n, graph):
    fn = capture_graph(step_fn).replay if graph else step_fn
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
            torch.cuda.synchronize()
            time.sleep(1e-3)  # an idle millisecond between steps: split_steps cuts there
    steps = [describe(s) for s in split_steps(kernel_events(prof))]
    spans = [s["span_us"] for s in steps]
    med = statistics.median(spans)
    pick = min(steps, key=lambda s: abs(s["span_us"] - med))
    print(f"\n== {name}{' (graph)' if graph else ''}: {len(steps)} steps, span median {med:.1f} us "
          f"(min {min(spans):.1f}, max {max(spans):.1f}); median step busy per stream {pick['busy_us']}")
    for r in pick["kernels"]:
        print(f"  s{r['stream']:<3} {r['start']:8.1f} +{r['dur']:7.1f}  {r['name']}")
    return dict(name=name, graph=graph, spans=spans, median_step=pick)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--shape", default="S")
    p.add_argument("--graph", action="store_true")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    grid = SHAPES[args.shape]
    plan = ok.RoutingPlan.from_counts(grid, 5, 4, 3, (3, 5, 5))
    q, k, v = (torch.randn(1, plan.num_tokens, 12, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    g = [x[:, :, :5].detach().contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v)]
    dg = do[:, :, :5].contiguous().transpose(1, 2)

    def routed():
        torch.autograd.grad(ok.routed_attention(q, k, v, plan), (q, k, v), do)

    local_plan = ok.RoutingPlan(grid, ["intra"] * 4 + ["window"] * 3, (3, 5, 5))

    def local_only():
        out = ok.routed_attention(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], local_plan)
        torch.autograd.grad(out, (q, k, v), do[:, :, 5:])

    def global_alone():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            torch.autograd.grad(F.scaled_dot_product_attention(*g), g, dg)

    res = [run(n, f, args.steps, args.graph) for n, f in
           (("routed 5g/4i/3w", routed), ("4i/3w local heads alone", local_only), ("5 global alone", global_alone))]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"timeline_{args.shape}{'_graph' if args.graph else ''}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
