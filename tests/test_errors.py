"""Bad input gets a clear error naming the offending value, never a wrong answer."""

import pytest
import torch

import oasis_kernels as ok

PLAN = ok.RoutingPlan((2, 3, 5), ["g", "w", "i"], (3, 3, 3))


def qkv(shape=(1, 30, 3, 16), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


def test_token_count_mismatch():
    q, k, v = qkv((1, 31, 3, 16))
    with pytest.raises(ValueError, match=r"q.shape=.*N=31.*T\*H\*W=30"):
        ok.routed_attention(q, k, v, PLAN)


def test_head_count_mismatch():
    q, k, v = qkv((1, 30, 4, 16))
    with pytest.raises(ValueError, match=r"4 heads.*len\(plan.modes\)=3"):
        ok.routed_attention(q, k, v, PLAN)


def test_shape_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k.shape=torch.Size\(\[1, 30, 3, 8\]\)"):
        ok.routed_attention(q, k[..., :8], v, PLAN)


def test_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q.shape=torch.Size\(\[30, 3, 16\]\)"):
        ok.routed_attention(q[0], k[0], v[0], PLAN)


def test_dtype_mismatch():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"k.dtype=torch.float64"):
        ok.routed_attention(q, k.double(), v, PLAN)


def test_non_floating_dtype():
    q = torch.ones(1, 30, 3, 16, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"q.dtype=torch.int32"):
        ok.routed_attention(q, q, q, PLAN)


def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k.device=device\(type='meta'\)"):
        ok.routed_attention(q, k.to("meta"), v, PLAN)


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        ok.routed_attention(q, k, v.numpy(), PLAN)
    with pytest.raises(TypeError, match="plan must be a RoutingPlan"):
        ok.routed_attention(q, k, v, {"grid": (2, 3, 5)})


def test_bad_scale():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale=inf"):
        ok.routed_attention(q, k, v, PLAN, scale=float("inf"))
    with pytest.raises(TypeError, match="scale must be a float"):
        ok.routed_attention(q, k, v, PLAN, scale="0.1")


def test_unknown_backend():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown backend 'cudnn'.*known: .*sdpa_cudnn"):
        ok.routed_attention(q, k, v, PLAN, backend="cudnn")
    with pytest.raises(ValueError, match="unknown attention mode 'diag'"):
        ok.routed_attention(q, k, v, PLAN, backend={"diag": "triton"})


def test_forced_backend_that_cannot_run_lists_reasons():
    q, k, v = qkv()
    with pytest.raises(ok.BackendError, match=r"backend='sdpa_cudnn' cannot run the global heads.*needs a CUDA tensor"):
        ok.routed_attention(q, k, v, PLAN, backend="sdpa_cudnn")
    # BackendError is both a ValueError and a NotImplementedError
    with pytest.raises(ValueError):
        ok.routed_attention(q.double(), k.double(), v.double(), PLAN, backend={"window": "triton"})
    with pytest.raises(NotImplementedError, match="supports float16, bfloat16 and float32"):
        ok.routed_attention(q.double(), k.double(), v.double(), PLAN, backend={"window": "triton"})


def test_single_pattern_entry_points_validate():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="odd and positive"):
        ok.window_attention(q, k, v, (2, 3, 5), (2, 3, 3))
    with pytest.raises(ValueError, match="T\\*H\\*W=24"):
        ok.intra_frame_attention(q, k, v, (2, 3, 4))
    with pytest.raises(ValueError, match="q must be"):
        ok.global_attention(q[0], k[0], v[0])


def test_empty_head_dim_is_an_error_empty_batch_is_not():
    q, k, v = qkv((1, 30, 3, 0))
    with pytest.raises(ValueError, match=r"head_dim must be positive.*\[1, 30, 3, 0\]"):
        ok.routed_attention(q, k, v, PLAN)
    q, k, v = qkv((0, 30, 3, 16))
    assert ok.routed_attention(q, k, v, PLAN).shape == (0, 30, 3, 16)
    # the other checks still apply to an empty batch
    with pytest.raises(ValueError, match=r"N=31"):
        ok.routed_attention(*qkv((0, 31, 3, 16)), PLAN)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        ok.routed_attention(q, k, v, PLAN, backend="cudnn")


def test_explain_and_decide_check_q():
    q = torch.randn(1, 30, 3, 16)
    with pytest.raises(ValueError, match=r"q must be \[batch, tokens, heads, head_dim\].*\[30, 3, 16\]"):
        ok.explain(q[0], PLAN)
    with pytest.raises(ValueError, match=r"N=31 tokens"):
        ok.explain(torch.randn(1, 31, 3, 16), PLAN)
    with pytest.raises(ValueError, match=r"4 heads"):
        ok.decide(torch.randn(1, 30, 4, 16), PLAN)
    with pytest.raises(TypeError, match=r"q.dtype=torch.int32"):
        ok.explain(q.int(), PLAN)
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        ok.explain([1.0], PLAN)
    with pytest.raises(TypeError, match="plan must be a RoutingPlan, got tuple"):
        ok.explain(q, (2, 3, 5))
    assert "window heads [1]" in ok.explain(q, PLAN)


def test_a_missing_extension_is_reported_as_not_built(monkeypatch):
    """Not as Python's 'partially initialized module ... circular import' (a skip reason once)."""
    import importlib.util

    from oasis_kernels import fastpath

    if fastpath._C is None:
        assert fastpath.UNAVAILABLE.startswith("oasis_kernels._C is not built (setup.py builds it only where")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    module, why = fastpath._load_extension()
    assert module is None and why.startswith("oasis_kernels._C is not built") and "circular" not in why
    if fastpath._C is None:  # an extension that is found but fails to import says so
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: object())
        module, why = fastpath._load_extension()
        assert module is None and why.startswith("oasis_kernels._C is built but does not load: ")
