"""A small routed forward + backward through the Triton kernels, for compute-sanitizer.

    compute-sanitizer --tool memcheck python scripts/sanitize_case.py
"""

import torch

import oasis_kernels as ok

plan = ok.RoutingPlan((3, 7, 11), ["w", "g", "i", "w"], (3, 5, 5))
for dtype, d in ((torch.bfloat16, 64), (torch.float16, 96), (torch.float32, 128)):
    q, k, v = (torch.randn(2, plan.num_tokens, plan.heads, d, dtype=dtype, device="cuda", requires_grad=True)
               for _ in range(3))
    out = ok.routed_attention(q, k, v, plan, backend="triton")
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    print(dtype, d, "ok", float(out.detach().float().abs().mean()))
