"""The tolerance rule itself: it passes correctly rounded results and rejects small errors."""

import pytest
import torch

from tolerance import FLOOR, assert_rule


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["fwd", "grad"])
def test_rule_passes_rounding_and_rejects_a_few_ulps(dtype, kind):
    ref = torch.randn(64, 64, dtype=torch.float64)
    rounded = ref.to(dtype)  # the best any kernel can return in this dtype
    assert_rule(rounded, ref, rounded, kind=kind, dtype=dtype, what="rounded")
    # one element off by 8 units in the last place at the largest magnitude (fp16, bf16: the
    # floor is one unit, the baseline's error half a unit), or by 4 floors (fp32): a real bug
    # that stays below 1% of the scale
    scale = ref.abs().max().item()
    ulp = scale * torch.finfo(dtype).eps
    if dtype != torch.float32:
        assert FLOOR[dtype] * scale <= ulp * 1.0001
    bad = rounded.clone()
    bad[3, 5] += max(8 * ulp, 4 * FLOOR[dtype] * scale)
    with pytest.raises(AssertionError, match=r"at \(3, 5\)"):
        assert_rule(bad, ref, rounded, kind=kind, dtype=dtype, what="bad")
    bad = rounded.clone()
    bad[7, 1] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_rule(bad, ref, rounded, kind=kind, dtype=dtype, what="nan")
