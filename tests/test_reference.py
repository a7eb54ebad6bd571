"""The chunked reference (the package's CPU path) against the dense one, chunk boundaries included."""

import pytest
import torch

import oasis_kernels as ok
from oasis_kernels.masks import mask_for
from oasis_kernels.reference import box_attention_backward, box_attention_forward, dense_reference


@pytest.mark.parametrize("mode", ["global", "intra", "window"])
@pytest.mark.parametrize("budget", [1, 4096, 256 << 20])  # 1 byte: one query per chunk
def test_chunked_equals_dense(mode, budget):
    grid, window = (3, 4, 5), (3, 3, 5)
    plan = ok.RoutingPlan(grid, [mode] * 2, window)
    q, k, v = (torch.randn(2, 60, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ref, ref_lse = dense_reference(q, k, v, plan)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    mask = mask_for(mode, grid, window)
    out, lse = box_attention_forward(q.detach(), k.detach(), v.detach(), mask, 0.25, budget_bytes=budget)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse.detach(), rtol=0, atol=1e-12)
    grads = box_attention_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, mask, 0.25, budget_bytes=budget)
    for g, x in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, x.grad, rtol=0, atol=1e-12)
