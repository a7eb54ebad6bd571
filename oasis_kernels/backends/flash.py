"""FlashAttention 3 (``flash_attn_interface``, Hopper) and 2 (``flash_attn``) as dense backends.

Our forward and backward run as separate calls with no autograd graph between them, so we
call each library's low-level ``_flash_attn_forward`` / ``_flash_attn_backward``, whose
signatures changed with nearly every release:

* FA2 2.5: ``fwd(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes, return_softmax)``
  -> ``(out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state)``; 2.6 adds ``softcap``;
  2.7/2.8 make both ``torch.library`` custom ops, split ``window_size`` into
  ``window_size_left/right`` and return ``(out, softmax_lse, S_dmask, rng_state)`` and, from
  the backward, only ``softmax_d`` (``dq, dk, dv`` are written in place in every version).
* FA3 2024 betas: ``fwd(q, k, v, softmax_scale, causal, window_size, descale_*...)``
  -> ``(out, q, k, v, out_padded, softmax_lse, S_dmask)``; 3.0.0b1 (2025): one entry point for
  dense/varlen/paged/kv-cache calls with ~30 arguments, ``window_size`` tuple, returning
  ``(out, softmax_lse, *rest)``; later revisions make it a custom op with
  ``window_size_left/right``, ``out_`` and (backward) ``is_causal``.

Rather than pinning one, :func:`_bind` reads the signature once and maps every parameter by
name onto the values of a plain non-causal, dropout-free call; an argument it cannot fill
makes the signature "unrecognised", which :meth:`why_not` reports instead of crashing later.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from .dense import DenseBackend

__all__ = ["Flash2Backend", "Flash3Backend"]

# Parameters of a plain dense, non-causal, dropout-free call that we know how to fill.
_FWD_PARAMS = frozenset({
    "q", "k", "v", "softmax_scale", "dropout_p", "causal", "window_size", "window_size_left",
    "window_size_right", "softcap", "alibi_slopes", "return_softmax",
})
_BWD_PARAMS = frozenset({
    "dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "softmax_scale", "dropout_p",
    "causal", "is_causal", "window_size", "window_size_left", "window_size_right", "softcap",
    "alibi_slopes", "deterministic", "rng_state",
})
# FA3's entry points also serve varlen / paged / kv-cache / rotary / fp8 calls; each of
# those features is off when its argument is None (they are required, undefaulted, in 3.0.0b1).
_FA3_OFF_FWD = frozenset({
    "k_new", "v_new", "qv", "out", "out_", "cu_seqlens_q", "cu_seqlens_k", "cu_seqlens_k_new",
    "seqused_q", "seqused_k", "max_seqlen_q", "max_seqlen_k", "page_table", "kv_batch_idx",
    "leftpad_k", "rotary_cos", "rotary_sin", "seqlens_rotary", "q_descale", "k_descale",
    "v_descale", "descale_q", "descale_k", "descale_v", "scheduler_metadata", "pack_gqa",
})
_FA3_OFF_BWD = frozenset({
    "cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k", "sequed_q", "sequed_k",
    "max_seqlen_q", "max_seqlen_k",
})
_NEED_FWD = ("q", "k", "v", "softmax_scale")
_NEED_BWD = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "softmax_scale")


@functools.lru_cache(maxsize=None)
def _import(module: str):
    """``(module, "")``, or ``(None, reason)``: imported lazily, once, never at package import."""
    try:
        return importlib.import_module(module), ""
    except Exception as e:  # a wheel built for another torch fails with OSError/RuntimeError too
        return None, f"cannot import {module}: {type(e).__name__}: {e}"


def _version(dist: str) -> str:
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except Exception:
        return f"{dist} (version unknown)"


def _device_reasons(q: torch.Tensor, supported: Callable[[tuple], bool], need: str) -> list[str]:
    """Device and compute-capability reasons (a module-level hook so CPU tests can bypass it)."""
    if q.device.type != "cuda":
        return [f"needs a CUDA tensor, got device {q.device}"]
    cc = torch.cuda.get_device_capability(q.device)
    if supported(cc):
        return []
    return [f"needs {need}, got sm{cc[0]}{cc[1]} ({torch.cuda.get_device_name(q.device)})"]


def _params(fn, known: frozenset, need: tuple) -> tuple[str, ...]:
    """The parameters of ``fn`` we pass, by name; raises ``TypeError`` on an unrecognised signature."""
    # torch.library.custom_op objects expose (*args, **kwargs); the wrapped function has the names
    sig = inspect.signature(getattr(fn, "_init_fn", fn))
    names = []
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL):
            raise TypeError(f"unrecognised signature {sig}: positional-only parameter {p.name!r}")
        if p.name in known:
            names.append(p.name)
        elif p.default is p.empty and p.kind is not p.VAR_KEYWORD:
            raise TypeError(f"unrecognised signature {sig}: required parameter {p.name!r}")
    missing = [n for n in need if n not in names]
    if missing:
        raise TypeError(f"unrecognised signature {sig}: no parameter {', '.join(missing)}")
    return tuple(names)


@dataclass(frozen=True)
class _Bound:
    """A library's forward/backward plus the parameter names each call fills."""

    fwd: Callable
    bwd: Callable
    fwd_params: tuple[str, ...]
    bwd_params: tuple[str, ...]
    version: str


