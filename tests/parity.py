"""Parity harness: run a backend and check out, LSE and gradients against float64 truth.

Truth and the plain-PyTorch baseline come from the dense reference (materialized masks)
for small grids and from the chunked reference at float64 / input-dtype precision for
grids too large for ``N x N`` matrices.
"""

from __future__ import annotations

import math

import torch

import oasis_kernels as ok
from oasis_kernels.masks import mask_for
from oasis_kernels.plan import head_runs
from oasis_kernels.reference import box_attention_backward, box_attention_forward, dense_reference

from tolerance import assert_rule

DENSE_MAX_TOKENS = 2048


def make_qkv(shape, dtype, device, requires_grad=False):
    return [torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad) for _ in range(3)]


def _dense_truth(q, k, v, plan, dout, scale, upcast):
    # leaves in float64 for the truth, so its gradients are not rounded back to the input dtype
    qs, ks, vs = (x.detach().to(torch.float64 if upcast else x.dtype).requires_grad_() for x in (q, k, v))
    out, lse = dense_reference(qs, ks, vs, plan, scale, upcast=upcast)
    if dout is None:
        return out.detach(), lse.detach(), None
    out.backward(dout.to(out.dtype))
    return out.detach(), lse.detach(), [x.grad for x in (qs, ks, vs)]


def _chunked_truth(q, k, v, plan, dout, scale, upcast):
    cdt = torch.float64 if upcast else q.dtype
    src = [x.detach().to(torch.float64) if upcast else x.detach() for x in (q, k, v)]
    out = torch.empty_like(src[0])
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float64, device=q.device)
    grads = [torch.empty_like(x) for x in src] if dout is not None else None
    for mode in ok.Mode:
        mask = mask_for(mode, plan.grid, plan.window)
        for run in head_runs(plan.heads_of(mode)):
            qh, kh, vh = (x[:, :, run] for x in src)
            o, l = box_attention_forward(qh, kh, vh, mask, scale, compute_dtype=cdt)
            out[:, :, run], lse[:, run] = o, l.double()
            if dout is not None:
                g = box_attention_backward(dout[:, :, run].to(cdt), qh, kh, vh, o, l, mask, scale, compute_dtype=cdt)
                for dst, x in zip(grads, g):
                    dst[:, :, run] = x
    return out, lse, grads


def truth_and_baseline(q, k, v, plan, dout, scale):
    fn = _dense_truth if plan.num_tokens <= DENSE_MAX_TOKENS else _chunked_truth
    return fn(q, k, v, plan, dout, scale, True), fn(q, k, v, plan, dout, scale, False)


def check_backend(q, k, v, plan, backend, *, grads=True, scale=None, what=""):
    """Run ``routed_attention`` with ``backend`` and apply the tolerance rule to everything it returns."""
    dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dout = torch.randn_like(q) if grads else None
    (ref, ref_lse, ref_g), (base, base_lse, base_g) = truth_and_baseline(q, k, v, plan, dout, scale)

    # detach() keeps the inputs' strides (clone() would make strided views contiguous)
    qs, ks, vs = (x.detach().requires_grad_(grads) for x in (q, k, v))
    out, lse = ok.routed_attention(qs, ks, vs, plan, scale=scale, backend=backend, return_lse=True)
    tag = f"{what} {plan} backend={backend} {dtype}"
    assert out.dtype == dtype and out.shape == q.shape
    assert_rule(out, ref, base, kind="fwd", dtype=dtype, what=f"out [{tag}]")
    assert_rule(lse, ref_lse, base_lse, kind="fwd", dtype=dtype, what=f"lse [{tag}]")
    if grads:
        out.backward(dout)
        for name, x, r, b in zip("qkv", (qs, ks, vs), ref_g, base_g):
            assert_rule(x.grad, r, b, kind="grad", dtype=dtype, what=f"d{name} [{tag}]")
    return out, lse
