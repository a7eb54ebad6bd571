"""benchmarks/dist_bench.py on the CPU (gloo, tiny): every section and placement runs on 1 and 2 processes and
the report has its rows (the timings themselves are the multi-GPU machine's)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dist_bench  # noqa: E402


@pytest.mark.slow  # two process starts; ~10 s on 2 cores
def test_tiny_run_on_two_processes(tmp_path):
    assert dist_bench.main(["--device", "cpu", "--gpus", "1,2", "--tiny", "--reps", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "dist_bench.json").read_text())["rows"]
    att = [(r["ranks"], r["placement"]) for r in rows if r["section"] == "attention"]
    assert att == [(1, "one GPU")] + [(2, name) for name, *_ in dist_bench.PLACEMENTS]
    by = {(r["section"], r["ranks"], r.get("placement")): r for r in rows}
    for name, *_ in dist_bench.PLACEMENTS:
        r = by[("attention", 2, name)]
        assert r["fwd_ms"] > 0 and r["collectives_fwd_bwd_ms"] > 0 and r["kernels_fwd_ms"] > 0
        assert r["fwd_efficiency"] == pytest.approx(by[("attention", 1, "one GPU")]["fwd_ms"] / (2 * r["fwd_ms"]))
    assert by[("dit", 2, None)]["efficiency"] > 0 and by[("train", 2, None)]["efficiency"] > 0
    md = (tmp_path / "dist_bench.md").read_text()
    assert "tiny config (a check of the code" in md and "hybrid, global heads all-gather" in md


@pytest.mark.parametrize("argv,says", [(["--gpus", "0"], "--gpus"), (["--what", "nothing"], "--what"),
                                       (["--grids", "4,4"], "--grids"), (["--reps", "0"], "--reps")])
def test_bad_settings_exit_2(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        dist_bench.parse_args(["--device", "cpu", *argv])
    assert exc.value.code == 2 and says in capsys.readouterr().err
