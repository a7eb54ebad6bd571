"""One forward of the CUDA local kernels at B (27,45,80), 12 heads of 128, bf16: window heads, then
intra heads, for Nsight Compute (the first forward_wgmma_kernel launches are these two).

    ncu -k regex:forward_wgmma_kernel -c 2 --section SpeedOfLight ... python3 scripts/ncu_cuda_local.py
"""
import torch

import oasis_kernels as ok

grid = (27, 45, 80)
for mode in ("w", "i"):
    plan = ok.RoutingPlan(grid, [mode] * 12, (3, 5, 5))
    q, k, v = (torch.randn(1, plan.num_tokens, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ok.routed_attention(q, k, v, plan, backend="cuda")
torch.cuda.synchronize()
