"""Calls of the CUDA local kernels for Nsight Compute: for each mode, one forward (and with
``--backward`` one backward: delta, dQ, dK/dV) of ``--heads`` heads of 128 at ``--grid``, bf16, each
mode's calls in turn (window first by default), after one untimed warm-up call of each that ncu's
``--launch-skip`` can pass over (one forward launch, four with the backward).

    ncu -k regex:'forward_tma|wgmma_kernel' --launch-skip 4 -c 4 --section SpeedOfLight ... \\
        python3 scripts/ncu_cuda_local.py --modes window --heads 3 --backward
"""
import argparse

import torch

import oasis_kernels as ok

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--modes", default="window,intra", help="comma list of window, intra (default both, in that order)")
p.add_argument("--heads", type=int, default=12)
p.add_argument("--grid", default="27,45,80", help="T,H,W (default B: 27,45,80)")
p.add_argument("--backward", action="store_true", help="a backward after each forward")
args = p.parse_args()
grid = tuple(int(x) for x in args.grid.split(","))
for mode in args.modes.split(","):
    plan = ok.RoutingPlan(grid, [mode] * args.heads, (3, 5, 5))
    q, k, v = (torch.randn(1, plan.num_tokens, args.heads, 128, device="cuda", dtype=torch.bfloat16,
                           requires_grad=args.backward) for _ in range(3))
    for _ in range(2):  # the warm-up call, then the one to profile
        out = ok.routed_attention(q, k, v, plan, backend="cuda")
        if args.backward:
            out.backward(torch.randn_like(out))
torch.cuda.synchronize()
