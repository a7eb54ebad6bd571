"""Parity of every dispatch path against the float64 dense reference (CPU in CI, GPU on the device)."""

import pytest
import torch

import oasis_kernels as ok
from conftest import DEVICE
from parity import check_backend, make_qkv

GRIDS = [(1, 1, 1), (2, 3, 5), (3, 7, 11), (4, 6, 9)]
WINDOWS = [(1, 1, 1), (3, 5, 5), (5, 7, 7), (9, 15, 23)]  # the last covers every grid above
INTERLEAVED = ["g", "w", "i", "g", "i", "w"]
CONTIGUOUS = ["g", "g", "i", "i", "w", "w"]

# backends worth forcing on this machine (the Triton kernels have their own test module)
DENSE = ["sdpa_cpu"] if DEVICE == "cpu" else ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient"]


def _runnable(backend, q, plan):
    try:
        ok.decide(q, plan, backend)
    except ok.BackendError as exc:
        pytest.skip(f"{backend} cannot run here: {exc}")


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_grids_and_windows(grid, window, backend, device):
    plan = ok.RoutingPlan(grid, INTERLEAVED, window)
    q, k, v = make_qkv((2, plan.num_tokens, plan.heads, 32), torch.float32, device)
    check_backend(q, k, v, plan, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("modes", [INTERLEAVED, CONTIGUOUS], ids=["interleaved", "contiguous"])
@pytest.mark.parametrize("backend", ["auto", "reference"] + DENSE)
def test_dtypes_head_dims_layouts(dtype, head_dim, modes, backend, device):
    plan = ok.RoutingPlan((3, 7, 11), modes, (3, 5, 5))
    q, k, v = make_qkv((2, plan.num_tokens, plan.heads, head_dim), dtype, device)
    _runnable(backend, q, plan)
    check_backend(q, k, v, plan, backend)


@pytest.mark.parametrize("grid", [(2, 3, 5), (3, 7, 11)])
def test_window_covering_grid_equals_global(grid, device):
    q, k, v = make_qkv((1, grid[0] * grid[1] * grid[2], 3, 32), torch.float64, device)
    big = tuple(2 * s + 1 for s in grid)
    win = ok.window_attention(q, k, v, grid, big, backend="reference")
    glob = ok.global_attention(q, k, v, backend="reference")
    torch.testing.assert_close(win, glob, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_single_frame_intra_equals_global(backend, device):
    grid = (1, 6, 9)
    q, k, v = make_qkv((2, 54, 4, 64), torch.float32, device)
    intra = ok.intra_frame_attention(q, k, v, grid, backend=backend)
    glob = ok.global_attention(q, k, v, backend=backend)
    torch.testing.assert_close(intra, glob, rtol=1e-5, atol=1e-6)


def test_single_pattern_entry_points_match_routed(device):
    grid = (2, 3, 5)
    q, k, v = make_qkv((1, 30, 2, 32), torch.float64, device)
    for fn, mode, args in ((ok.intra_frame_attention, "intra", (grid,)),
                           (ok.window_attention, "window", (grid, (1, 3, 3)))):
        plan = ok.RoutingPlan(grid, [mode] * 2, (1, 3, 3))
        torch.testing.assert_close(fn(q, k, v, *args), ok.routed_attention(q, k, v, plan), rtol=0, atol=0)
    torch.testing.assert_close(ok.global_attention(q, k, v),
                               ok.routed_attention(q, k, v, ok.RoutingPlan(grid, ["g", "g"])), rtol=0, atol=0)


def test_strided_inputs(device):
    """Non-contiguous q/k/v (a fused qkv projection viewed per tensor) give the same answer."""
    plan = ok.RoutingPlan((2, 3, 5), INTERLEAVED, (3, 3, 3))
    qkv = torch.randn(2, 30, 3, 6, 32, dtype=torch.float32, device=device)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    check_backend(q, k, v, plan, "auto")


def test_non_contiguous_head_dim(device):
    """Every other element of a wider last axis: the op copies such inputs once."""
    plan = ok.RoutingPlan((2, 3, 5), INTERLEAVED, (3, 3, 3))
    q, k, v = (torch.randn(1, 30, 6, 64, device=device)[..., ::2] for _ in range(3))
    assert q.stride(-1) == 2
    check_backend(q, k, v, plan, "auto")
    check_backend(q, k, v, plan, "reference")


def test_custom_scale(device):
    plan = ok.RoutingPlan((2, 3, 5), INTERLEAVED, (3, 3, 3))
    q, k, v = make_qkv((1, 30, 6, 32), torch.float32, device)
    check_backend(q, k, v, plan, "auto", scale=0.37)


def test_return_lse_is_not_differentiable(device):
    plan = ok.RoutingPlan((2, 3, 5), ["g", "w"], (3, 3, 3))
    q, k, v = make_qkv((1, 30, 2, 16), torch.float32, device, requires_grad=True)
    out, lse = ok.routed_attention(q, k, v, plan, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 30) and not lse.requires_grad
    with pytest.raises(RuntimeError):  # a loss built from lse alone has nothing to differentiate
        lse.sum().backward()
    # lse is a constant: it does not change the gradient of a loss that also uses out
    dout = torch.randn_like(out)
    g_out = torch.autograd.grad((out * dout).sum(), q, retain_graph=True)[0]
    g_both = torch.autograd.grad((out * dout).sum() + lse.sum(), q)[0]
    torch.testing.assert_close(g_both, g_out, rtol=0, atol=0)


def test_unaligned_views_are_copied_once(device, monkeypatch):
    # a view at an odd element offset, or with row strides that are not a multiple of 16 bytes,
    # reaches no backend: cuDNN computed wrong global heads from such a pointer on the H200
    # (cuDNN 9.19); the dispatch copies it to an aligned tensor first, forward and backward
    from oasis_kernels.backends import BACKENDS
    from oasis_kernels.dispatch import aligned

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    plan = ok.RoutingPlan((2, 3, 5), ["g", "i", "w"], (3, 3, 3))
    shape = (1, plan.num_tokens, plan.heads, 64)
    n = plan.num_tokens * plan.heads * 64
    base = torch.randn(n + 8, device=device, dtype=dtype)
    odd = base[1:1 + n].view(shape)
    assert odd.data_ptr() % 16 and odd.is_contiguous()
    fixed = aligned(odd)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, odd)
    ok_view = base[8:8 + n].view(shape)
    assert aligned(ok_view) is ok_view  # no copy when nothing is wrong
    wide = torch.randn(*shape[:-1], 66, device=device, dtype=dtype)[..., :64]  # 132- or 264-byte rows
    assert aligned(wide).is_contiguous() and torch.equal(aligned(wide), wide)
    d20 = torch.randn(1, 4, 2, 20, device=device, dtype=dtype)  # 40-byte rows: a copy would not help
    assert aligned(d20) is d20

    dense = "sdpa_cudnn" if device == "cuda" else "sdpa_cpu"
    seen = []
    for name in {dense, "triton" if device == "cuda" else "reference"}:
        for method in ("forward", "backward"):
            real = getattr(BACKENDS[name], method)

            def spy(*args, real=real, **kwargs):
                seen.extend(a.data_ptr() % 16 for a in args if isinstance(a, torch.Tensor))
                return real(*args, **kwargs)
            monkeypatch.setattr(BACKENDS[name], method, spy)
    views = [torch.empty_like(base)[1:1 + n].view(shape).copy_(torch.randn(shape, dtype=dtype))
             .requires_grad_() for _ in range(3)]
    dout = torch.empty_like(base)[1:1 + n].view(shape).normal_()
    out = ok.routed_attention(*views, plan, backend={"global": dense, "intra": dense})
    grads = torch.autograd.grad(out, views, dout)
    assert seen and not any(seen), "a backend received an unaligned tensor"
    leaves = [x.detach().clone().requires_grad_() for x in views]
    ref = ok.routed_attention(*(x.double() for x in leaves), plan, backend="reference")
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(got.double(), want.double(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_empty_batch_gives_empty_outputs_and_gradients(dtype, device):
    """B == 0 returns empty tensors, as PyTorch's SDPA does, with autograd (empty gradients)."""
    plan = ok.RoutingPlan((2, 3, 5), INTERLEAVED, (3, 3, 3))
    q, k, v = (torch.randn(0, 30, 6, 16, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    out, lse = ok.routed_attention(q, k, v, plan, return_lse=True)
    want_lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == (0, 30, 6, 16) and out.dtype == dtype and out.device == q.device and out.requires_grad
    assert lse.shape == (0, 6, 30) and lse.dtype == want_lse_dtype and not lse.requires_grad
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert all(g.shape == q.shape and g.dtype == dtype for g in grads)
    for fn in (lambda: ok.global_attention(q, k, v), lambda: ok.intra_frame_attention(q, k, v, (2, 3, 5)),
               lambda: ok.window_attention(q, k, v, (2, 3, 5)), lambda: ok.routed_attention(q, k, v, plan,
                                                                                            backend="reference")):
        assert fn().shape == q.shape
    lse_only = ok.attention_lse(q.detach(), k.detach(), plan)
    assert lse_only.shape == (0, 6, 30) and lse_only.dtype == want_lse_dtype
    # as PyTorch's own attention on the same empty batch
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
    if sdpa is not None:  # torch 2.11 returned None here for bf16 on CUDA (H200, 2026-12-04)
        assert sdpa.transpose(1, 2).shape == out.shape
