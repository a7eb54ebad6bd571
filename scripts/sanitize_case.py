"""A small routed forward + backward through the Triton kernels, for compute-sanitizer.

    compute-sanitizer --tool memcheck python scripts/sanitize_case.py
"""

import torch

import oasis_kernels as ok

plan = ok.RoutingPlan((3, 7, 11), ["w", "g", "i", "w"], (3, 5, 5))
# intra heads only: the unmasked full-block walk, with a tail (77-token frames) and without (64)
intra_plans = [ok.RoutingPlan((3, 7, 11), ["i", "g", "i"], (3, 5, 5)),
               ok.RoutingPlan((2, 4, 16), ["i", "i"], (3, 5, 5))]
for p in [plan, *intra_plans]:
    for dtype, d in ((torch.bfloat16, 64), (torch.float16, 96), (torch.float32, 128)):
        q, k, v = (torch.randn(2, p.num_tokens, p.heads, d, dtype=dtype, device="cuda", requires_grad=True)
                   for _ in range(3))
        for _ in range(3):  # the third call replays from C++ where the extension is built (fastpath)
            out = ok.routed_attention(q, k, v, p, backend="triton")
            out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        print(p, dtype, d, "ok", float(out.detach().float().abs().mean()))

# the routing-statistics kernels (global pass, local pass) on the same small grid
from oasis_kernels.routing import head_statistics  # noqa: E402

for dtype in (torch.bfloat16, torch.float32):
    q, k = (torch.randn(1, plan.num_tokens, 2, 64, dtype=dtype, device="cuda") for _ in range(2))
    stats = head_statistics(q, k, plan.grid, plan.window, query_stride=2, backend="triton")
    torch.cuda.synchronize()
    print("head_statistics", dtype, "ok", float(stats.kl_window.mean()))
