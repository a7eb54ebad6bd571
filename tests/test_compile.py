"""torch.compile(fullgraph=True): no graph break, no recompile for a fixed plan, gradients intact."""

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import oasis_kernels as ok
from conftest import DEVICE

PLAN = ok.RoutingPlan((2, 3, 5), ["g", "w", "i", "g"], (3, 3, 3))


def layer(q, k, v):
    out = ok.routed_attention(q * 1.5, k, v, PLAN)
    return out.sin().sum()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_forward_backward_without_recompiles(backend):
    if backend == "inductor" and DEVICE == "cpu":
        pytest.skip("inductor's C++ codegen is slow on CI; aot_eager traces the same graph")
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    for step in range(3):  # fresh data each step: must not recompile
        q, k, v = (torch.randn(2, 30, 4, 64, device=DEVICE, requires_grad=True) for _ in range(3))
        loss = compiled(q, k, v)
        loss.backward()
        grads = [x.grad.clone() for x in (q, k, v)]
        for x in (q, k, v):
            x.grad = None
        eager = layer(q, k, v)
        eager.backward()
        torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
        for g, x in zip(grads, (q, k, v)):
            torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for one plan"


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 30, 4, 64, dtype=torch.bfloat16)
        out, lse = ok.routed_attention(q, q, q, PLAN, return_lse=True)
    assert out.shape == (2, 30, 4, 64) and out.dtype == torch.bfloat16
    assert lse.shape == (2, 4, 30) and lse.dtype == torch.float32


def test_custom_op_is_registered_properly():
    # torch.library's own consistency checks: fake vs real, autograd registration, schema
    q, k, v = (torch.randn(1, 30, 4, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    grid, modes, window = PLAN.as_op_args()
    torch.library.opcheck(
        torch.ops.oasis_kernels.routed_attention_fwd.default,
        (q, k, v, grid, modes, window, 0.25, "reference", True, ok.settings().as_key()),
    )


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_eager_route_matches_the_custom_op(backend, monkeypatch):
    # eager calls skip the op's wrappers (call.routed_attention_call); they must give the op's
    # outputs and gradients bit for bit, and each route must really be the one taken
    import oasis_kernels.call as ops

    q, k, v = (torch.randn(1, 30, 4, 64, device=DEVICE, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 30, 4, 64, device=DEVICE)
    grid, modes, window = PLAN.as_op_args()
    args = (grid, modes, window, 0.125, backend, True)

    op_calls = []
    real_op = ops.routed_attention_fwd
    monkeypatch.setattr(ops, "routed_attention_fwd", lambda *a: op_calls.append(1) or real_op(*a))
    out_e, lse_e = ops.routed_attention_call(q, k, v, *args)
    assert not op_calls and out_e.grad_fn is not None and "RoutedAttention" in type(out_e.grad_fn).__name__
    grads_e = torch.autograd.grad(out_e, (q, k, v), dout)
    out_o, lse_o = real_op(q, k, v, *args, ok.settings().as_key())
    grads_o = torch.autograd.grad(out_o, (q, k, v), dout)
    assert not lse_e.requires_grad and not lse_o.requires_grad
    for a, b in zip((out_e, lse_e, *grads_e), (out_o, lse_o, *grads_o)):
        assert torch.equal(a, b), (a - b).abs().max()
    with torch.no_grad():
        out_n, _ = ops.routed_attention_call(q, k, v, *args)
    assert out_n.grad_fn is None and torch.equal(out_n, out_e)
    # a tensor subclass goes through the op (its fake/meta implementation serves tracing)
    with torch.no_grad():
        ops.routed_attention_call(torch.nn.Parameter(q.detach()), k.detach(), v.detach(), *args)
    assert op_calls == [1]


def test_tracers_and_double_backward_see_the_op_semantics():
    # make_fx with real tensors runs under a dispatch mode: the op must appear in its graph
    # (the eager Function would dissolve into the backends' aten calls, and Triton launches
    # would leave no trace); double backward raises on both routes instead of being wrong
    from torch.fx.experimental.proxy_tensor import make_fx
    import oasis_kernels.call as ops

    q, k, v = (torch.randn(1, 30, 4, 16, device=DEVICE) for _ in range(3))
    graph = make_fx(lambda q, k, v: ok.routed_attention(q, k, v, PLAN, backend="reference"),
                    tracing_mode="real")(q, k, v)
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert any("routed_attention_fwd" in t for t in targets), targets

    grid, modes, window = PLAN.as_op_args()
    for route, extra in ((ops.routed_attention_call, ()), (ops.routed_attention_fwd, (ok.settings().as_key(),))):
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        out, _ = route(qs, ks, vs, grid, modes, window, 0.25, "reference", True, *extra)
        (dq,) = torch.autograd.grad(out, qs, torch.randn_like(out), create_graph=True)
        with pytest.raises(RuntimeError):
            torch.autograd.grad(dq.sum(), qs)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need CUDA")
def test_reduce_overhead_cuda_graphs_match_eager(monkeypatch):
    # torch.compile's CUDA graphs (mode="reduce-overhead") record our op's forward and backward,
    # with the global heads on the high-priority side stream (capture always forks); the replays
    # must give the eager numbers on fresh inputs
    from torch._dynamo.utils import counters

    from oasis_kernels import streams

    torch._dynamo.reset()
    counters.clear()
    forks = []
    real_side = streams.side_stream

    def side_stream(device):
        forks.append(torch.cuda.is_current_stream_capturing())
        return real_side(device)

    monkeypatch.setattr(streams, "side_stream", side_stream)
    plan = ok.RoutingPlan((3, 7, 11), ["g", "i", "w", "g", "w"], (3, 5, 5))
    compiled = torch.compile(lambda q, k, v: ok.routed_attention(q, k, v, plan), mode="reduce-overhead",
                             fullgraph=True)
    try:
        _compare_reduce_overhead(compiled, plan)
    finally:
        torch._dynamo.reset()  # the CUDA-graph trees die with the compiled function
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert any(forks), "the captured calls ran on one stream"  # small layer: forks only in capture


def _compare_reduce_overhead(compiled, plan):
    for step in range(4):  # warm-up, recording, replays
        q, k, v = (torch.randn(1, plan.num_tokens, plan.heads, 64, device=DEVICE, dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        out = compiled(q, k, v)
        got = (out.detach().clone(), *torch.autograd.grad(out, (q, k, v), dout))  # a replay reuses out's memory
        out = ok.routed_attention(q, k, v, plan)
        want = (out, *torch.autograd.grad(out, (q, k, v), dout))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert not a.isnan().any(), (step, name)
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2, msg=lambda m: f"step {step}, {name}: {m}")
