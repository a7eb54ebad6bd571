"""Attention Specialization Routing: statistics, Algorithm 1, calibration, routing files, CLI."""

import json
import math

import pytest
import torch

import oasis_kernels as ok
from oasis_kernels.routing import (RoutingCalibrator, assign_heads, global_head_count, head_statistics,
                                   head_statistics_reference, load_routing, routing_agreement)
from oasis_kernels.routing.cli import main as route_main
from conftest import DEVICE
from toy_dit import GRID, HEADS, LAYERS, build

FIELDS = ("lse_global", "lse_intra", "lse_window", "mass_intra", "mass_window", "kl_intra", "kl_window")


def dense_statistics(q, k, grid, window, eps, query_stride=1):
    """Float64, materialized N x N maps: the definition with nothing clever."""
    q, k = q.double(), k.double()
    n = q.shape[1]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = s[:, :, ::query_stride]
    p = torch.softmax(s, -1)
    out = {"lse_global": torch.logsumexp(s, -1)}
    for name, mask in (("intra", ok.IntraFrameMask(grid)), ("window", ok.WindowMask(grid, window))):
        sup = mask.materialize(q.device)[::query_stride]
        m_loc = torch.softmax(s.masked_fill(~sup, float("-inf")), -1)
        m_eps = (1 - eps) * m_loc + eps / n
        out[f"lse_{name}"] = torch.logsumexp(s.masked_fill(~sup, float("-inf")), -1)
        out[f"mass_{name}"] = (p * sup).sum(-1)
        out[f"kl_{name}"] = (p * (p.log() - m_eps.log())).sum(-1)
    return out


def _compare(stats, want, tol):
    for f in FIELDS:
        got = getattr(stats, f).double()
        err = (got - want[f]).abs().max().item()
        assert torch.isfinite(got).all(), f"{f}: non-finite"
        assert err <= tol * max(1.0, want[f].abs().max().item()), f"{f}: max err {err:.3e} > {tol:.1e}"


CASES = [((2, 3, 5), (3, 5, 5), 1), pytest.param((3, 7, 11), (3, 5, 5), 1, marks=pytest.mark.slow),
         pytest.param((3, 7, 11), (1, 3, 3), 3, marks=pytest.mark.slow),  # ~17 s each on the interpreter
         ((1, 6, 9), (3, 5, 5), 1), ((2, 3, 5), (5, 7, 11), 2)]


@pytest.mark.parametrize("grid,window,stride", CASES)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_statistics_match_dense_definition(grid, window, stride, backend, device):
    n = grid[0] * grid[1] * grid[2]
    q, k = (torch.randn(2, n, 3, 64, device=device) for _ in range(2))
    stats = head_statistics(q, k, grid, window, eps=1e-6, query_stride=stride, backend=backend)
    _compare(stats, dense_statistics(q, k, grid, window, 1e-6, stride), 2e-5)


