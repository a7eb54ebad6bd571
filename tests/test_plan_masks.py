"""Plans, normalizers and mask objects: the semantics everything else is checked against."""

import itertools

import pytest
import torch

import oasis_kernels as ok
from oasis_kernels.masks import grid_coords


def brute_force_mask(grid, radii):
    """Visibility by explicit loops over coordinates, independent of BoxMask's vectorized code."""
    t, h, w = grid
    coords = list(itertools.product(range(t), range(h), range(w)))
    n = len(coords)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, (a, b, c) in enumerate(coords):
        for j, (x, y, z) in enumerate(coords):
            m[i, j] = abs(a - x) <= radii[0] and abs(b - y) <= radii[1] and abs(c - z) <= radii[2]
    return m


@pytest.mark.parametrize("grid", [(1, 1, 1), (2, 3, 5), (3, 4, 4)])
@pytest.mark.parametrize("window", [(1, 1, 1), (3, 5, 5), (1, 3, 3), (5, 7, 7)])
def test_window_mask_matches_definition(grid, window):
    mask = ok.WindowMask(grid, window)
    want = brute_force_mask(grid, [p // 2 for p in window])
    assert torch.equal(mask.materialize(), want)
    assert mask.visible_pairs() == int(want.sum())


def test_window_is_clipped_not_shifted():
    # corner token of a (3,5,5) window sees 2*3*3 keys (NATTEN's shifted window would give 75)
    grid = (4, 8, 8)
    m = ok.WindowMask(grid, (3, 5, 5)).materialize()
    assert int(m[0].sum()) == 2 * 3 * 3
    interior = (1 * 8 + 4) * 8 + 4
    assert int(m[interior].sum()) == 75
    t, h, w = grid_coords(grid)
    keys = m[interior].nonzero().flatten()
    assert set(t[keys].tolist()) == {0, 1, 2} and set(h[keys].tolist()) == {2, 3, 4, 5, 6}


def test_intra_and_global_masks():
    grid = (3, 2, 4)
    intra = ok.IntraFrameMask(grid).materialize()
    t, _, _ = grid_coords(grid)
    assert torch.equal(intra, t[:, None] == t[None, :])
    assert ok.GlobalMask(grid).materialize().all()
    # window at least as large as the grid equals global; T=1 makes intra global
    assert torch.equal(ok.WindowMask(grid, (7, 5, 9)).materialize(), ok.GlobalMask(grid).materialize())
    assert torch.equal(ok.IntraFrameMask((1, 3, 5)).materialize(), ok.GlobalMask((1, 3, 5)).materialize())


def test_plan_basics():
    plan = ok.RoutingPlan((2, 3, 5), ["global", "w", ok.Mode.INTRA, 2, "g"], window=3)
    assert plan.window == (3, 3, 3) and plan.heads == 5 and plan.num_tokens == 30
    assert plan.modes == (ok.Mode.GLOBAL, ok.Mode.WINDOW, ok.Mode.INTRA, ok.Mode.WINDOW, ok.Mode.GLOBAL)
    assert plan.heads_of("global") == (0, 4) and plan.heads_of("window") == (1, 3)
    assert not plan.is_contiguous
    perm = plan.head_permutation()
    assert perm == (0, 4, 2, 1, 3)
    assert plan.permuted().modes == tuple(plan.modes[i] for i in perm)
    assert plan.permuted().is_contiguous
    assert hash(plan) == hash(ok.RoutingPlan((2, 3, 5), list("gwiwg"), 3))
    assert ok.RoutingPlan.from_op_args(*plan.as_op_args()) == plan
    assert "gwiwg" in repr(plan)


def test_plan_constructors_validate():
    with pytest.raises(ValueError, match="n_global must be >= 0"):
        ok.RoutingPlan.from_counts((2, 3, 5), -1, 2, 2)
    with pytest.raises(TypeError, match="n_intra must be an int"):
        ok.RoutingPlan.from_counts((2, 3, 5), 1, 2.0, 2)
    with pytest.raises(TypeError, match="heads must be an int"):
        ok.RoutingPlan.uniform((2, 3, 5), 2.5, "g")
    with pytest.raises(ValueError, match="heads must be positive"):
        ok.RoutingPlan.uniform((2, 3, 5), 0, "g")


def test_head_permutation_reorders_a_layer():
    """Permuting heads of q/k/v and routing with the permuted plan gives the permuted output."""
    plan = ok.RoutingPlan((2, 3, 4), ["w", "g", "i", "g", "w"], (1, 3, 3))
    q, k, v = (torch.randn(1, 24, 5, 16, dtype=torch.float64) for _ in range(3))
    out = ok.routed_attention(q, k, v, plan, backend="reference")
    perm = list(plan.head_permutation())
    out_p = ok.routed_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], plan.permuted(), backend="reference")
    torch.testing.assert_close(out_p, out[:, :, perm], rtol=0, atol=1e-12)


