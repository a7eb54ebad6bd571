"""Host-side costs per call (pytest-benchmark; runs in CI, asserts no times).

    pytest benchmarks/bench_host.py --benchmark-only
"""

import torch

import oasis_kernels as ok
from oasis_kernels.dispatch import decide

GRID = (27, 45, 80)
MODES = ["g"] * 5 + ["i"] * 4 + ["w"] * 3


def test_plan_construction(benchmark):
    plan = benchmark(ok.RoutingPlan, GRID, MODES, (3, 5, 5))
    assert plan.heads == 12


def test_dispatch_decision(benchmark):
    """Uncached decision: every capability predicate runs (what a cache miss costs)."""
    plan = ok.RoutingPlan(GRID, MODES)
    small = plan.with_grid((2, 2, 2))
    q = torch.empty(1, small.num_tokens, 12, 128, dtype=torch.bfloat16)
    d = benchmark(decide, q, small)
    assert len(d.decisions) == 3


def test_routed_call_overhead_tiny(benchmark):
    """End-to-end call on a tiny CPU shape: validation, cached dispatch, custom op, kernels."""
    plan = ok.RoutingPlan((2, 3, 4), MODES, (1, 3, 3))
    q, k, v = (torch.randn(1, 24, 12, 16) for _ in range(3))
    out = benchmark(ok.routed_attention, q, k, v, plan)
    assert out.shape == q.shape


def test_reference_tiny(benchmark):
    plan = ok.RoutingPlan((2, 3, 4), MODES, (1, 3, 3))
    q, k, v = (torch.randn(1, 24, 12, 16) for _ in range(3))
    out = benchmark(ok.routed_attention, q, k, v, plan, backend="reference")
    assert torch.isfinite(out).all()
