"""benchmarks/rank_share_bench.py on the CPU: its traffic model against docs/DISTRIBUTED.md's table,
and a small run whose rows cover every placement and rank (the timings themselves are the GPU's)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import rank_share_bench as rsb  # noqa: E402


@pytest.mark.parametrize("grid,world,ulysses_mb,hybrid_mb", [
    ((9, 45, 80), 2, 105.1, 47.9), ((9, 45, 80), 4, 91.2, 41.5), ((9, 45, 80), 8, 68.2, 34.1),
    ((27, 45, 80), 2, 304.1, 139.2), ((27, 45, 80), 4, 229.5, 106.9), ((27, 45, 80), 8, 153.0, 76.5)])
def test_traffic_model_is_the_docs_table(grid, world, ulysses_mb, hybrid_mb):
    """docs/DISTRIBUTED.md's table: bf16, 12 heads of 128, 5 global and 3 window."""
    plan = rsb.layer_plan(grid, (5, 4, 3), (3, 5, 5))
    assert rsb.traffic_bytes(plan, world, False, 1, 128, 2) / 1e6 == pytest.approx(ulysses_mb, abs=0.05)
    assert rsb.traffic_bytes(plan, world, True, 1, 128, 2) / 1e6 == pytest.approx(hybrid_mb, abs=0.05)
    assert rsb.traffic_bytes(plan, 1, True, 1, 128, 2) == 0


def test_traffic_by_hand():
    """A on 2 ranks (5 and 4 frames of 3600 tokens): Ulysses' busiest is rank 0, 6 of its 12 heads' q, k, v
    out and 6 heads' output for the other 14,400 tokens; the hybrid's is rank 1 (global heads 3 and 2:
    it sends 3 heads' q, k, v and 2 heads' output for 18,000 tokens), plus one frame of 3 window heads'
    k and v to its one neighbour."""
    plan = rsb.layer_plan((9, 45, 80), (5, 4, 3), (3, 5, 5))
    assert rsb.traffic_bytes(plan, 2, False, 1, 128, 2) == (3 * 18000 * 6 + 6 * 14400) * 256
    assert rsb.traffic_bytes(plan, 2, True, 1, 128, 2) == (3 * 14400 * 3 + 2 * 18000 + 2 * 3600 * 3) * 256
    # the global heads gathered: rank 0 sends its 18,000 tokens' k and v of all 5 to the other rank
    assert rsb.traffic_bytes(plan, 2, True, 1, 128, 2, gather_globals=True) == (2 * 18000 * 5 + 2 * 3600 * 3) * 256


def test_small_run_on_the_cpu(tmp_path):
    assert rsb.main(["--grids", "4,4,6", "--head-dim", "16", "--device", "cpu", "--ranks", "1,2,4,5",
                     "--warmup-ms", "0", "--rep-ms", "1", "--dit-forward-ms", "50", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "rank_share_bench.json").read_text())["rows"]
    assert [(r["ranks"], r["placement"]) for r in rows] == [(1, "one GPU")] + [
        (p, name) for p in (2, 4, 5) for name, *_ in rsb.PLACEMENTS]
    by = {(r["ranks"], r["placement"]): r for r in rows}
    # 12 heads do not split over 5 ranks for Ulysses, nor 4 frames over 5 ranks for the hybrid
    assert all("skipped" in by[(5, name)] for name, *_ in rsb.PLACEMENTS)
    for (p, name), r in by.items():
        if "skipped" in r:
            continue
        assert len(r["rank_fwd_ms"]) == p and min(r["rank_fwd_ms"]) > 0
        assert r["fwd_slowest_ms"] == max(r["rank_fwd_ms"])
        assert r["fwd_efficiency"] == pytest.approx(by[(1, "one GPU")]["rank_fwd_ms"][0] / (p * r["fwd_layer_ms"]))
        if name.startswith("ulysses"):  # every head on exactly one rank, over all the tokens
            heads = [c.split()[-1] for rank in r["calls"] for c in rank]
            assert sorted("".join(heads)) == sorted("g" * 5 + "i" * 4 + "w" * 3)
    assert by[(4, "ulysses, contiguous heads")]["calls"][0] == ["(4, 4, 6) ggg"]
    assert by[(2, "hybrid, global heads all-gather")]["calls"][1][0] == "48 queries of (4, 4, 6) ggggg"
    assert by[(2, "hybrid, global heads all-to-all")]["calls"][1][0] == "(4, 4, 6) gg"
    assert "rank_share_bench" in (tmp_path / "rank_share_bench.md").read_text()


def test_two_grids_with_the_dits_time_of_the_first(tmp_path):
    """--dit-forward-ms is the first grid's: the second grid's rows have no DiT columns (a KeyError there
    once lost a GPU run's results after timing them)."""
    assert rsb.main(["--grids", "4,4,6", "8,4,6", "--head-dim", "16", "--device", "cpu", "--ranks", "1,2",
                     "--warmup-ms", "0", "--rep-ms", "1", "--dit-forward-ms", "50", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "rank_share_bench.json").read_text())["rows"]
    assert ["dit_fwd_ms" in r for r in rows if "skipped" not in r] == [True] * 5 + [False] * 5
    lines = [ln for ln in (tmp_path / "rank_share_bench.md").read_text().splitlines() if ln.startswith("| 8x4x6 |")]
    assert len(lines) == 5 and all(ln.endswith("| - | - |") for ln in lines)


@pytest.mark.parametrize("argv,message", [(["--ranks", "0,2"], "--ranks"), (["--mix", "1,2"], "--mix"),
                                          (["--grids", "4,4"], "--grids"), (["--link-GBps", "0"], "--link-GBps")])
def test_bad_settings_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        rsb.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