@functools.lru_cache(maxsize=None)
def _bind(module: str, dist: str, off_fwd: frozenset, off_bwd: frozenset):
    """``(_Bound, "")`` or ``(None, reason)`` for ``module``'s low-level functions."""
    mod, err = _import(module)
    if mod is None:
        return None, err
    try:
        fwd, bwd = mod._flash_attn_forward, mod._flash_attn_backward
        bound = _Bound(fwd, bwd, _params(fwd, _FWD_PARAMS | off_fwd, _NEED_FWD),
                       _params(bwd, _BWD_PARAMS | off_bwd, _NEED_BWD), _version(dist))
    except (AttributeError, TypeError, ValueError) as e:
        return None, f"{_version(dist)}: unsupported {module} interface ({e})"
    return bound, ""


def _values(**tensors) -> dict:
    """Arguments of a plain dense call: non-causal, no dropout/window/softcap/alibi, features off."""
    vals = dict.fromkeys(_FA3_OFF_FWD | _FA3_OFF_BWD)
    vals.update(dropout_p=0.0, causal=False, is_causal=False, window_size=(-1, -1),
                window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                return_softmax=False, rng_state=None)
    vals.update(tensors)
    return vals


class _FlashBackend(DenseBackend):
    module = ""
    dist = ""
    off_fwd = off_bwd = frozenset()
    need = ""

    @staticmethod
    def _cc_ok(cc: tuple) -> bool:
        raise NotImplementedError

    def _bound(self):
        return _bind(self.module, self.dist, self.off_fwd, self.off_bwd)

    def _head_dim_reasons(self, d: int, bound: _Bound) -> list[str]:
        return [] if d <= 256 and d % 8 == 0 else [f"head dim {d} unsupported (needs D <= 256, D % 8 == 0)"]

    def why_not(self, mode, q, plan) -> list[str]:
        reasons = self._modes_reason(mode)
        bound, err = self._bound()
        if bound is None:
            return reasons + [err]
        reasons += _device_reasons(q, self._cc_ok, self.need)
        if q.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"needs float16 or bfloat16, got {q.dtype}")
        reasons += self._head_dim_reasons(q.shape[-1], bound)
        if q.stride(-1) != 1:
            reasons.append(f"needs a contiguous head dim, got {q.stride()=}")
        return reasons

    def determinism_reasons(self) -> list[str]:
        bound, _ = self._bound()
        if bound is not None and "deterministic" not in bound.bwd_params:
            return [f"this FlashAttention ({bound.version}) has no deterministic backward (deterministic=True asks for one)"]
        return []

    def _checked_bound(self) -> _Bound:
        bound, err = self._bound()
        if bound is None:
            raise RuntimeError(f"{self.name}: {err}")
        return bound

    def _fwd(self, q, k, v, scale):
        """``q, k, v`` [B', L, h, D] (last dim contiguous) -> ``(o [B', L, h, D], lse [B', h, L] float32)``."""
        b = self._checked_bound()
        vals = _values(q=q, k=k, v=v, softmax_scale=scale, out=None)
        res = b.fwd(**{p: vals[p] for p in b.fwd_params})
        res = res if isinstance(res, (tuple, list)) else (res,)
        bsz, n, h, d = q.shape
        # The log-sum-exp is the first 3-D result in every version (q/k/v/out_padded are 4-D,
        # S_dmask and rng_state 1-D); its position moved from 5 to 1 between releases.
        lse = next((t for t in res[1:] if isinstance(t, torch.Tensor) and t.dim() == 3), None)
        if lse is None or tuple(lse.shape[:2]) != (bsz, h) or lse.shape[2] < n:
            raise RuntimeError(f"{self.name} ({b.version}): no [B, h, L] softmax_lse among the forward's results")
        return res[0][..., :d], lse[..., :n]

    def _bwd(self, do, q, k, v, o, lse, scale, deterministic):
        """``do, q, k, v, o`` [B', L, h, D], ``lse`` [B', h, L] float32 -> ``(dq, dk, dv)`` [B', L, h, D]."""
        b = self._checked_bound()
        if deterministic and "deterministic" not in b.bwd_params:
            raise RuntimeError(f"{self.name} ({b.version}): this backward has no deterministic mode")
        # preallocated: every version writes into these (2.7+ / FA3 custom ops only mutate them)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        vals = _values(dout=do, q=q, k=k, v=v, out=o, softmax_lse=lse, dq=dq, dk=dk, dv=dv,
                       softmax_scale=scale, deterministic=deterministic)
        b.bwd(**{p: vals[p] for p in b.bwd_params})
        return dq, dk, dv


