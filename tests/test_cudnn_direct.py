"""The direct cuDNN path (csrc/cudnn_sdpa.cpp via oasis_kernels.kernels.cudnn_direct): cuDNN's
attention written straight into head slices of wider tensors, against PyTorch's cuDNN operator
on the same heads (own tensors), and nothing written outside the slice. GPU only, and only where
the extension was built with the cuDNN frontend headers."""

import pytest
import torch

import oasis_kernels as ok
from oasis_kernels.kernels import cudnn_direct
from parity import check_backend, make_qkv

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(not cudnn_direct.BUILT, reason="extension built without the cuDNN frontend")]


def _heads(x, run):
    return x[:, :, run].transpose(1, 2)


def _close(got, want, what):
    err = (got.float() - want.float()).abs().max().item()
    tol = 2e-2 * max(1.0, want.float().abs().max().item())
    assert err <= tol, f"{what}: max abs diff {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
# (B, N, first head): the LSE's head slice 16-byte aligned (N % 4 == 0) and restrided for the
# backward's Stats (B == 1); not aligned: the forward stages Stats and the backward copies them;
# aligned base but strides of N = 333 floats: written in place, copied for the backward
@pytest.mark.parametrize(("b", "n", "first"), [(1, 336, 1), (2, 333, 1), (2, 333, 0)])
def test_direct_cudnn_matches_pytorch_cudnn_in_place(dtype, d, b, n, first):
    h, run = 6, slice(first, first + 3)
    scale = d ** -0.5
    q, k, v, dout = (torch.randn(b, n, h, d, device="cuda", dtype=dtype) for _ in range(4))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, h, n), float("nan"), device="cuda")
    assert cudnn_direct.forward_into(*(_heads(x, run) for x in (q, k, v, out)), lse[:, run], scale), \
        cudnn_direct.last_decline()

    own = [_heads(x, run).contiguous().requires_grad_() for x in (q, k, v)]
    ref_o, ref_lse = torch.ops.aten._scaled_dot_product_cudnn_attention(*own, None, True, 0.0, False, False,
                                                                        scale=scale)[:2]
    assert cudnn_direct.last_decline() == "", cudnn_direct.last_decline()
    _close(_heads(out, run), ref_o, "out")
    _close(lse[:, run], ref_lse.reshape(b, 3, n), "lse")
    outside = [i for i in range(h) if not run.start <= i < run.stop]
    assert out[:, :, outside].isnan().all() and lse[:, outside].isnan().all(), "wrote outside the head slice"

    grads = [torch.full_like(q, float("nan")) for _ in range(3)]
    assert cudnn_direct.backward_into(*(_heads(x, run) for x in (dout, q, k, v, out)), lse[:, run],
                                      *(_heads(g, run) for g in grads), scale), cudnn_direct.last_decline()
    seed = torch.empty((), dtype=torch.int64, device="cuda")
    ref = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        _heads(dout, run).contiguous(), *own, ref_o, ref_lse, seed, seed, None, None, None, n, n, 0.0, False,
        scale=scale)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        _close(_heads(g, run), r, name)
        assert g[:, :, outside].isnan().all(), f"{name}: wrote outside the head slice"


