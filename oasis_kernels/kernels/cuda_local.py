"""The CUDA kernels for the local heads (``csrc/local_attention/``): loading and the op calls.

The kernels are torch operators, ``torch.ops.oasis_local.forward`` and ``.backward``, in a
library of their own:

1. built by ``setup.py`` as ``oasis_kernels/_cuda_local*.so`` where torch has CUDA and nvcc is
   found (``pip install --no-build-isolation -e .``), loaded with ``torch.ops.load_library``;
2. otherwise built on first use from the checkout's ``csrc/local_attention/`` with
   ``torch.utils.cpp_extension.load`` (ninja): cached in torch's extensions folder
   (``TORCH_EXTENSIONS_DIR``), rebuilt when a source changes, and guarded by torch's file lock
   so concurrent processes build it once. ``MAX_JOBS`` limits the compile jobs as for setup.py.

:func:`library` says which, or why neither is possible; nothing here runs at import.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import sys
from pathlib import Path

import torch

__all__ = ["library", "forward", "backward", "SOURCES", "NVCC_FLAGS", "CXX_FLAGS", "LD_FLAGS"]

SOURCES = Path(__file__).resolve().parents[2] / "csrc" / "local_attention"
#: the same flags as setup.py's (Hopper only: the one card the kernels are measured on)
NVCC_FLAGS = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a"]
CXX_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden"]
#: a toolchain that links libstdc++ statically (the GPU machines' g++) exports its symbols from the
#: library, where they mix with the process's libstdc++: the first error message that formatted a
#: number (a TORCH_CHECK naming a grid) segfaulted in the JIT-built library on the H200
#: (docs/PERF.md, entries 14 and 21); keeping them private is what setup.py does too
LD_FLAGS = ["-Wl,--exclude-libs,ALL"]


@functools.lru_cache(maxsize=1)
def library() -> tuple[bool, str]:
    """``(True, how it was loaded)`` once the ops are registered, else ``(False, why not)``."""
    if hasattr(torch.ops, "oasis_local") and hasattr(torch.ops.oasis_local, "forward"):
        return _registered("already registered")
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is built without CUDA"
    spec = importlib.util.find_spec(f"{__package__.rsplit('.', 1)[0]}._cuda_local")
    if spec is not None and spec.origin:
        try:
            torch.ops.load_library(spec.origin)
        except OSError as exc:  # built for another torch, or a library missing
            return False, f"{spec.origin} does not load: {exc}"
        return _registered(f"built by setup.py ({spec.origin})")
    return _jit_build()


def _jit_build() -> tuple[bool, str]:
    sources = sorted(SOURCES.glob("*.cu")) + sorted(SOURCES.glob("*.cpp"))
    if not sources:
        return False, (f"oasis_kernels._cuda_local is not built and its sources are not at {SOURCES} (an install "
                       "without csrc/); reinstall from a checkout where nvcc is found")
    from torch.utils import cpp_extension

    if shutil.which("nvcc") is None and not cpp_extension.CUDA_HOME:
        return False, "oasis_kernels._cuda_local is not built and no CUDA toolkit (nvcc) is found to build it"
    print("oasis_kernels: building the CUDA local-attention kernels (first use; cached afterwards)",
          file=sys.stderr, flush=True)
    try:
        cpp_extension.load(name="oasis_local_attention", sources=[str(s) for s in sources],
                           extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS, extra_ldflags=LD_FLAGS,
                           extra_include_paths=[str(SOURCES)], is_python_module=False, verbose=False)
    except Exception as exc:  # a compiler error, a missing ninja
        return False, f"the JIT build of {SOURCES} failed: {type(exc).__name__}: {str(exc)[-500:]}"
    return _registered(f"JIT-built from {SOURCES}")


def _registered(how: str) -> tuple[bool, str]:
    # the ops write into tensors the caller allocated and return nothing, so under
    # torch.compile's fake tensors there is nothing to compute
    for name in ("forward", "backward"):
        try:
            torch.library.register_fake(f"oasis_local::{name}")(_no_result)
        except RuntimeError:  # registered before in this process (a library loaded by hand)
            pass
    return True, how


def _no_result(*args, **kwargs) -> None:
    return None


def forward(q, k, v, out, lse, heads, n_window: int, grid, radii, scale: float) -> None:
    """Write ``out[:, :, h]`` and ``lse[:, h]`` for the local heads ``heads`` (int32 on q's
    device, window heads first, ``n_window`` of them). ``q, k, v, out``: ``[B, N, heads, D]``,
    D 64 or 128, float16 or bfloat16, 16-byte aligned rows; ``lse``: float32 ``[B, heads, N]``;
    ``radii``: the window radii clipped to ``grid``."""
    torch.ops.oasis_local.forward(q, k, v, out, lse, heads, n_window, list(grid), list(radii), scale)


def backward(dout, q, k, v, out, lse, dq, dk, dv, heads, n_window: int, grid, radii, scale: float) -> None:
    """Write ``dq, dk, dv[:, :, h]`` for the local heads (as :func:`forward`)."""
    torch.ops.oasis_local.backward(dout, q, k, v, out, lse, dq, dk, dv, heads, n_window, list(grid), list(radii),
                                   scale)