class Flash3Backend(_FlashBackend):
    """FlashAttention 3 (``flash_attn_interface`` from the repo's ``hopper/`` build), sm90 only."""

    name = "flash3"
    module = "flash_attn_interface"
    dist = "flash_attn_3"
    off_fwd, off_bwd = _FA3_OFF_FWD, _FA3_OFF_BWD
    need = "a Hopper GPU (sm90)"

    @staticmethod
    def _cc_ok(cc):
        return cc[0] == 9  # hopper/ kernels target sm90a (wgmma, TMA); FA2 serves the rest

    def _head_dim_reasons(self, d, bound):
        if "k_new" not in bound.fwd_params:  # 2024 betas: fixed instantiations only
            ok = {64, 128, 256}
            return [] if d in ok else [f"head dim {d} unsupported by {bound.version} (needs one of {sorted(ok)})"]
        reasons = super()._head_dim_reasons(d, bound)
        # 3.0: D is rounded up to an instantiated 64/96/128/192/256, and a build may disable some
        flags = getattr(_import("flash_attn_config")[0], "CONFIG", {}).get("build_flags", {})
        built = [h for h in (64, 96, 128, 192, 256) if not flags.get(f"FLASHATTENTION_DISABLE_HDIM{h}")]
        if not reasons and not any(d <= h for h in built):
            reasons.append(f"head dim {d} unsupported: this build has head dims {built}")
        return reasons


class Flash2Backend(_FlashBackend):
    """FlashAttention 2 (the ``flash_attn`` package, 2.5 through 2.8), sm80 and newer."""

    name = "flash2"
    module = "flash_attn.flash_attn_interface"
    dist = "flash_attn"
    need = "an Ampere or newer GPU (sm80+)"

    @staticmethod
    def _cc_ok(cc):
        return cc >= (8, 0)
