"""cuDNN's fused attention writing straight into the routed tensors' head slices
(``csrc/cudnn_sdpa.cpp`` through the ``oasis_kernels._C`` extension), for the ``sdpa_cudnn``
backend's global heads: no stores after cuDNN (docs/PERF.md, entry 13).

Available where the extension was built with the cuDNN frontend headers (setup.py says when
it was not); each call may still decline (a layout cuDNN's graphs do not support), and the
backend then takes PyTorch's cuDNN operator and stores its results.
``OASIS_CUDNN_DIRECT=0`` turns the path off.
"""

from __future__ import annotations

import os

try:
    from .. import _C
except ImportError:  # no extension
    _C = None

__all__ = ["AVAILABLE", "forward_into", "backward_into", "last_decline"]

AVAILABLE = bool(getattr(_C, "CUDNN_SDPA", False)) and os.environ.get("OASIS_CUDNN_DIRECT", "1") != "0"


def forward_into(q, k, v, out, lse, scale: float) -> bool:
    """Attention of ``q, k, v`` (``[B, h, N, D]`` views) into ``out`` (the same) and ``lse``
    (``[B, h, N]`` float32 view); False where declined (nothing written)."""
    return AVAILABLE and _C.cudnn_sdpa_forward(q, k, v, out, lse.unsqueeze(-1), scale)


def backward_into(dout, q, k, v, out, lse, dq, dk, dv, scale: float) -> bool:
    """Gradients into ``dq, dk, dv`` (``[B, h, N, D]`` views); declines where ``dout``'s strides
    differ from ``out``'s (a restriction of this path, not cuDNN's)."""
    return AVAILABLE and _C.cudnn_sdpa_backward(dout, q, k, v, out, lse.unsqueeze(-1), dq, dk, dv, scale)


def last_decline() -> str:
    """Why this thread's last call declined ("" after one that ran), for debugging which path
    the global heads took."""
    if not AVAILABLE:
        return ("OASIS_CUDNN_DIRECT=0" if _C is not None and getattr(_C, "CUDNN_SDPA", False)
                else "the extension was built without the cuDNN frontend headers (or is not built)")
    return _C.cudnn_sdpa_last_decline()
