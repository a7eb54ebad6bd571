"""The FlashAttention adapters against fake ``flash_attn`` / ``flash_attn_interface`` modules.

flash-attn is not installable here, so each fake reproduces one release's low-level
signature (parameter names, what is returned, what is written in place) with float64 torch
math, and the adapters must drive it to a float64 reference within 1e-10. The 2.7+ and
newer FA3 fakes are real ``torch.library`` custom ops, as in those releases, so the adapters'
signature lookup sees the same ``(*args, **kwargs)`` wrapper. No ``from __future__ import
annotations`` here: ``custom_op`` infers its schema from real annotations.
"""

import sys
import types
from typing import Optional

import pytest
import torch

from oasis_kernels.backends import flash
from oasis_kernels.plan import Mode

TOL = dict(rtol=0, atol=1e-10)
CALLS: dict = {}  # the fakes record their last keyword arguments here


@pytest.fixture(autouse=True)
def _fresh_caches():
    flash._import.cache_clear()
    flash._bind.cache_clear()
    CALLS.clear()
    yield
    flash._import.cache_clear()
    flash._bind.cache_clear()


# -- float64 math the fakes share ---------------------------------------------------------

def _fake_fwd(q, k, v, scale):
    """``[B, L, h, D]`` -> ``(o [B, L, h, D], lse [B, h, L])``."""
    s = torch.einsum("blhd,bmhd->bhlm", q, k) * scale
    lse = s.logsumexp(-1)
    return torch.einsum("bhlm,bmhd->blhd", (s - lse[..., None]).exp(), v), lse


def _fake_bwd(dout, q, k, v, out, lse, scale, dq, dk, dv):
    """FlashAttention's backward: probabilities rebuilt from the given ``lse`` [B, h, L]."""
    p = (torch.einsum("blhd,bmhd->bhlm", q, k) * scale - lse[..., None]).exp()
    delta = (dout * out).sum(-1).transpose(1, 2)  # [B, h, L]
    ds = p * (torch.einsum("blhd,bmhd->bhlm", dout, v) - delta[..., None])
    dq.copy_(torch.einsum("bhlm,bmhd->blhd", ds, k) * scale)
    dk.copy_(torch.einsum("bhlm,blhd->bmhd", ds, q) * scale)
    dv.copy_(torch.einsum("bhlm,blhd->bmhd", p, dout))


def _check_plain(**kw):
    """The adapter must ask for a plain dense call: no dropout, causality, window, softcap, extras."""
    assert kw.pop("dropout_p", 0.0) == 0.0
    assert kw.pop("causal", False) is False and kw.pop("is_causal", False) is False
    assert tuple(kw.pop("window_size", (-1, -1))) == (-1, -1)
    assert kw.pop("window_size_left", -1) == -1 and kw.pop("window_size_right", -1) == -1
    assert kw.pop("softcap", 0.0) == 0.0
    assert all(v is None for v in kw.values()), kw


# -- FA2 2.6: plain functions, window_size tuple, 8 results --------------------------------

def fa26_fwd(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_softmax):
    _check_plain(dropout_p=dropout_p, causal=causal, window_size=window_size, softcap=softcap,
                 alibi_slopes=alibi_slopes)
    assert return_softmax is False
    o, lse = _fake_fwd(q, k, v, softmax_scale)
    return o, q, k, v, o, lse, torch.empty(0), torch.zeros(2, dtype=torch.int64)


def fa26_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
             window_size, softcap, alibi_slopes, deterministic, rng_state=None):
    _check_plain(dropout_p=dropout_p, causal=causal, window_size=window_size, softcap=softcap,
                 alibi_slopes=alibi_slopes, rng_state=rng_state)
    CALLS["deterministic"] = deterministic
    _fake_bwd(dout, q, k, v, out, softmax_lse, softmax_scale, dq, dk, dv)
    return dq, dk, dv, torch.empty(0)


# -- FA2 2.7 / 2.8: custom ops, window_size_left/right, 4 results, backward mutates ----------

@torch.library.custom_op("oasis_test_fa2::fwd", mutates_args=())
def fa28_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float,
             causal: bool, window_size_left: int, window_size_right: int, softcap: float,
             alibi_slopes: Optional[torch.Tensor], return_softmax: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_plain(dropout_p=dropout_p, causal=causal, window_size_left=window_size_left,
                 window_size_right=window_size_right, softcap=softcap, alibi_slopes=alibi_slopes)
    o, lse = _fake_fwd(q, k, v, softmax_scale)
    return o, lse, torch.empty(0), torch.zeros(2, dtype=torch.int64)


