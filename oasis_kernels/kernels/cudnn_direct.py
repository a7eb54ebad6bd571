"""cuDNN's fused attention writing straight into the routed tensors' head slices
(``csrc/cudnn_sdpa.cpp`` through the ``oasis_kernels._C`` extension), for the ``sdpa_cudnn``
backend's global heads: no stores after cuDNN (docs/PERF.md, entry 13).

Built where the extension was built with the cuDNN frontend headers (setup.py says when it
was not) and used while the setting ``cudnn_direct`` is on (:mod:`oasis_kernels.config`); each
call may still decline (a layout cuDNN's graphs do not support), and the backend then takes
PyTorch's cuDNN operator and stores its results.
"""

from __future__ import annotations

from ..config import settings

try:
    from .. import _C
except ImportError:  # no extension
    _C = None

__all__ = ["BUILT", "available", "forward_into", "backward_into", "last_decline"]

#: the extension has the path
BUILT = bool(getattr(_C, "CUDNN_SDPA", False))


def available(call_settings=None) -> bool:
    """The path is built and the setting ``cudnn_direct`` is on (in ``call_settings``, a prepared
    call's; default: the settings in force)."""
    return BUILT and (call_settings or settings()).cudnn_direct


def forward_into(q, k, v, out, lse, scale: float) -> bool:
    """Attention of ``q, k, v`` (``[B, h, N, D]`` views) into ``out`` (the same) and ``lse``
    (``[B, h, N]`` float32 view); False where declined (nothing written). Callers check
    :func:`available` for their settings first."""
    return BUILT and _C.cudnn_sdpa_forward(q, k, v, out, lse.unsqueeze(-1), scale)


def backward_into(dout, q, k, v, out, lse, dq, dk, dv, scale: float) -> bool:
    """Gradients into ``dq, dk, dv`` (``[B, h, N, D]`` views); declines where ``dout``'s strides
    differ from ``out``'s (a restriction of this path, not cuDNN's)."""
    return BUILT and _C.cudnn_sdpa_backward(dout, q, k, v, out, lse.unsqueeze(-1), dq, dk, dv, scale)


def last_decline() -> str:
    """Why this thread's last call declined ("" after one that ran), for debugging which path
    the global heads took."""
    if not BUILT:
        return "the extension was built without the cuDNN frontend headers (or is not built)"
    if not settings().cudnn_direct:
        return "the setting cudnn_direct is off"
    return _C.cudnn_sdpa_last_decline()
