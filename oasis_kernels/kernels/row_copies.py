"""Strided copies of several tensor pairs in one launch (``csrc/copy_rows.cu`` through the
``oasis_kernels._C`` extension), for the dense backends' stores of cuDNN's outputs into the
routed tensors.

PyTorch's ``copy_`` of a head slice (``[B, N, h, D]`` into ``[B, N, heads, D]``) runs a
TensorIterator kernel per tensor at well under the copy bandwidth: at S (5, 20, 40) the three
gradient stores of 5 global heads took 6-9 us each on an H100 (docs/PERF.md, entry 13). The
extension's kernel moves 16-byte vectors and takes up to four pairs per launch. Without the
extension (CPU installs, a build without nvcc) or off CUDA, each pair is a ``copy_``.
"""

from __future__ import annotations

try:
    from .. import _C
except ImportError:  # no extension: plain copies
    _C = None

__all__ = ["copy_pairs", "FUSED"]

#: whether the fused copy is used: the extension has it (one built from older sources may lack it)
FUSED = _C is not None and hasattr(_C, "copy_pairs")


def copy_pairs(pairs) -> None:
    """``dst.copy_(src)`` for every ``(src, dst)`` of ``pairs`` (4-D tensors of equal sizes and
    dtype), on the current stream. The extension copies up to four pairs whose last dimension is
    contiguous or of size 1 in one launch and hands the others to ``copy_``, which runs first:
    destinations must not overlap. Every CUDA tensor of a call must be on one device."""
    if not pairs:
        return
    if FUSED and all(s.is_cuda and d.is_cuda for s, d in pairs):
        _C.copy_pairs(list(pairs))
        return
    for src, dst in pairs:
        dst.copy_(src)
