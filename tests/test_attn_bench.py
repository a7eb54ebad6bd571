"""benchmarks/attn_bench.py on the CPU: every flag honoured (on scaled-down presets) or refused
with one line and exit code 2, warm calls timed."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

import oasis_kernels as ok

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import attn_bench  # noqa: E402

FAST = ["--device", "cpu", "--warmup-ms", "0", "--rep-ms", "0", "--head-dim", "16"]


def bench(capsys, *argv):
    rc = attn_bench.main([*FAST, *argv])
    out = capsys.readouterr().out
    assert rc == 0, out
    return out


def table_rows(out: str) -> dict[str, list[str]]:
    """The final table: row name -> its cells after the name, and the header under key 'head'."""
    lines = out[out.rindex("\nshape "):].strip().splitlines()
    rows = {"head": lines[0].split()}
    for line in lines[2:]:
        cells = [c for c in line.split("  ") if c.strip()]
        rows[cells[1].strip()] = [c.strip() for c in cells[2:]]
    return rows


def test_cpu_run_honours_shape_pass_dtype_heads_mix_and_groups(capsys):
    out = bench(capsys, "--shapes", "S", "--pass", "fwd", "--dtype", "fp32", "--heads", "3", "--mix", "1,1,1",
                "--groups", "routed,global")
    assert "S (2, 4, 8) (scaled down from (5, 20, 40)) N=64" in out and "modes='giw'" in out
    assert "batch=1, D=16, fp32" in out
    rows = table_rows(out)
    assert rows["head"][:4] == ["shape", "row", "fwd", "ms"] and "fwdbwd" not in rows["head"]
    assert set(rows) - {"head"} == {"routed, oasis auto", "routed, oasis reference", "3 global heads, SDPA cpu",
                                    "3 global heads, oasis auto"}
    out = bench(capsys, "--shapes", "A", "--pass", "fwdbwd", "--dtype", "bf16", "--heads", "2", "--mix", "0,1,1",
                "--groups", "window", "--backends", "ours", "--window", "1,3,3")
    assert "A (3, 9, 16) (scaled down from (9, 45, 80)) N=432" in out and "modes='iw', window=(1, 3, 3)" in out
    assert "bf16" in out
    rows = table_rows(out)
    assert "fwdbwd" in rows["head"] and "fwd" not in rows["head"]
    assert set(rows) - {"head"} == {"2 window heads, oasis auto"}


def test_cpu_grid_batch_and_out(capsys, tmp_path):
    out = bench(capsys, "--grid", "2,3,5", "--batch", "2", "--heads", "2", "--mix", "1,1,0", "--pass", "fwd",
                "--groups", "routed", "--backends", "ours", "--out", str(tmp_path))
    assert "custom (2, 3, 5) N=30" in out and "batch=2" in out
    data = json.loads((tmp_path / "attn_bench_cpu_bf16.json").read_text())
    assert data["shapes"]["custom"]["grid"] == [2, 3, 5] and data["config"]["batch"] == 2
    row = data["shapes"]["custom"]["rows"][0]
    assert row["status"] == "ok" and row["fwd"]["ms"] > 0 and row["fwd"]["reps"] >= 3 and "first_ms" in row["fwd"]
    assert "scaled-down shapes" in (tmp_path / "attn_bench_cpu_bf16.md").read_text()


def test_warm_calls_are_timed_not_the_first():
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.05)  # e.g. dispatch decisions and lazy imports of a first call

    timed = attn_bench.cpu_time_ms(fn, warmup_ms=0, rep_ms=0)
    assert timed["first_ms"] >= 50 and timed["ms"] < 5 and timed["reps"] == 3 and len(calls) == 5


@pytest.mark.parametrize("argv,message", [
    (["--graphs", "S"], "--graphs S: CUDA graphs need CUDA"),
    (["--backends", "ours,flex"], "--backends flex: the FlexAttention rows need CUDA"),
    (["--backends", "cudnn"], "--backends: unknown name(s) ['cudnn']"),
    (["--shapes", "S,C"], "--shapes: unknown preset(s) ['C']"),
    (["--groups", "local"], "--groups: unknown group(s) ['local']"),
    (["--mix", "1,1"], "--mix: expected 3 comma-separated integers, got '1,1'"),
    (["--mix", "1,1,1"], "--mix 1,1,1 routes 3 heads but --heads is 12"),
    (["--grid", "2,3"], "--grid: expected 3 comma-separated integers"),
    (["--window", "2,3,3"], "window sizes must be odd and positive"),
    (["--heads", "0"], "argument --heads: must be a positive integer, got '0'"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["--rep-ms", "nan"], "argument --rep-ms: must be a number of milliseconds >= 0"),
    (["--routing", "no_such_routing.json"], "--routing no_such_routing.json: no such file"),
])
def test_bad_or_cpu_impossible_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        attn_bench.parse_args(["--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_a_routing_file_sets_the_heads(tmp_path, capsys):
    """--routing's layer sets the heads and modes: --heads or --mix beside it would be ignored, so they are
    refused; alone it gives the file's plan."""
    from oasis_kernels.routing import LayerRouting, RoutingFile

    RoutingFile([LayerRouting("blocks.0", [ok.Mode.GLOBAL, ok.Mode.INTRA, ok.Mode.WINDOW, ok.Mode.INTRA])], 0.25,
                (3, 5, 5), 1e-6, 1, 1, 1).save(tmp_path / "r.json")
    for extra in (["--heads", "7"], ["--mix", "1,1,1"]):
        with pytest.raises(SystemExit) as exc:
            attn_bench.parse_args(["--device", "cpu", "--routing", str(tmp_path / "r.json"), *extra])
        assert exc.value.code == 2 and "its layer sets the heads and modes; leave out" in capsys.readouterr().err
    args = attn_bench.parse_args(["--device", "cpu", "--routing", str(tmp_path / "r.json")])
    assert args.heads == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_device_cuda_without_cuda(capsys):
    with pytest.raises(SystemExit) as exc:
        attn_bench.parse_args(["--device", "cuda"])
    assert exc.value.code == 2 and "--device cuda: CUDA is not available here" in capsys.readouterr().err
