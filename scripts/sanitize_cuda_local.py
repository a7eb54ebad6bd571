"""A small forward and backward of the CUDA local-attention kernels, for compute-sanitizer
(memcheck, racecheck): mixed window and intra heads, a grid that no tile divides, both head dims.

    compute-sanitizer --tool racecheck python3 scripts/sanitize_cuda_local.py
"""
import torch

from oasis_kernels.kernels import cuda_local

loaded, why = cuda_local.library()
assert loaded, why
for d, dtype in ((64, torch.bfloat16), (128, torch.float16)):
    grid, radii, heads = (5, 7, 11), (1, 2, 2), 3
    n = grid[0] * grid[1] * grid[2]
    q, k, v, dout = (torch.randn(2, n, heads, d, device="cuda", dtype=dtype) for _ in range(4))
    out = torch.empty_like(q)
    lse = torch.empty(2, heads, n, device="cuda")
    table = torch.tensor([2, 0, 1], dtype=torch.int32, device="cuda")  # window 2, 0; intra 1
    cuda_local.forward(q, k, v, out, lse, table, 2, grid, radii, d ** -0.5)
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    cuda_local.backward(dout, q, k, v, out, lse, dq, dk, dv, table, 2, grid, radii, d ** -0.5)
    torch.cuda.synchronize()
    print(f"D={d} {dtype}: finite", all(bool(x.isfinite().all()) for x in (out, lse, dq, dk, dv)))
