"""Dense attention backends: global heads, and intra-frame heads on the ``(B*T, H*W)`` view.

Intra-frame attention is plain dense attention per frame, and the frame-batched view is
free (tokens are t-major), so every dense backend serves both modes.

:class:`DenseBackend` turns a head group into strided views, calls the subclass's
``_fwd``/``_bwd`` on ``[B', L, h, D]`` tensors (FlashAttention's layout) and copies the
results into the dispatcher's output slices. The SDPA backends call PyTorch's fused
attention operators directly (the ``aten::_scaled_dot_product_*`` ops) so that the
log-sum-exp comes back from the forward and the backward reuses it, as ``F.scaled_dot_product_attention``
does internally; calling them directly also pins the backend (cuDNN, flash, efficient)
instead of leaving the choice to PyTorch's heuristics.
"""

from __future__ import annotations

import warnings
import torch

from ..kernels import cudnn_direct
from ..kernels.row_copies import copy_pairs
from ..plan import Mode, RoutingPlan, head_runs
from .base import Backend, Groups, frame_batched

__all__ = [
    "DenseBackend",
    "SdpaCudnnBackend",
    "SdpaFlashBackend",
    "SdpaEfficientBackend",
    "SdpaCpuBackend",
]


class DenseBackend(Backend):
    modes = frozenset({Mode.GLOBAL, Mode.INTRA})

    # -- subclass interface: [B', L, h, D] in, FlashAttention layout ----------------
    def _fwd(self, q, k, v, scale: float):
        """Return ``(o [B', L, h, D], lse [B', h, L] float32)``; any strides."""
        raise NotImplementedError

    def _bwd(self, do, q, k, v, o, lse, scale: float, deterministic: bool):
        """Return ``(dq, dk, dv)``, each ``[B', L, h, D]``; ``lse`` is ``[B', h, L]`` contiguous."""
        raise NotImplementedError

    def prepare(self, plan, groups, device, settings):
        return settings  # the call's settings: whether the direct cuDNN path may serve it

    def _forward_into(self, q, k, v, out, lse, run, scale: float, settings=None) -> bool:
        """A global head run computed straight into ``out`` and ``lse``; False (the default) where
        the subclass has no such path or declines, and ``_fwd`` plus stores serve the run."""
        return False

    def _backward_into(self, dout, q, k, v, out, lse, dq, dk, dv, run, scale: float, settings=None) -> bool:
        """The gradients of a global head run straight into ``dq, dk, dv`` (see ``_forward_into``)."""
        return False

    # -- views ----------------------------------------------------------------------
    @staticmethod
    def _group(x, run, mode, grid):
        v = x[:, :, run]
        return frame_batched(v, grid) if mode == Mode.INTRA else v

    @staticmethod
    def _store_pair(dst, run, mode, grid, src):
        """``(src, view)``: the copy of ``src`` ([B', L, h, D]) into ``dst[:, :, run]`` ([B, N, h, D],
        dst owned by us), for :func:`copy_pairs`."""
        view = dst[:, :, run]
        if mode == Mode.INTRA:
            t, hh, ww = grid
            view = view.view(view.shape[0] * t, hh * ww, *view.shape[2:])
        return src, view

    @staticmethod
    def _lse_store_pair(lse, run, mode, grid, src):
        """``(src, view)``: the copy of ``src`` [B', h, L] into ``lse[:, run]`` [B, h, N], both as
        4-D views whose last dimension is contiguous or of size 1 (for :func:`copy_pairs`)."""
        view = lse[:, run]
        if mode == Mode.INTRA:
            t = grid[0]
            b, h, n = view.shape
            return src.view(b, t, h, n // t).transpose(1, 2), view.view(b, h, t, n // t)
        return src.unsqueeze(-1), view.unsqueeze(-1)

    @staticmethod
    def _lse_load(lse, run, mode, grid):
        view = lse[:, run]
        if mode == Mode.INTRA:
            t = grid[0]
            b, h, n = view.shape
            return view.view(b, h, t, n // t).transpose(1, 2).reshape(b * t, h, n // t)
        return view.contiguous()

    # -- Backend --------------------------------------------------------------------
    # the results of each run are stored with one fused copy (kernels/row_copies.py) instead of
    # a copy_ per tensor: on the global heads' stream these copies are on the routed layer's
    # critical path (docs/PERF.md, entry 13)
    def forward(self, q, k, v, out, lse, plan: RoutingPlan, groups: Groups, scale: float, state=None) -> None:
        for mode, heads in groups:
            for run in head_runs(heads):
                if mode == Mode.GLOBAL and self._forward_into(q, k, v, out, lse, run, scale, state):
                    continue
                g = [self._group(x, run, mode, plan.grid) for x in (q, k, v)]
                o, l = self._fwd(*g, scale)
                copy_pairs([self._store_pair(out, run, mode, plan.grid, o),
                            self._lse_store_pair(lse, run, mode, plan.grid, l)])

    def backward(self, dout, q, k, v, out, lse, dq, dk, dv, plan, groups, scale, deterministic, state=None) -> None:
        for mode, heads in groups:
            for run in head_runs(heads):
                if mode == Mode.GLOBAL and self._backward_into(dout, q, k, v, out, lse, dq, dk, dv, run, scale, state):
                    continue
                g = [self._group(x, run, mode, plan.grid) for x in (dout, q, k, v, out)]
                l = self._lse_load(lse, run, mode, plan.grid)
                grads = self._bwd(*g, l, scale, deterministic)
                copy_pairs([self._store_pair(dst, run, mode, plan.grid, src) for dst, src in zip((dq, dk, dv), grads)])


# ----------------------------------------------------------------------------------------
# PyTorch SDPA, one backend per fused kernel family
# ----------------------------------------------------------------------------------------

def _probe_reasons(predicate, q) -> list[str]:
    """Run one of ``torch.backends.cuda.can_use_*`` in debug mode and collect its warnings."""
    qt = q.transpose(1, 2)
    params = torch.backends.cuda.SDPAParams(qt, qt, qt, None, 0.0, False, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = predicate(params, True)
    if ok:
        return []
    msgs = [str(w.message).strip() for w in caught]
    return msgs or [f"torch.backends.cuda.{predicate.__name__} returned False"]


def _common_cuda_reasons(q) -> list[str]:
    reasons = []
    if q.device.type != "cuda":
        reasons.append(f"needs a CUDA tensor, got device {q.device}")
    if q.stride(-1) != 1:
        reasons.append(f"needs a contiguous head dim, got {q.stride()=}")
    return reasons


def _unused(q, shape, dtype) -> torch.Tensor:
    """An uninitialised tensor for the dropout RNG state arguments, which the kernels do not
    read at dropout 0. Made per call, not cached: a device tensor kept across calls would, when
    first made inside ``torch.compile(mode="reduce-overhead")``'s warm-up, live in its
    CUDA-graph pool, which refuses allocations that outlive a call."""
    return torch.empty(shape, dtype=dtype, device=q.device)


class _SdpaCudaBackend(DenseBackend):
    predicate_name = ""
    enabled_name = ""

    def why_not(self, mode, q, plan) -> list[str]:
        reasons = self._modes_reason(mode) + _common_cuda_reasons(q)
        if reasons:
            return reasons
        if not getattr(torch.backends.cuda, self.enabled_name)():
            reasons.append(f"disabled by torch.backends.cuda ({self.enabled_name}() is False)")
        predicate = getattr(torch.backends.cuda, self.predicate_name)
        run = head_runs(plan.heads_of(mode) or (0,))[0]
        return reasons + _probe_reasons(predicate, self._group(q, run, mode, plan.grid))


class SdpaCudnnBackend(_SdpaCudaBackend):
    """cuDNN's fused attention through PyTorch (fastest dense path on Hopper, see benchmarks/ANCHORS.md)."""

    name = "sdpa_cudnn"
    predicate_name = "can_use_cudnn_attention"
    enabled_name = "cudnn_sdp_enabled"
    # PyTorch rules cuDNN's attention out under torch.use_deterministic_algorithms(True) too
    deterministic_backward = False

    def why_not_auto(self, mode, q, plan) -> list[str]:
        reasons = self.why_not(mode, q, plan)
        if not reasons:
            major, minor = torch.cuda.get_device_capability(q.device)
            if major < 9:
                reasons.append(f"auto prefers cuDNN attention on sm90+ only (this is sm{major}{minor})")
        return reasons

    # global runs go to cuDNN directly (kernels/cudnn_direct.py) where the extension has that path:
    # cuDNN then writes the routed tensors' head slices, and no stores follow
    @staticmethod
    def _heads(x, run):
        return x[:, :, run].transpose(1, 2)

    # (the views are made only where the path exists: this runs per head run on every call)
    def _forward_into(self, q, k, v, out, lse, run, scale, settings=None):
        if not cudnn_direct.available(settings):
            return False
        return cudnn_direct.forward_into(*(self._heads(x, run) for x in (q, k, v, out)), lse[:, run], scale)

    def _backward_into(self, dout, q, k, v, out, lse, dq, dk, dv, run, scale, settings=None):
        if not cudnn_direct.available(settings):
            return False
        views = [self._heads(x, run) for x in (dout, q, k, v, out)]
        return cudnn_direct.backward_into(*views, lse[:, run], *(self._heads(x, run) for x in (dq, dk, dv)), scale)

    def _fwd(self, q, k, v, scale):
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, False, scale=scale
        )
        o, lse = res[0], res[1]
        return o.transpose(1, 2), lse.reshape(lse.shape[0], lse.shape[1], lse.shape[2])

    def _bwd(self, do, q, k, v, o, lse, scale, deterministic):
        ql = q.shape[1]
        seed = _unused(q, (), torch.int64)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), o.transpose(1, 2),
            lse.unsqueeze(-1), seed, seed, None, None, None, ql, k.shape[1], 0.0, False, scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class SdpaFlashBackend(_SdpaCudaBackend):
    """FlashAttention-2 as built into PyTorch."""

    name = "sdpa_flash"
    predicate_name = "can_use_flash_attention"
    enabled_name = "flash_sdp_enabled"

    @property
    def deterministic_backward(self) -> bool:
        # PyTorch runs FlashAttention's deterministic backward only in its deterministic mode
        return torch.are_deterministic_algorithms_enabled()

    def _fwd(self, q, k, v, scale):
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, False, scale=scale
        )
        return res[0].transpose(1, 2), res[1]

    def _bwd(self, do, q, k, v, o, lse, scale, deterministic):
        seed = _unused(q, (2,), torch.uint64)
        offset = _unused(q, (), torch.uint64)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), o.transpose(1, 2),
            lse, None, None, q.shape[1], k.shape[1], 0.0, False, seed, offset, scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class SdpaEfficientBackend(_SdpaCudaBackend):
    """PyTorch's memory-efficient attention (xformers' CUTLASS kernels); also takes float32."""

    name = "sdpa_efficient"
    predicate_name = "can_use_efficient_attention"
    enabled_name = "mem_efficient_sdp_enabled"
    deterministic_backward = False  # dQ added with atomics

    def _fwd(self, q, k, v, scale):
        o, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, scale=scale
        )
        return o.transpose(1, 2), lse[..., : q.shape[1]]

    def _bwd(self, do, q, k, v, o, lse, scale, deterministic):
        b, h, n = lse.shape
        # the kernel expects the log-sum-exp padded to a multiple of 32 queries, as its forward returned it
        padded = torch.zeros(b, h, -(-n // 32) * 32, dtype=lse.dtype, device=lse.device)
        padded[..., :n] = lse
        seed = _unused(q, (), torch.int64)
        # the kernel makes dO contiguous and then reads O with dO's strides: hand it both in one
        # layout, else a head slice of a wider output gives wrong gradients (seen on H200)
        do, o = do.contiguous(), o.contiguous()
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            do.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, o.transpose(1, 2),
            padded, seed, seed, 0.0, [True, True, True, False], False, scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class SdpaCpuBackend(DenseBackend):
    """PyTorch's flash-style CPU attention kernel (the package's dense path without CUDA)."""

    name = "sdpa_cpu"

    def why_not(self, mode, q, plan) -> list[str]:
        reasons = self._modes_reason(mode)
        if q.device.type != "cpu":
            reasons.append(f"needs a CPU tensor, got device {q.device}")
        return reasons

    def _fwd(self, q, k, v, scale):
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, scale=scale
        )
        return o.transpose(1, 2), lse

    def _bwd(self, do, q, k, v, o, lse, scale, deterministic):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), o.transpose(1, 2),
            lse, 0.0, False, scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