@torch.library.custom_op("oasis_test_fa2::bwd", mutates_args=("dq", "dk", "dv"))
def fa28_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             softmax_lse: torch.Tensor, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor],
             dv: Optional[torch.Tensor], dropout_p: float, softmax_scale: float, causal: bool,
             window_size_left: int, window_size_right: int, softcap: float,
             alibi_slopes: Optional[torch.Tensor], deterministic: bool,
             rng_state: Optional[torch.Tensor] = None) -> torch.Tensor:
    _check_plain(dropout_p=dropout_p, causal=causal, window_size_left=window_size_left,
                 window_size_right=window_size_right, softcap=softcap, alibi_slopes=alibi_slopes,
                 rng_state=rng_state)
    CALLS["deterministic"] = deterministic
    _fake_bwd(dout, q, k, v, out, softmax_lse, softmax_scale, dq, dk, dv)
    return torch.empty(0)


# -- FA3 3.0.0b1: plain functions, one entry point for every feature, window_size tuple ------

def fa3b1_fwd(q, k, v, k_new, v_new, qv, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new,
              seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx, leftpad_k,
              rotary_cos, rotary_sin, seqlens_rotary, q_descale, k_descale, v_descale, softmax_scale,
              causal, window_size=(-1, -1), attention_chunk=0, softcap=0.0, rotary_interleaved=True,
              scheduler_metadata=None, num_splits=1, pack_gqa=None, sm_margin=0):
    _check_plain(k_new=k_new, v_new=v_new, qv=qv, out=out, cu_seqlens_q=cu_seqlens_q,
                 cu_seqlens_k=cu_seqlens_k, cu_seqlens_k_new=cu_seqlens_k_new, seqused_q=seqused_q,
                 seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                 page_table=page_table, kv_batch_idx=kv_batch_idx, leftpad_k=leftpad_k,
                 rotary_cos=rotary_cos, rotary_sin=rotary_sin, seqlens_rotary=seqlens_rotary,
                 q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, causal=causal,
                 window_size=window_size, softcap=softcap, scheduler_metadata=scheduler_metadata,
                 pack_gqa=pack_gqa)
    o, lse = _fake_fwd(q, k, v, softmax_scale)
    return o, lse, None, None


def fa3b1_bwd(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, sequed_q, sequed_k,
              max_seqlen_q, max_seqlen_k, dq, dk, dv, softmax_scale, causal, window_size=(-1, -1),
              softcap=0.0, deterministic=False, sm_margin=0):
    _check_plain(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, sequed_q=sequed_q,
                 sequed_k=sequed_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                 causal=causal, window_size=window_size, softcap=softcap)
    CALLS["deterministic"] = deterministic
    _fake_bwd(dout, q, k, v, out, softmax_lse, softmax_scale, dq, dk, dv)
    return dq, dk, dv, torch.empty(0)


# -- FA3 later revisions: custom ops, out_, window_size_left/right, is_causal ---------------

_T = Optional[torch.Tensor]


@torch.library.custom_op("oasis_test_fa3::fwd", mutates_args=())
def fa3op_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_new: _T = None, v_new: _T = None,
              qv: _T = None, out_: _T = None, cu_seqlens_q: _T = None, cu_seqlens_k: _T = None,
              cu_seqlens_k_new: _T = None, seqused_q: _T = None, seqused_k: _T = None,
              max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
              page_table: _T = None, kv_batch_idx: _T = None, leftpad_k: _T = None,
              rotary_cos: _T = None, rotary_sin: _T = None, seqlens_rotary: _T = None,
              q_descale: _T = None, k_descale: _T = None, v_descale: _T = None,
              softmax_scale: Optional[float] = None, causal: bool = False, window_size_left: int = -1,
              window_size_right: int = -1, attention_chunk: int = 0, softcap: float = 0.0,
              rotary_interleaved: bool = True, scheduler_metadata: _T = None, num_splits: int = 1,
              pack_gqa: Optional[bool] = None, sm_margin: int = 0,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_plain(out_=out_, cu_seqlens_q=cu_seqlens_q, page_table=page_table, q_descale=q_descale,
                 causal=causal, window_size_left=window_size_left, window_size_right=window_size_right,
                 softcap=softcap)
    assert softmax_scale is not None
    o, lse = _fake_fwd(q, k, v, softmax_scale)
    return o, lse, torch.empty(0), torch.empty(0)


