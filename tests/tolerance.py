"""The tolerance rule of FlashAttention's own tests, with Liger-style error reports.

A result passes when its max error against the float64 reference is at most ``factor``
times the error of the same math done by plain PyTorch in the input dtype, plus a small
floor: factor 2 for forward outputs, 3 for gradients. NaN or Inf never passes.
"""

from __future__ import annotations

import torch

#: floor per input dtype, relative to the reference's largest magnitude (bf16: about a quarter
#: of a unit in the last place there). It was raised to 2^-8 once, when the Triton dV and dQ
#: failed a few seeds in a hundred on 54-token cases; the cause was Triton 3.6's interpreter,
#: which truncates float32 to bfloat16 instead of rounding it (kernels.tile_geometry.narrow now
#: rounds first). With rounding as on the GPU, 180 draws of three small cases needed no floor
#: at all for out, dQ, dK and dV. test_tolerance.py checks the rule still rejects a few units.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
FACTOR = {"fwd": 2.0, "grad": 3.0}


def assert_rule(actual, reference, baseline, *, kind: str, dtype: torch.dtype, what: str):
    """``actual``/``baseline``: any dtype; ``reference``: float64 (same shape)."""
    actual = actual.detach().double()
    reference = reference.detach().double()
    baseline = baseline.detach().double()
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    bad = ~torch.isfinite(actual)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} non-finite values, first at {idx}: {actual[idx].item()}")
    err = (actual - reference).abs()
    base = (baseline - reference).abs().max().item()
    scale = max(1.0, reference.abs().max().item())
    bound = FACTOR[kind] * base + FLOOR[dtype] * scale
    worst = err.max().item()
    if worst > bound:
        idx = tuple(int(i) for i in (err == err.max()).nonzero()[0])
        n_bad = int((err > bound).sum())
        raise AssertionError(
            f"{what}: max |err| {worst:.3e} at {idx} (got {actual[idx].item():.6f}, want "
            f"{reference[idx].item():.6f}); {n_bad}/{err.numel()} elements over the bound "
            f"{bound:.3e} = {FACTOR[kind]}x PyTorch-{str(dtype).split('.')[-1]} error {base:.3e} "
            f"+ floor {FLOOR[dtype] * scale:.1e}"
        )
    return worst, bound
