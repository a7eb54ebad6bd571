"""Chrome trace and per-op host times of eager routed fwd+bwd steps at S (device diagnostic).

    python scripts/trace_step.py OUT_DIR
"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import oasis_kernels as ok

out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
plan = ok.RoutingPlan.from_counts((5, 20, 40), 5, 4, 3, (3, 5, 5))
q, k, v = (torch.randn(1, plan.num_tokens, 12, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
do = torch.randn_like(q)


def step():
    torch.autograd.grad(ok.routed_attention(q, k, v, plan), (q, k, v), do)


for _ in range(20):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(20):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
prof.export_chrome_trace(os.path.join(out_dir, "trace_S_step.json"))