@pytest.mark.parametrize("heads,want", [
    ([0, 1, 2], [slice(0, 3, 1)]),
    ([0, 3, 6, 9], [slice(0, 10, 3)]),
    ([0, 1, 5], [slice(0, 2, 1), slice(5, 6, 1)]),
    ([4], [slice(4, 5, 1)]),
    ([], []),
])
def test_head_runs(heads, want):
    runs = ok.head_runs(heads)
    assert runs == want
    assert [h for r in runs for h in range(r.start, r.stop, r.step)] == heads


@pytest.mark.parametrize("bad,exc", [
    ((2, 4, 5), ValueError),      # even window
    ((0, 3, 3), ValueError),      # non-positive
    ((-1, 3, 3), ValueError),
    ((3, 3), ValueError),         # wrong length
    ((3.0, 3, 3), TypeError),     # float
    ("3,5,5", TypeError),
    (True, TypeError),
])
def test_bad_window(bad, exc):
    with pytest.raises(exc, match="window"):
        ok.RoutingPlan((2, 3, 5), ["g"], bad)


@pytest.mark.parametrize("bad,exc", [((0, 3, 5), ValueError), ((2, 3), ValueError), ((2, 3, 5.5), TypeError)])
def test_bad_grid(bad, exc):
    with pytest.raises(exc, match="grid"):
        ok.RoutingPlan(bad, ["g"])


@pytest.mark.parametrize("modes,exc,match", [
    (["global", "diagonal"], ValueError, "unknown attention mode 'diagonal'"),
    ([7], ValueError, "unknown attention mode 7"),
    ([1.5], TypeError, "mode must be"),
    ([], ValueError, "at least one head"),
    ("gwi", TypeError, "string"),
])
def test_bad_modes(modes, exc, match):
    with pytest.raises(exc, match=match):
        ok.RoutingPlan((2, 3, 5), modes)


def test_grid_needs_three_sizes_window_may_be_a_cube():
    # one int is not a grid: RoutingPlan(180, ...) once became the grid (180, 180, 180)
    for make in (lambda: ok.RoutingPlan(180, ["g"]), lambda: ok.normalize_grid(180),
                 lambda: ok.WindowMask(180, 3), lambda: ok.IntraFrameMask(5)):
        with pytest.raises(TypeError, match=r"grid must be a 3-tuple of ints \(T, H, W\), got the single int"):
            make()
    with pytest.raises(ValueError, match=r"grid must have 3 entries.*\[2, 3\]"):
        ok.RoutingPlan([2, 3], ["g"])
    with pytest.raises(TypeError, match="grid entries must be ints"):
        ok.RoutingPlan((2.0, 3, 5), ["g"])
    # nor a set: {9, 45, 80} iterates as 80, 9, 45 (the same N: it had run with the sizes reordered)
    for unordered in ({9, 45, 80}, frozenset({5, 4, 3}), {9: 0, 45: 0, 80: 0}):
        with pytest.raises(TypeError, match="in order, got the unordered"):
            ok.RoutingPlan(unordered, ["i"])
    with pytest.raises(TypeError, match="window must be .* in order, got the unordered set"):
        ok.RoutingPlan((2, 3, 5), ["w"], {3, 5, 7})
    # a window is a cube when given one int (documented), and integral numpy/torch sizes pass
    assert ok.RoutingPlan((2, 3, 5), ["w"], 3).window == (3, 3, 3)
    assert ok.normalize_window(5) == (5, 5, 5)
    assert ok.RoutingPlan(torch.tensor([2, 3, 5]), ["g"]).grid == (2, 3, 5)