@torch.library.custom_op("oasis_test_fa3::bwd", mutates_args=("dq", "dk", "dv"))
def fa3op_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              softmax_lse: torch.Tensor, cu_seqlens_q: _T = None, cu_seqlens_k: _T = None,
              sequed_q: _T = None, sequed_k: _T = None, max_seqlen_q: Optional[int] = None,
              max_seqlen_k: Optional[int] = None, dq: _T = None, dk: _T = None, dv: _T = None,
              softmax_scale: Optional[float] = None, is_causal: bool = False, window_size_left: int = -1,
              window_size_right: int = -1, softcap: float = 0.0, deterministic: bool = False,
              sm_margin: int = 0) -> torch.Tensor:
    _check_plain(cu_seqlens_q=cu_seqlens_q, is_causal=is_causal, window_size_left=window_size_left,
                 window_size_right=window_size_right, softcap=softcap)
    assert dq is not None and dk is not None and dv is not None, "the adapter must preallocate dq, dk, dv"
    CALLS["deterministic"] = deterministic
    _fake_bwd(dout, q, k, v, out, softmax_lse, softmax_scale, dq, dk, dv)
    return torch.empty(0)


VERSIONS = {
    "fa2-2.6": (flash.Flash2Backend, fa26_fwd, fa26_bwd),
    "fa2-2.8": (flash.Flash2Backend, fa28_fwd, fa28_bwd),
    "fa3-3.0.0b1": (flash.Flash3Backend, fa3b1_fwd, fa3b1_bwd),
    "fa3-customop": (flash.Flash3Backend, fa3op_fwd, fa3op_bwd),
}


def _install(monkeypatch, backend_cls, fwd, bwd):
    """Put a fake module holding ``fwd``/``bwd`` where ``backend_cls`` imports from."""
    iface = types.ModuleType(backend_cls.module)
    iface._flash_attn_forward, iface._flash_attn_backward = fwd, bwd
    if backend_cls is flash.Flash2Backend:
        pkg = types.ModuleType("flash_attn")
        pkg.flash_attn_interface = iface
        monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, backend_cls.module, iface)


def _no_device_checks(monkeypatch):
    monkeypatch.setattr(flash, "_device_reasons", lambda q, supported, need: [])


def _inputs(dtype=torch.float64, d=64):
    """Strided ``[2, 37, 3, d]`` head slices of ``[2, 37, 5, d]`` tensors, as the dispatcher passes."""
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 37, 5, d, generator=g, dtype=dtype)[:, :, 1:4] for _ in range(4))
    return q, k, v, do


