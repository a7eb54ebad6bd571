"""Host and wall time per eager call with the C++ replay (oasis_kernels.fastpath) on and off
(device diagnostic). Each variant runs 300 times back to back after a warm-up; ``host`` is the
time to issue a call, ``wall`` the time per call until the GPU is done: equal when host-bound.

    python scripts/fastpath_host.py [--shapes S,A]
"""
import argparse
import sys

import torch

sys.path.insert(0, "benchmarks")
from attn_bench import SHAPES  # noqa: E402
from host_profile import host_time  # noqa: E402

import oasis_kernels as ok  # noqa: E402
from oasis_kernels import call as call_module  # noqa: E402
from oasis_kernels import fastpath  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--shapes", default="S")
args = parser.parse_args()
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, extension built: {fastpath._C is not None}")
for shape in args.shapes.split(","):
    grid = SHAPES[shape]
    for label, counts in (("routed 5g/4i/3w", (5, 4, 3)), ("12 intra", (0, 12, 0)), ("12 window", (0, 0, 12))):
        plan = ok.RoutingPlan.from_counts(grid, *counts, (3, 5, 5))
        q, k, v = (torch.randn(1, plan.num_tokens, 12, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)

        def fwd():
            with torch.no_grad():
                ok.routed_attention(q, k, v, plan)

        def fwdbwd():
            torch.autograd.grad(ok.routed_attention(q, k, v, plan), (q, k, v), do)

        for on in (True, False):
            with ok.use_settings(eager_replay=on):
                for name, fn in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
                    host, wall = host_time(fn, 300, warmup=10)
                    print(f"{shape} {label:<16} {name:<8} C++ replay {'on ' if on else 'off'}  "
                          f"host {host * 1e3:8.1f} us  wall {wall * 1e3:8.1f} us", flush=True)
calls = list(call_module._CALLS.values())
print("prepared calls:", len(calls), "with a replayed forward:", sum(bool(c.replay_forward) for c in calls),
      "backward:", sum(bool(c.replay_backward) for c in calls))
