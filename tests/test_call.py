"""Settings (oasis_kernels.config) and prepared calls (oasis_kernels.call): validation, the
override's scope, what a call keeps, and that a prepared call computes what routed_attention does."""

import threading

import pytest
import torch

import oasis_kernels as ok
from conftest import DEVICE
from oasis_kernels import call as call_module
from parity import check_backend, make_qkv

PLAN = ok.RoutingPlan((2, 3, 5), ["g", "w", "i", "g"], (3, 3, 3))


def test_settings_are_validated_and_restored():
    before = ok.settings()
    with pytest.raises(TypeError, match="unknown setting.*'overlapp'.*known: autotune"):
        ok.configure(overlapp=False)
    with pytest.raises(TypeError, match="overlap must be a bool"):
        ok.configure(overlap="no")
    with pytest.raises(ValueError, match="overlap_min_flops"):
        ok.Settings(overlap_min_flops=float("nan"))
    with pytest.raises(TypeError, match="takes a Settings"):
        with ok.use_settings({"overlap": False}):
            pass
    assert ok.settings() == before  # a rejected change changes nothing
    with ok.use_settings(overlap=False, autotune=False) as inside:
        assert ok.settings() is inside and not inside.overlap and not inside.autotune
        with ok.use_settings(ok.Settings(eager_replay=False)):
            assert ok.settings() == ok.Settings(eager_replay=False)
        assert ok.settings() is inside
    assert ok.settings() == before
    with pytest.raises(RuntimeError):
        with ok.use_settings(cudnn_direct=False):
            raise RuntimeError("restored on errors too")
    assert ok.settings() == before
    previous = ok.configure(overlap_min_flops=5e9)
    try:
        assert ok.settings().overlap_min_flops == 5e9 and previous == before
    finally:
        ok.configure(previous)
    assert ok.settings() == before


def test_environment_gives_the_defaults(monkeypatch):
    from oasis_kernels import config

    monkeypatch.setenv("OASIS_OVERLAP", "0")
    monkeypatch.setenv("OASIS_CPP_EAGER", "0")
    monkeypatch.delenv("OASIS_TRITON_AUTOTUNE", raising=False)
    got = config._from_environment()
    assert not got.overlap and not got.eager_replay and got.autotune and got.cudnn_direct