def _reference(q, k, v, do, scale):
    """float64 attention by autograd: ``(o [B, L, h, D], lse [B, h, L], (dq, dk, dv))``."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    s = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) * scale  # [B, h, L, L]
    o = (s.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)
    grads = torch.autograd.grad(o, (q, k, v), do)
    return o.detach(), torch.logsumexp(s, -1).detach(), grads


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("version", list(VERSIONS))
def test_adapter_matches_reference(monkeypatch, version, deterministic):
    backend_cls, fwd, bwd = VERSIONS[version]
    _install(monkeypatch, backend_cls, fwd, bwd)
    backend = backend_cls()
    q, k, v, do = _inputs()
    assert not q.is_contiguous() and q.stride(-1) == 1
    scale = 0.125
    o_ref, lse_ref, grads_ref = _reference(q, k, v, do, scale)

    o, lse = backend._fwd(q, k, v, scale)
    assert o.shape == (2, 37, 3, 64) and lse.shape == (2, 3, 37)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(lse, lse_ref, **TOL)

    grads = backend._bwd(do, q, k, v, o, lse.contiguous(), scale, deterministic)
    for name, got, want in zip("dq dk dv".split(), grads, grads_ref):
        assert got.shape == (2, 37, 3, 64), name
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{version} {name}: {m}")
    assert CALLS["deterministic"] is deterministic


@pytest.mark.parametrize("version", list(VERSIONS))
def test_why_not_accepts_supported_inputs(monkeypatch, version):
    backend_cls, fwd, bwd = VERSIONS[version]
    _install(monkeypatch, backend_cls, fwd, bwd)
    _no_device_checks(monkeypatch)
    backend = backend_cls()
    for dtype in (torch.float16, torch.bfloat16):
        q = _inputs(dtype)[0]
        assert backend.why_not(Mode.GLOBAL, q, None) == []
        assert backend.why_not(Mode.INTRA, q, None) == []
    assert "does not serve window heads" in backend.why_not(Mode.WINDOW, q, None)[0]


@pytest.mark.parametrize("version", list(VERSIONS))
def test_why_not_explains_unsupported_inputs(monkeypatch, version):
    backend_cls, fwd, bwd = VERSIONS[version]
    _install(monkeypatch, backend_cls, fwd, bwd)
    _no_device_checks(monkeypatch)
    backend = backend_cls()
    assert backend.why_not(Mode.GLOBAL, _inputs(torch.float32)[0], None) == [
        "needs float16 or bfloat16, got torch.float32"
    ]
    (reason,) = backend.why_not(Mode.GLOBAL, _inputs(torch.float16, d=100)[0], None)
    assert "head dim 100" in reason
    strided = torch.zeros(2, 37, 3, 128, dtype=torch.float16)[..., ::2]  # D = 64, stride(-1) = 2
    (reason,) = backend.why_not(Mode.GLOBAL, strided, None)
    assert "contiguous head dim" in reason


@pytest.mark.parametrize("backend_cls", [flash.Flash2Backend, flash.Flash3Backend])
def test_why_not_on_cpu_without_device_patch(monkeypatch, backend_cls):
    fwd, bwd = (fa26_fwd, fa26_bwd) if backend_cls is flash.Flash2Backend else (fa3b1_fwd, fa3b1_bwd)
    _install(monkeypatch, backend_cls, fwd, bwd)
    assert backend_cls().why_not(Mode.GLOBAL, _inputs(torch.float16)[0], None) == [
        "needs a CUDA tensor, got device cpu"
    ]


@pytest.mark.parametrize("backend_cls", [flash.Flash2Backend, flash.Flash3Backend])
def test_why_not_when_module_missing(monkeypatch, backend_cls):
    # a None entry makes the import raise ModuleNotFoundError, as if the package were absent
    if backend_cls is flash.Flash2Backend:
        monkeypatch.setitem(sys.modules, "flash_attn", None)
        monkeypatch.delitem(sys.modules, "flash_attn.flash_attn_interface", raising=False)
    else:
        monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    (reason,) = backend_cls().why_not(Mode.GLOBAL, _inputs(torch.float16)[0], None)
    assert reason.startswith(f"cannot import {backend_cls.module}: ModuleNotFoundError"), reason
    with pytest.raises(RuntimeError, match="cannot import"):
        backend_cls()._fwd(*_inputs(torch.float16)[:3], 0.125)


def test_why_not_names_an_unrecognised_signature(monkeypatch):
    # flash-attn 1.x: varlen-only forward that takes a preallocated out and cu_seqlens
    def fa1_fwd(q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                softmax_scale, causal, return_softmax, num_splits=0, generator=None):
        raise AssertionError("must not be called")

    _install(monkeypatch, flash.Flash2Backend, fa1_fwd, fa26_bwd)
    _no_device_checks(monkeypatch)
    (reason,) = flash.Flash2Backend().why_not(Mode.GLOBAL, _inputs(torch.float16)[0], None)
    assert "unsupported flash_attn.flash_attn_interface interface" in reason
    assert "unrecognised signature" in reason and "'out'" in reason


def test_fa3_legacy_head_dims(monkeypatch):
    # 2024 betas (no k_new parameter) only instantiated head dims 64, 128 and 256
    def fwd(q, k, v, softmax_scale, causal, window_size, descale_q=None, descale_k=None, descale_v=None):
        o, lse = _fake_fwd(q, k, v, softmax_scale)
        return o, q, k, v, o, lse, None

    _install(monkeypatch, flash.Flash3Backend, fwd, fa3b1_bwd)
    _no_device_checks(monkeypatch)
    backend = flash.Flash3Backend()
    assert backend.why_not(Mode.GLOBAL, _inputs(torch.float16)[0], None) == []
    (reason,) = backend.why_not(Mode.GLOBAL, _inputs(torch.float16, d=96)[0], None)
    assert "head dim 96" in reason
    q, k, v, _ = _inputs()
    o, lse = backend._fwd(q, k, v, 0.125)  # the lse is found at index 5 here
    torch.testing.assert_close(lse, _reference(q, k, v, _, 0.125)[1], **TOL)


def test_no_deterministic_backward_is_an_error(monkeypatch):
    def bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal, window_size):
        _fake_bwd(dout, q, k, v, out, softmax_lse, softmax_scale, dq, dk, dv)

    _install(monkeypatch, flash.Flash3Backend, fa3b1_fwd, bwd)
    backend = flash.Flash3Backend()
    q, k, v, do = _inputs()
    o, lse = backend._fwd(q, k, v, 0.125)
    backend._bwd(do, q, k, v, o, lse, 0.125, False)
    with pytest.raises(RuntimeError, match="no deterministic mode"):
        backend._bwd(do, q, k, v, o, lse, 0.125, True)
    # and dispatch declines it for deterministic=True, saying why, before any backward runs
    (reason,) = backend.determinism_reasons()
    assert "no deterministic backward" in reason