@pytest.mark.slow  # ~11 s under the Triton interpreter on 2 cores
def test_statistics_bf16_inputs(device):
    grid, window = (3, 7, 11), (3, 5, 5)
    q, k = (torch.randn(1, 231, 2, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    stats = head_statistics(q, k, grid, window, backend="triton")
    _compare(stats, dense_statistics(q, k, grid, window, 1e-6), 2e-5)


@pytest.mark.parametrize("scale", [0.0, -0.3])
def test_statistics_any_scale(scale, device):
    grid, window = (2, 3, 5), (3, 3, 3)
    q, k = (torch.randn(1, 30, 2, 16, device=device) for _ in range(2))
    stats = head_statistics(q, k, grid, window, scale=scale, backend="triton")
    want = head_statistics_reference(q, k, grid, window, scale=scale)
    for f in FIELDS:
        got, ref = getattr(stats, f).double(), getattr(want, f).double()
        assert torch.isfinite(got).all(), f
        assert (got - ref).abs().max() <= 2e-5 * max(1.0, ref.abs().max().item()), f


def test_statistics_window_beyond_kernel_limits(device):
    """A window radius over the kernels' limit: auto takes the reference, triton says why not."""
    from oasis_kernels.kernels.local_attention import MAX_RADIUS

    n = 2 * MAX_RADIUS + 3
    q, k = (torch.randn(1, n, 1, 16, device=device) for _ in range(2))
    window = (1, 1, 2 * n - 1)
    stats = head_statistics(q, k, (1, 1, n), window)
    want = head_statistics_reference(q, k, (1, 1, n), window)
    torch.testing.assert_close(stats.kl_window, want.kl_window)
    with pytest.raises(NotImplementedError, match="window radii up to"):
        head_statistics(q, k, (1, 1, n), window, backend="triton")


def test_degenerate_supports_give_zero_kl(device):
    # T = 1: intra-frame is global; a window covering the grid is global: KL = -log(1 - eps) ~ eps
    q, k = (torch.randn(1, 54, 2, 32, device=device) for _ in range(2))
    eps = 1e-6
    stats = head_statistics(q, k, (1, 6, 9), (3, 13, 17), eps=eps, backend="triton")
    for name in ("intra", "window"):
        torch.testing.assert_close(getattr(stats, f"mass_{name}"), torch.ones_like(stats.mass_intra), atol=1e-6, rtol=0)
        assert getattr(stats, f"kl_{name}").abs().max() < 1e-4
    # corner tokens of a clipped window: the mass inside is still a probability
    stats = head_statistics(q, k, (1, 6, 9), (1, 3, 3), backend="triton")
    assert ((stats.mass_window > 0) & (stats.mass_window <= 1 + 1e-6)).all()
    assert (stats.kl_window > 0).all()


def test_statistics_errors():
    q = torch.randn(1, 30, 2, 16)
    with pytest.raises(ValueError, match="T\\*H\\*W=24"):
        head_statistics(q, q, (2, 3, 4))
    with pytest.raises(ValueError, match="query_stride"):
        head_statistics(q, q, (2, 3, 5), query_stride=0)
    with pytest.raises(ValueError, match="eps"):
        head_statistics(q, q, (2, 3, 5), eps=0.0)
    with pytest.raises(ValueError, match="unknown backend"):
        head_statistics(q, q, (2, 3, 5), backend="cuda")


# -- Algorithm 1 ---------------------------------------------------------------------------

SCORES = [  # [layers=2, heads=5, (intra, window)]
    [[0.1, 0.5], [2.0, 1.0], [0.9, 0.3], [5.0, 6.0], [0.2, 0.2]],
    [[3.0, 0.4], [0.05, 0.6], [4.0, 4.5], [1.5, 2.5], [0.7, 0.8]],
]


def test_algorithm_1_rho_extremes():
    assert all(m == ok.Mode.GLOBAL for row in assign_heads(SCORES, 1.0).modes for m in row)
    a = assign_heads(SCORES, 0.0)
    assert a.num_global == 0
    assert a.modes == a.preferred


def test_algorithm_1_rho_04():
    a = assign_heads(SCORES, 0.4)
    assert a.num_global == 4  # ceil(0.4 * 10), exactly
    # s_h: L0 [0.1, 1.0, 0.3, 5.0, 0.2]  L1 [0.4, 0.05, 4.0, 1.5, 0.7]; the 4 largest stay global
    g, i, w = ok.Mode.GLOBAL, ok.Mode.INTRA, ok.Mode.WINDOW
    assert a.modes == ((i, g, w, g, i), (w, i, g, g, i))


def test_algorithm_1_ties_are_deterministic():
    scores = [[[1.0, 1.0], [1.0, 2.0]], [[2.0, 1.0], [1.0, 1.0]]]  # every s_h = 1.0
    a = assign_heads(scores, 0.5)
    # ties keep (layer, head) order: the first two heads turn local, equal scores prefer intra
    assert a.modes == ((ok.Mode.INTRA, ok.Mode.INTRA), (ok.Mode.GLOBAL, ok.Mode.GLOBAL))
    assert assign_heads(scores, 0.5) == a


@pytest.mark.parametrize("rho,n,k", [(0.4, 10, 4), (0.4, 12, 5), (0.3, 10, 3), (1 / 3, 9, 3), (0.0, 7, 0), (1.0, 7, 7)])
def test_global_head_count(rho, n, k):
    assert global_head_count(rho, n) == k


def test_algorithm_1_bad_input():
    with pytest.raises(ValueError, match="rho"):
        assign_heads(SCORES, 1.5)
    with pytest.raises(ValueError, match=r"\[layers, heads, 2\]"):
        assign_heads([[0.1, 0.2]], 0.4)
    with pytest.raises(ValueError, match="finite"):
        assign_heads([[[float("nan"), 0.1]]], 0.4)


# -- calibration, files, CLI -----------------------------------------------------------

def _calibrate(videos=3, stride=1):
    model = build().to(DEVICE)
    cal = RoutingCalibrator((1, 3, 3), query_stride=stride, backend="reference")
    xs = [torch.randn(1, GRID[0] * GRID[1] * GRID[2], HEADS * 16, device=DEVICE) for _ in range(videos)]
    captured = []
    with torch.no_grad():
        for x in xs:
            with cal.record(model, lambda name, m: name.endswith("self_attn")):
                model(x)
            captured.append([blk.self_attn.captured for blk in model.blocks])
    return cal, captured


def test_calibrator_streams_means_per_layer():
    cal, captured = _calibrate(videos=3)
    assert cal.layers == [f"blocks.{i}.self_attn" for i in range(LAYERS)] and cal.videos == 3
    means = cal.means()
    for li, name in enumerate(cal.layers):
        direct = [head_statistics_reference(q, k, GRID, (1, 3, 3)).mean()["kl_window"] for q, k in
                  (c[li] for c in captured)]
        want = torch.stack(direct).mean(0)
        torch.testing.assert_close(torch.tensor(means[name]["kl_window"], dtype=torch.float64), want.cpu(),
                                   rtol=1e-6, atol=1e-6)


def test_routing_file_round_trip_and_model_checks(tmp_path):
    cal, _ = _calibrate(videos=2)
    routing = cal.assign(0.4)
    assert routing.num_global == math.ceil(0.4 * LAYERS * HEADS)
    path = tmp_path / "routing.json"
    routing.save(path)
    back = load_routing(path)
    assert [l.modes for l in back.layers] == [l.modes for l in routing.layers]
    assert back.window == (1, 3, 3) and back.videos == 2 and back.rho == 0.4
    assert routing_agreement(routing, back) == 1.0
    plan = back.plan("blocks.1.self_attn", GRID)
    assert plan.modes == tuple(routing.layers[1].modes) and plan.grid == GRID
    back.check_model(LAYERS, HEADS)
    with pytest.raises(ValueError, match=f"routing file has {LAYERS} layers but the model has 5"):
        back.check_model(5, HEADS)
    with pytest.raises(ValueError, match="routes 4 heads but the model has 8"):
        back.check_model(LAYERS, 8)
    with pytest.raises(ValueError, match="no layer 'blocks.9'"):
        back.plan("blocks.9", GRID)
    data = json.loads(path.read_text())
    data["format"] = "something-else"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not an oasis routing file"):
        load_routing(path)
    # re-assignment from stored statistics equals a fresh assignment
    for rho in (0.25, 1.0):
        assert [l.modes for l in back.reassign(rho).layers] == [l.modes for l in cal.assign(rho).layers]
    data["format"] = "oasis-routing/1"
    for layer in data["layers"]:
        layer.pop("stats")
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no kl_intra/kl_window statistics"):
        load_routing(path).reassign(0.4)


def test_agreement_counts_identical_assignments():
    cal, _ = _calibrate(videos=1)
    a, b = cal.assign(0.5), cal.assign(1.0)
    # b keeps every head global, so the two agree exactly on a's global heads: half of them
    assert routing_agreement(a, b) == a.num_global / (LAYERS * HEADS) == 0.5
    assert routing_agreement(a, cal.assign(0.5)) == 1.0


def test_cli_calibrate_assign_agree(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    inputs = tmp_path / "latents"
    inputs.mkdir()
    for i in range(3):
        torch.save(torch.randn(1, 30, HEADS * 16), inputs / f"video{i}.pt")
    out = tmp_path / "r.json"
    assert route_main(["calibrate", "--model", "toy_dit:build", "--inputs", str(inputs), "--rho", "0.5",
                       "--window", "1,3,3", "--layers", "self_attn$", "--device", "cpu", "--out", str(out)]) == 0
    r = load_routing(out)
    assert r.videos == 3 and r.num_layers == LAYERS and r.num_global == 6
    out2 = tmp_path / "r2.json"
    assert route_main(["assign", str(out), "--rho", "1.0", "--out", str(out2)]) == 0
    capsys.readouterr()
    assert route_main(["agree", str(out), str(out2)]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(0.5)


def test_calibrator_and_routing_file_settings_are_checked_when_made():
    """RoutingCalibrator's settings fail when it is made (they had failed at the model's first layer), and a
    routing file's layer is an index or a name (True had been layer 1)."""
    from oasis_kernels.routing import LayerRouting, RoutingCalibrator, RoutingFile

    for kwargs, says in (({"eps": 0}, "eps must be a number > 0.0"), ({"query_stride": 0}, "query_stride must be an int"),
                         ({"backend": "bogus"}, "backend must be 'auto', 'triton' or 'reference'")):
        with pytest.raises(ValueError, match=says):
            RoutingCalibrator((1, 3, 3), **kwargs)
    rf = RoutingFile([LayerRouting(f"blocks.{i}", [ok.Mode.GLOBAL]) for i in range(2)], 0.5, (1, 3, 3), 1e-6, 1, 1, 2)
    with pytest.raises(TypeError, match="layer must be an index or a name, got True"):
        rf.plan(True, (1, 2, 2))
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(TypeError, match="deterministic must be True or False, got 'no'"):
        ok.routed_attention(q, q, q, ok.RoutingPlan((1, 2, 2), ["g"]), deterministic="no")
    with pytest.raises(ValueError, match="backend mapping is empty"):
        ok.routed_attention(q, q, q, ok.RoutingPlan((1, 2, 2), ["g"]), backend={})


def test_numpy_numbers_are_numbers():
    """numpy's ints name modes as Python's do, and numpy's floats are rho (np.float32(0.4) as 0.4, not its
    binary value's 0.4000000059..., which would round 4 of 10 heads up to 5)."""
    import numpy as np

    from oasis_kernels.routing import global_head_count

    assert ok.RoutingPlan((1, 2, 2), [np.int64(0), np.int32(2)]).modes == (ok.Mode.GLOBAL, ok.Mode.WINDOW)
    with pytest.raises(ValueError, match="expected 0, 1 or 2"):
        ok.Mode.parse(np.int64(5))
    with pytest.raises(TypeError, match="got bool"):
        ok.Mode.parse(True)
    assert global_head_count(np.float32(0.4), 10) == global_head_count(0.4, 10) == 4
    with pytest.raises(ValueError, match="rho must be a number"):
        global_head_count(torch.tensor(0.4), 10)