def test_scale_is_an_argument_not_part_of_the_cached_graph():
    q, k, v = (torch.randn(1, 128, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    views = [x.transpose(1, 2) for x in (q, k, v)]
    for scale in (0.125, 0.03):  # the same layout twice: the second call reuses the graph
        out, lse = torch.empty_like(q), torch.empty(1, 2, 128, device="cuda")
        assert cudnn_direct.forward_into(*views, out.transpose(1, 2), lse, scale), cudnn_direct.last_decline()
        ref = torch.ops.aten._scaled_dot_product_cudnn_attention(*(x.contiguous() for x in views), None, True, 0.0,
                                                                 False, False, scale=scale)
        _close(out.transpose(1, 2), ref[0], f"out at scale {scale}")
        _close(lse, ref[1].reshape(1, 2, 128), f"lse at scale {scale}")


def test_backward_is_deterministic_under_use_deterministic_algorithms():
    """The API documents that the dense backends follow torch.use_deterministic_algorithms; the
    direct path then builds cuDNN's deterministic backward (a graph of its own)."""
    q, k, v, dout = (torch.randn(1, 1024, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    views = [x.transpose(1, 2) for x in (dout, q, k, v)]
    out, lse = torch.empty_like(q), torch.empty(1, 2, 1024, device="cuda")
    assert cudnn_direct.forward_into(*views[1:], out.transpose(1, 2), lse, 0.125), cudnn_direct.last_decline()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(3):
            grads = [torch.empty_like(q) for _ in range(3)]
            assert cudnn_direct.backward_into(*views, out.transpose(1, 2), lse, *(g.transpose(1, 2) for g in grads),
                                              0.125), cudnn_direct.last_decline()
            runs.append(grads)
    finally:
        torch.use_deterministic_algorithms(before)
    for name, *gs in zip(("dq", "dk", "dv"), *runs):
        assert all(torch.equal(gs[0], g) for g in gs[1:]), f"{name} differs between identical backward calls"


def test_routed_global_heads_take_the_direct_path():
    plan = ok.RoutingPlan((2, 4, 8), ["global", "intra", "global", "global"], (1, 3, 3))
    q, k, v = (torch.randn(1, plan.num_tokens, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ok.routed_attention(q, k, v, plan, backend="sdpa_cudnn")
    assert cudnn_direct.last_decline() == "", cudnn_direct.last_decline()


def test_declines_what_it_cannot_serve():
    q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.float32)  # fp32: cuDNN SDPA takes fp16/bf16
    lse = torch.empty(1, 2, 64, device="cuda")
    assert not cudnn_direct.forward_into(*(x.transpose(1, 2) for x in (q, q, q, q)), lse, 0.125)
    assert "fp16/bf16" in cudnn_direct.last_decline(), cudnn_direct.last_decline()
    # a head dim cuDNN's attention does not take (not a multiple of 8): declined inside cuDNN's
    # frontend, which throws for it, and nothing written
    q = torch.randn(1, 64, 2, 12, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    assert not cudnn_direct.forward_into(*(x.transpose(1, 2) for x in (q, q, q, out)), lse, 0.25)
    assert "cuDNN" in cudnn_direct.last_decline() and out.isnan().all(), cudnn_direct.last_decline()
    # sizes that do not agree (lse too short)
    q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert not cudnn_direct.forward_into(*(x.transpose(1, 2) for x in (q, q, q, q)), lse[:, :, :32], 0.125)
    assert "do not agree" in cudnn_direct.last_decline()


# the global heads are heads 1 and 2, so their LSE slice starts N floats in: 16-byte aligned at
# N = 192, not at N = 231 (the forward stages cuDNN's Stats)
@pytest.mark.parametrize("grid", [(3, 8, 8), (3, 7, 11)])
def test_eager_replay_writes_the_global_heads_in_place(grid):
    """The eager C++ replay (csrc/eager_routed.cpp) calls the direct path for its global heads:
    each call clears a decline reason left on this thread (the first call by the Python path's
    dense backend, the next ones by the replay), and every call passes the tolerance rule
    against the fp64 reference (out, lse, gradients). The backward runs on autograd's device
    thread, whose decline reason this thread cannot see: its path is not asserted."""
    from oasis_kernels import fastpath

    from oasis_kernels import call as call_module

    if fastpath._C is None or not ok.settings().eager_replay:
        pytest.skip(f"the eager C++ replay is off or not built: {fastpath.UNAVAILABLE}")
    call_module._CALLS.clear()  # so the first call takes the Python path and records it
    plan = ok.RoutingPlan(grid, ["intra", "global", "global", "window"], (3, 5, 5))
    q, k, v = make_qkv((1, plan.num_tokens, 4, 64), torch.bfloat16, "cuda")
    fp32 = torch.randn(1, 64, 2, 64, device="cuda").transpose(1, 2)
    for call in range(3):  # recorded; replayed (preparing the backward); replayed with the C++ backward
        assert not cudnn_direct.forward_into(fp32, fp32, fp32, fp32, torch.empty(1, 2, 64, device="cuda"), 0.125)
        out, _ = check_backend(q, k, v, plan, "auto", what=f"call {call}")
        assert cudnn_direct.last_decline() == "", f"call {call}: {cudnn_direct.last_decline()}"
    assert "RoutedFunction" in out.grad_fn.name(), out.grad_fn.name()  # the last call was the C++ replay