def test_prepared_call_matches_routed_attention_with_gradients(device):
    q, k, v = make_qkv((2, PLAN.num_tokens, PLAN.heads, 64), torch.float32, device, requires_grad=True)
    call = ok.prepare(q, PLAN, k, v)
    assert call is ok.prepare(q, PLAN, k, v)  # one call per signature
    dout = torch.randn_like(q)
    out, lse = call(q, k, v, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want, want_lse = ok.routed_attention(q, k, v, PLAN, return_lse=True)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # and against the float64 reference, through the API as a user calls it
    check_backend(q.detach(), k.detach(), v.detach(), PLAN, "auto")
    # prepared from q alone, k and v are q (v is k): a distinct v is named
    with pytest.raises(ValueError, match="v_is_k False \\(prepared for True\\)"):
        ok.prepare(q, PLAN)(q, k, v)


def test_prepared_call_refuses_other_inputs(device):
    q, k, v = make_qkv((1, PLAN.num_tokens, PLAN.heads, 64), torch.float32, device)
    call = ok.prepare(q, PLAN)
    with pytest.raises(ValueError, match="shape .*prepared for"):
        call(*(torch.randn(2, PLAN.num_tokens, PLAN.heads, 64, device=device) for _ in range(3)))
    with pytest.raises(ValueError, match="strides .*prepared for"):
        wide = torch.randn(1, PLAN.num_tokens, PLAN.heads, 128, device=device)[..., :64]
        call(wide, wide, wide)
    with pytest.raises(ValueError, match="tokens"):  # the API's own checks come first
        call(*(torch.randn(1, 7, PLAN.heads, 64, device=device) for _ in range(3)))
    with pytest.raises(TypeError, match="settings must be"):
        ok.prepare(q, PLAN, settings={"overlap": False})


def test_a_call_keeps_its_settings_for_its_backward(device):
    q, k, v = make_qkv((1, PLAN.num_tokens, PLAN.heads, 64), torch.float32, device, requires_grad=True)
    with ok.use_settings(overlap=False, overlap_min_flops=0):
        out = ok.routed_attention(q, k, v, PLAN)
        call = ok.prepare(q, PLAN, k, v)  # the call routed_attention made
    assert not call.settings.overlap and call.settings.overlap_min_flops == 0
    assert ok.prepare(q, PLAN, k, v) is not call and ok.prepare(q, PLAN, k, v).settings == ok.settings()
    seen = []
    real = call.backward
    call.backward = lambda *a: seen.append(1) or real(*a)  # the backward outside the block runs this call's
    try:
        out.sum().backward()
    finally:
        del call.backward
    assert seen and q.grad is not None
    # the opposite of the settings in force (scripts/device_tests.sh turns autotuning off)
    explicit = ok.prepare(q, PLAN, settings=ok.Settings(autotune=not ok.settings().autotune))
    assert explicit.settings.autotune != ok.settings().autotune


def test_call_is_shown_with_its_decisions():
    q = torch.randn(1, PLAN.num_tokens, PLAN.heads, 64)
    text = repr(ok.prepare(q, PLAN))
    assert "RoutedCall(" in text and "global heads [0, 3] ->" in text and "window heads [1] ->" in text


def test_calls_from_threads_share_one_cache():
    q = torch.randn(1, PLAN.num_tokens, PLAN.heads, 32)
    made = []
    threads = [threading.Thread(target=lambda: made.append(ok.prepare(q, PLAN))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 4 and len(call_module._CALLS) <= call_module.MAX_CALLS
    assert all(m.shape == tuple(q.shape) for m in made)


def test_the_custom_op_runs_the_same_call(device):
    """Under a dispatch mode the op is used; it looks its call up by signature and gives the
    eager call's numbers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    q, k, v = make_qkv((1, PLAN.num_tokens, PLAN.heads, 64), torch.float32, device)
    eager = ok.routed_attention(q, k, v, PLAN)
    with Passthrough():
        traced = ok.routed_attention(q, k, v, PLAN)
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)


@pytest.mark.skipif(DEVICE != "cuda", reason="stream policy on CUDA")
def test_stream_policy_follows_the_settings():
    plan = ok.RoutingPlan.from_counts((3, 7, 11), 2, 1, 1, (3, 5, 5))
    q = torch.randn(1, plan.num_tokens, 4, 64, device="cuda", dtype=torch.bfloat16)
    assert not ok.prepare(q, plan).forks() and ok.prepare(q, plan).forks(replayed=True)
    with ok.use_settings(overlap_min_flops=0):
        assert ok.prepare(q, plan).forks()
    with ok.single_stream():
        assert not ok.prepare(q, plan).forks(replayed=True)


def test_the_call_settings_reach_the_python_path(device):
    """A call prepared with settings runs its Python path with them (the Triton autotuning choice,
    the direct cuDNN path, the stream policy), whatever the settings in force when it runs, and
    the aligned copies of odd-offset inputs get a call with the same settings."""
    from oasis_kernels.backends import BACKENDS

    plan = ok.RoutingPlan((2, 3, 5), ["g", "w", "i"], (3, 3, 3))
    mine = ok.Settings(overlap=False, autotune=False, cudnn_direct=False)
    q, k, v = make_qkv((1, plan.num_tokens, 3, 64), torch.float32, device, requires_grad=True)
    call = ok.prepare(q, plan, k, v, settings=mine)
    assert call.settings == mine and ok.settings() != mine
    for name, state in call.states.items():  # what each backend prepared
        if name == "triton":
            assert state.autotune is False
        elif hasattr(BACKENDS[name], "_forward_into"):
            assert state == mine
    out = call(q, k, v)
    out.sum().backward()  # the backward keeps this call
    wide = torch.randn(1, plan.num_tokens, 3, 66, device=device)[..., :64]  # rows of 264 bytes: copied
    odd_call = ok.prepare(wide, plan, wide.clone(), wide.clone(), settings=mine)
    copied, *tensors = call_module.aligned_call(odd_call, wide, wide, wide)
    assert copied is not odd_call and copied.settings == mine and tensors[0].is_contiguous()


def test_a_prepared_call_checks_requires_grad_and_strides(device):
    q = torch.randn(1, PLAN.num_tokens, PLAN.heads, 64, device=device)
    call = ok.prepare(q, PLAN)
    with pytest.raises(ValueError, match="requires_grad True"):
        call(q.clone().requires_grad_(), q, q)
    strided = torch.randn(1, PLAN.num_tokens, PLAN.heads, 128, device=device)[..., ::2]  # D strided by 2
    call = ok.prepare(strided, PLAN)  # prepared on the contiguous copy the API makes
    torch.testing.assert_close(call(strided, strided, strided), ok.routed_attention(strided, strided, strided, PLAN),
                               rtol=0, atol=0)


def test_settings_travel_through_the_custom_ops():
    """Under tracing the ops carry the call's settings, so the backward op finds the forward's
    call however the settings in force change in between."""
    key = ok.Settings(overlap=False, overlap_min_flops=7.0).as_key()
    assert ok.Settings.from_key(key) == ok.Settings(overlap=False, overlap_min_flops=7.0)
    q, k, v = (torch.randn(1, PLAN.num_tokens, PLAN.heads, 16, requires_grad=True) for _ in range(3))
    grid, modes, window = PLAN.as_op_args()
    before = len(call_module._CALLS)
    out, _ = call_module.routed_attention_fwd(q, k, v, grid, modes, window, 0.25, "auto", False, key)
    with ok.use_settings(overlap=True, autotune=False):
        torch.autograd.grad(out.sum(), (q, k, v))
    made = [c for c in call_module._CALLS.values() if c.settings.overlap_min_flops == 7.0]
    assert len(made) == 1 and len(call_module._CALLS) <= before + 1


def test_calls_with_a_replay_are_not_evicted(monkeypatch):
    monkeypatch.setattr(call_module, "MAX_CALLS", 2)
    q = torch.randn(1, PLAN.num_tokens, PLAN.heads, 8)
    keeper = ok.prepare(q, PLAN)
    keeper.replay_forward = object()  # as if it owned a C++ replay
    try:
        for d in (16, 24, 32, 40):
            ok.prepare(torch.randn(1, PLAN.num_tokens, PLAN.heads, d), PLAN)
        assert keeper in call_module._CALLS.values()
        assert len([c for c in call_module._CALLS.values() if not c.replay_forward]) <= 2
    finally:
        keeper.replay_forward = None
