"""benchmarks/*.py command lines: a bad setting, an --out that is a file, or a GPU-only run without
CUDA ends before any measurement with exit code 2 and one line naming the value; the records say
what the run used and do not overwrite each other."""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attn_bench  # noqa: E402
import host_profile  # noqa: E402
import local_bench  # noqa: E402
import routing_bench  # noqa: E402


def refused(capsys, call, argv, *says):
    """``call(argv)`` exits 2 with one line on stderr holding each of ``says``."""
    with pytest.raises(SystemExit) as exc:
        call(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    for text in says:
        assert text in err, err
    return err


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA said to be present: the arguments are parsed to the end, nothing runs on it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "taken"
    path.write_text("")
    return str(path)


# --------------------------------------------------------------------------------------
# attn_bench
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,says", [
    (["--backends", "sdpa", "--groups", "routed,window"], ["--backends sdpa --groups routed,window: nothing matches"]),
    (["--backends", "sdpa", "--groups", "floor", "--mix", "0,6,6"], ["--groups floor: nothing matches"]),
    (["--shapes", ","], ["--shapes: none given"]),
])
def test_attn_bench_selection_of_no_rows(argv, says, capsys):
    refused(capsys, attn_bench.parse_args, ["--device", "cpu", *argv], *says)


def test_attn_bench_backend_groups_are_build_rows(fake_cuda):
    """BACKEND_GROUPS (the parse-time check) against the rows build_rows makes on the CPU."""
    args = attn_bench.parse_args(["--device", "cpu", "--heads", "3", "--mix", "1,1,1"])
    plan = attn_bench.make_plan((2, 4, 8), args)
    for backend in ("ours", "sdpa"):
        args.backends, args.groups = [backend], ["all"]
        made = {r.group for r in attn_bench.build_rows(plan, args, torch.device("cpu"))}
        assert made == attn_bench.BACKEND_GROUPS[backend], backend


def test_attn_bench_times_the_cuda_local_kernels_beside_triton(fake_cuda):
    """On CUDA, each local pattern has a row per named kernel (Triton's and csrc/'s), and the routed layer a row
    with its window heads on the CUDA kernels (the candidate for CUDA_BEFORE_TRITON); the rows are only made."""
    args = attn_bench.parse_args(["--device", "cpu", "--heads", "3", "--mix", "1,1,1", "--backends", "ours"])
    rows = {r.name: r for r in attn_bench.build_rows(attn_bench.make_plan((2, 4, 8), args), args, torch.device("cuda"))}
    for name in ("3 intra heads, oasis triton", "3 intra heads, oasis cuda", "3 window heads, oasis triton",
                 "3 window heads, oasis cuda", "routed, oasis auto, window heads on cuda"):
        assert name in rows, name
    assert rows["3 window heads, oasis cuda"].group == "window" and rows["3 intra heads, oasis cuda"].group == "intra"
    no_window = attn_bench.parse_args(["--device", "cpu", "--heads", "2", "--mix", "1,1,0", "--backends", "ours"])
    made = attn_bench.build_rows(attn_bench.make_plan((2, 4, 8), no_window), no_window, torch.device("cuda"))
    assert not any("window heads on cuda" in r.name for r in made)


def test_environment_records_libraries_on_request():
    env = attn_bench.environment(torch.device("cpu"))
    assert "diffusers" not in env and "nccl" not in env
    env = attn_bench.environment(torch.device("cpu"), libraries=("torch", "no-such-distribution", "nccl"))
    assert env["torch"] == attn_bench.library_version("torch") != "not installed"
    assert env["no-such-distribution"] == "not installed"
    if torch.cuda.is_available():
        assert re.fullmatch(r"\d+(\.\d+)*|unknown", env["nccl"]), env["nccl"]
    else:
        assert env["nccl"] == "no CUDA"
    assert attn_bench._commit({"commit": "0123456789abcdef", "dirty": True}, 7) == "0123456 (dirty)"
    assert attn_bench._commit({"commit": "0123456789abcdef", "dirty": "unknown"}, 7) == "0123456"


# --------------------------------------------------------------------------------------
# the GPU-only scripts: arguments first, then the missing CUDA
# --------------------------------------------------------------------------------------

GPU_ONLY = {"host_profile": host_profile.main, "routing_bench": routing_bench.main, "local_bench": local_bench.main}


@pytest.mark.parametrize("script,argv,says", [
    ("host_profile", ["--shapes", "S,C"], ["--shapes: unknown preset(s) ['C']", "choose from S, A, B"]),
    ("host_profile", ["--mix", "1,2"], ["--mix: expected 3 comma-separated integers, got '1,2'"]),
    ("host_profile", ["--mix", "0,0,0"], ["--mix: head counts must be >= 0 with at least one head"]),
    ("host_profile", ["--mix=-1,2,2"], ["--mix: head counts must be >= 0", "-1"]),
    ("host_profile", ["--calls", "0"], ["argument --calls: must be a positive integer, got '0'"]),
    ("host_profile", ["--head-dim", "x"], ["argument --head-dim: must be a positive integer, got 'x'"]),
    ("routing_bench", ["--grid", "9,45"], ["--grid: expected 3 comma-separated integers, got '9,45'"]),
    ("routing_bench", ["--grid", "0,4,4"], ["--grid 0,4,4: grid sizes must be positive"]),
    ("routing_bench", ["--window", "2,3,3"], ["--window 2,3,3: window sizes must be odd"]),
    ("routing_bench", ["--head-dim", "0"], ["argument --head-dim: must be a positive integer, got '0'"]),
    ("local_bench", ["--shapes", "S,Q"], ["--shapes: unknown preset(s) ['Q']"]),
    ("local_bench", ["--heads", "0"], ["argument --heads: must be a positive integer, got '0'"]),
    ("local_bench", ["--head-dim", "-4"], ["argument --head-dim: must be a positive integer, got '-4'"]),
    ("local_bench", ["--window", "3,5"], ["--window: expected 3 comma-separated integers, got '3,5'"]),
    ("local_bench", ["--backends", "triton,flash"], ["--backends: unknown backend(s) ['flash']", "triton, cuda"]),
    ("local_bench", ["--configs", "0,99"], ["--configs: [99] not in 0..15"]),
    ("local_bench", ["--configs", "1,x"], ["--configs: expected comma-separated integers, got '1,x'"]),
    ("local_bench", ["--api-only", "--configs", "1"], ["--configs 1: picks sweep configs"]),
    ("local_bench", ["--tag", "a/b"], ["--tag a/b"]),
])
def test_gpu_only_scripts_check_their_arguments_without_cuda(script, argv, says, capsys, no_cuda):
    refused(capsys, GPU_ONLY[script], argv, *says)


@pytest.mark.parametrize("script", sorted(GPU_ONLY))
def test_gpu_only_scripts_refuse_a_file_as_out_then_say_cuda_is_missing(script, capsys, no_cuda, a_file):
    refused(capsys, GPU_ONLY[script], ["--out", a_file], f"--out {a_file}: is a file, not a directory")
    refused(capsys, GPU_ONLY[script], [], f"{script} times GPU", "CUDA is not available here")


def test_a_gpu_only_script_exits_2_from_the_shell():
    """The exit code and the one line as a shell sees them (no traceback, nothing on stdout)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "routing_bench.py"), "--grid", "9,x,80"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.count("\n") == 1 and "--grid: expected comma-separated integers, got '9,x,80'" in proc.stderr


# --------------------------------------------------------------------------------------
# what the GPU-only scripts write
# --------------------------------------------------------------------------------------

def test_local_bench_file_names_the_shapes(fake_cuda):
    names = {local_bench.output_name(local_bench.parse_args(argv)) for argv in
             (["--shapes", "S"], ["--shapes", "B"], ["--shapes", "S,A,B", "--tag", "new"], ["--mode", "intra"])}
    assert names == {"local_bench_S_window.json", "local_bench_B_window.json", "local_bench_S-A-B_window_new.json",
                     "local_bench_B_intra.json"}


def test_routing_bench_file_names_grid_and_commit():
    env = {"gpu": "NVIDIA H200", "commit": "183c4f2aaaa"}
    assert routing_bench.output_stem(env, (9, 45, 80)) == "routing_bench_NVIDIA_H200_9x45x80_183c4f2"
    assert routing_bench.output_stem(env, (27, 45, 80)) != routing_bench.output_stem(env, (9, 45, 80))


def test_host_profile_report_starts_with_the_environment(tmp_path):
    env = attn_bench.environment(torch.device("cpu"))
    env["dirty"] = True
    line = host_profile.env_line(env)
    assert f"torch {env['torch']}" in line and f"commit {env['commit'][:12]} (dirty)" in line
    host_profile.write_report(tmp_path, [line, "## S"], {"env": env, "rows": [{"variant": "x", "wall_ms": 1.0}]})
    assert (tmp_path / "host_profile.txt").read_text().splitlines()[0] == line
    assert json.loads((tmp_path / "host_profile.json").read_text())["env"]["torch"] == env["torch"]


# --------------------------------------------------------------------------------------
# conv_bench, vae_bench, model_bench (GPU only)
# --------------------------------------------------------------------------------------

import conv_bench  # noqa: E402
import model_bench  # noqa: E402
import vae_ab  # noqa: E402
import vae_bench  # noqa: E402

GPU_ONLY.update(conv_bench=conv_bench.main, vae_bench=vae_bench.main, model_bench=model_bench.main, vae_ab=vae_ab.main)
DIRTY_ENV = {"gpu": "NVIDIA H200", "date": "2026-12-06T00:00:00+00:00", "commit": "abcdef0123456", "dirty": True,
             "torch": "2.x", "triton": "3.x", "diffusers": "0.33.1"}


@pytest.mark.parametrize("script,argv,says", [
    ("conv_bench", ["--only", "up9"], ["--only 'up9': no convolution's name contains it", "up0 384->384 3x3x3"]),
    ("conv_bench", ["--reps", "0"], ["argument --reps: must be a positive integer, got '0'"]),
    ("conv_bench", ["--chunk-frames", "-1"], ["argument --chunk-frames: must be a positive integer, got '-1'"]),
    ("vae_bench", ["--latent", "9", "0", "160"], ["argument --latent: must be a positive integer, got '0'"]),
    ("vae_bench", ["--long=-1"], ["argument --long: must be an integer >= 0, got '-1'"]),
    ("vae_bench", ["--reps", "0"], ["argument --reps: must be a positive integer, got '0'"]),
    ("model_bench", ["--reps", "0"], ["argument --reps: must be a positive integer, got '0'"]),
    ("vae_ab", ["--kernels", "triton"], ["argument --kernels: invalid choice: 'triton'"]),
    ("vae_ab", ["--kernels", "auto", "cudnn", "auto"], ["--kernels: each setting once, got auto cudnn auto"]),
    ("vae_ab", ["--rounds", "0"], ["argument --rounds: must be a positive integer, got '0'"]),
    ("vae_ab", ["--what", "train"], ["argument --what: invalid choice: 'train'"]),
    ("vae_ab", ["--latent", "9", "90"], ["argument --latent: expected 3 arguments"]),
    ("model_bench", ["--grids", "C"], ["argument --grids: invalid choice: 'C'"]),
    ("model_bench", ["--inductor-options", "[1]"], ["--inductor-options: a JSON object of Inductor options, got [1]"]),
])
def test_vae_and_model_scripts_check_their_arguments_without_cuda(script, argv, says, capsys, no_cuda):
    refused(capsys, GPU_ONLY[script], argv, *says)


@pytest.mark.parametrize("script", ["conv_bench", "vae_bench", "model_bench", "vae_ab"])
def test_vae_and_model_scripts_refuse_a_file_as_out_then_say_cuda_is_missing(script, capsys, no_cuda, a_file):
    refused(capsys, GPU_ONLY[script], ["--out", a_file], f"--out {a_file}: is a file, not a directory")
    refused(capsys, GPU_ONLY[script], [], f"{script} times", "CUDA is not available here")


def test_diffusers_missing_is_said_before_the_run(capsys, fake_cuda, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    refused(capsys, vae_bench.parse_args, [], "diffusers is not installed")
    refused(capsys, model_bench.parse_args, ["--vsr", "--vae", "diffusers"],
            "--vae diffusers: diffusers is not installed")
    assert model_bench.parse_args(["--vsr"]).vae == "oasis"  # our decoder needs no diffusers


def test_vae_and_model_reports_mark_a_dirty_tree_and_name_diffusers():
    conv = conv_bench.render({"env": DIRTY_ENV, "square_gemm_TFLOP/s": 900.0, "rows": [
        {"conv": "up0", "frames": 1, "TFLOP": 1.0, "TFLOP/s": {"ncdhw": 100.0, "gemm_same_shape": 500.0}}]}, 5)
    assert "commit abcdef0 (dirty)" in conv.splitlines()[0]
    timing = {"s": 1.0, "peak_GiB": 1.0, "first_s": 1.0}
    vae = vae_bench.render({"env": DIRTY_ENV, "gemm_TFLOP/s": 900.0, "decode": {"diffusers": timing},
                            "encode": {"diffusers": timing}, "convolutions": {}, "accuracy": {}, "weights_GiB": 0.2},
                           argparse.Namespace(latent=[9, 90, 160], reps=3))
    assert "commit abcdef0 (dirty)" in vae.splitlines()[0] and "diffusers 0.33.1" in vae
    model = model_bench.render({"env": DIRTY_ENV, "ceilings": {"matmul_TFLOPs": 900.0}, "vsr": {
        "vae": "diffusers", "stages": {}, "call_s": 1.0, "call_peak_GiB": 1.0}})
    assert "commit abcdef0 (dirty)" in model.splitlines()[0] and "diffusers' (0.33.1) VAE decoder" in model
    clean = dict(DIRTY_ENV, dirty=False)
    assert "(dirty)" not in model_bench.render({"env": clean, "ceilings": {"matmul_TFLOPs": 900.0}})


def test_vae_ab_report_has_a_row_per_call_and_setting():
    card = {"J_per_call": 388.4, "W": 690.0, "limit_W": 700.0}
    run = {"s": [0.57, 0.56], "card": [card, {"error": "NVML is not available"}], "median_s": 0.565, "min_s": 0.56,
           "max_abs_diff_vs_first": 0.0195, "finite": True}
    md = vae_ab.render({"env": DIRTY_ENV, "latent": [9, 90, 160], "rounds": 2, "calls": 1, "runs": {
        "decode": {"cudnn": dict(run, max_abs_diff_vs_first=0.0), "auto": run},
        "encode": {"auto": dict(run, finite=False)}}})
    lines = md.splitlines()
    assert "commit abcdef0 (dirty)" in lines[0] and "33 frames 720x1280" in md
    assert "| decode | auto | 0.5650 | 0.5600 | 388, - | 0.0195 |" in lines
    assert "| encode | auto | 0.5650 | 0.5600 | 388, - | 0.0195 (not finite) |" in lines
    assert sum(line.startswith("| decode |") for line in lines) == 2


# --------------------------------------------------------------------------------------
# train_bench
# --------------------------------------------------------------------------------------

import train_bench  # noqa: E402


@pytest.fixture
def dirty_tree(monkeypatch):
    """The reports' environment says the tree had uncommitted changes, whatever this checkout has."""
    monkeypatch.delenv("OASIS_DIRTY", raising=False)
    monkeypatch.setattr(attn_bench, "_dirty", lambda: True)


@pytest.mark.parametrize("argv,says", [
    (["--device", "gpu"], ["argument --device: invalid choice: 'gpu'"]),
    (["--steps", "0"], ["argument --steps: must be a positive integer, got '0'"]),
    (["--batches", "1", "0"], ["argument --batches: must be a positive integer, got '0'"]),
    (["--tiny", "--checkpoint-blocks", "3", "1"], ["--checkpoint-blocks: a number of blocks in 0..2", "got 3"]),
    (["--checkpoint-blocks=-1"], ["--checkpoint-blocks: a number of blocks in 0..2", "got -1"]),
    (["--profile"], ["--profile: profiles GPU kernels; needs --device cuda"]),
    (["--step-graph"], ["--step-graph needs --device cuda"]),
    (["--no-checkpointing", "--checkpoint-blocks", "1"], ["--no-checkpointing and --checkpoint-blocks"]),
])
def test_train_bench_checks_its_arguments(argv, says, capsys, no_cuda):
    refused(capsys, train_bench.main, ["--tiny", "--device", "cpu", *argv], *says)


def test_train_bench_out_and_cuda(capsys, no_cuda, a_file):
    refused(capsys, train_bench.main, ["--tiny", "--device", "cpu", "--out", a_file], f"--out {a_file}: is a file")
    refused(capsys, train_bench.main, ["--tiny"], "--device cuda: CUDA is not available here")


def test_train_bench_without_cuda_from_the_shell():
    """Its default --device cuda on a machine without CUDA: exit 2 and one line, nothing measured."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_bench.py"), "--steps", "1"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.count("\n") == 1 and "--device cuda: CUDA is not available here" in proc.stderr


def test_train_bench_cpu_report_claims_only_what_it_did(tmp_path, capsys, dirty_tree):
    assert train_bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--batches", "1", "--modes", "routed",
                             "--out", str(tmp_path)]) == 0
    md = (tmp_path / "train_bench.md").read_text()
    assert " (dirty)" in md.splitlines()[0]
    assert "17 frames 64x128" in md and "no autocast" in md and "No matmul rate measured" in md
    for claim in ("bf16 autocast", "320x640", "GEMM", "TFLOP/s."):
        assert claim not in md, claim


# --------------------------------------------------------------------------------------
# degrade_bench
# --------------------------------------------------------------------------------------

import degrade_bench  # noqa: E402


def test_degrade_bench_card_memory_counts_what_other_processes_add(monkeypatch):
    """CardMemory: the card's peak use through the block, less its use at the start and the main process's own
    growth (its allocator's peak reserve over the start's), is what the processes it cannot see (the workers)
    took; readings from a fake card: 10 GiB in use at the start, 16 at the peak, the main process +1."""
    gib = 1 << 30
    used = iter([10, 12, 16, 13] + [11] * 1000)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: ((80 - next(used)) * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * gib)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 3 * gib)
    card = degrade_bench.CardMemory("cuda", interval=0.001)
    with card:
        while card.peak < 16 * gib:  # the poller has read the peak
            time.sleep(0.001)
    assert (card.before, card.peak, card.main_growth) == (10 * gib, 16 * gib, gib)
    assert card.others == 5 * gib


@pytest.mark.parametrize("argv,says", [
    (["--workers=-1"], ["argument --workers: must be an integer >= 0, got '-1'"]),
    (["--device", "cpu", "--threads", "2", "x"], ["argument --threads: must be an integer >= 0, got 'x'"]),
    (["--clips", "0"], ["argument --clips: must be a positive integer, got '0'"]),
    (["--make-videos=-2"], ["argument --make-videos: must be an integer >= 0, got '-2'"]),
    (["--coders=-1"], ["argument --coders: must be an integer >= 0, got '-1'"]),
    (["--size", "16", "320", "640"], ["--size 16 320 640: clip frames must be 4k+1"]),
    (["--size", "17", "100", "640"], ["--size 17 100 640: clip height and width must be multiples of 32"]),
    (["--size", "17", "0", "640"], ["argument --size: must be a positive integer, got '0'"]),
    (["--videos", "no/such/folder"], ["--videos: no/such/folder: no such folder"]),
    (["--make-videos", "2", "--video-size", "10", "540", "960"],
     ["--video-size 10 540 960: smaller than one --size crop"]),
    (["--device", "gpu"], ["argument --device: invalid choice: 'gpu'"]),
    (["--matmul-load"], ["--matmul-load: the matmuls beside the rows need --device cuda"]),
    (["--in-workers"], ["--in-workers needs --device"]),
    (["--device", "cuda"], ["--device cuda: CUDA is not available here"]),
])
def test_degrade_bench_checks_its_arguments(argv, says, capsys, no_cuda):
    refused(capsys, degrade_bench.main, argv, *says)


def test_degrade_bench_refuses_unusable_folders(tmp_path, capsys, a_file):
    (tmp_path / "empty").mkdir()
    empty = tmp_path / "empty"
    refused(capsys, degrade_bench.main, ["--videos", str(empty)], f"--videos: {empty}: no videos")
    refused(capsys, degrade_bench.main, ["--make-videos", "1", "--videos", a_file], f"--videos {a_file}: is a file")
    refused(capsys, degrade_bench.main, ["--out", a_file], f"--out {a_file}: is a file, not a directory")


def test_degrade_bench_records_its_codec_libraries_and_a_dirty_tree(tmp_path, capsys, dirty_tree):
    assert degrade_bench.main(["--clips", "1", "--workers", "0", "--size", "5", "32", "64", "--jpeg", "pil",
                               "--out", str(tmp_path)]) == 0
    env = json.loads((tmp_path / "degrade_bench.json").read_text())["env"]
    assert env["av"] == attn_bench.library_version("av") != "not installed"
    assert env["Pillow"] == attn_bench.library_version("Pillow") != "not installed"
    md = (tmp_path / "degrade_bench.md").read_text().splitlines()
    assert " (dirty)" in md[0] and f"PyAV {env['av']}, Pillow {env['Pillow']}" in md[2]


# --------------------------------------------------------------------------------------
# dist_bench, rank_share_bench
# --------------------------------------------------------------------------------------

import dist_bench  # noqa: E402
import rank_share_bench  # noqa: E402


@pytest.mark.parametrize("argv,says", [
    (["--head-dim", "0"], ["argument --head-dim: must be a positive integer, got '0'"]),
    (["--mix", "0,0,0"], ["--mix: head counts must be >= 0 with at least one head, got [0, 0, 0]"]),
    (["--mix=-1,2,2"], ["--mix: head counts must be >= 0", "[-1, 2, 2]"]),
    (["--window", "2,3,3"], ["--window 2,3,3: window sizes must be odd"]),
    (["--grids", "4,0,6"], ["--grids 4,0,6: grid sizes must be positive"]),
    (["--train-batch", "0"], ["argument --train-batch: must be a positive integer, got '0'"]),
])
def test_dist_bench_checks_its_arguments(argv, says, capsys, no_cuda):
    refused(capsys, dist_bench.parse_args, ["--device", "cpu", *argv], *says)


def test_dist_bench_head_dim_defaults_only_when_not_given():
    assert dist_bench.parse_args(["--device", "cpu", "--tiny"]).head_dim == 16
    assert dist_bench.parse_args(["--device", "cpu", "--tiny", "--head-dim", "8"]).head_dim == 8


def test_dist_bench_says_cuda_is_missing_and_names_nccl(capsys, no_cuda):
    refused(capsys, dist_bench.parse_args, ["--device", "cuda"], "--device cuda: CUDA is not available here")
    args = dist_bench.parse_args(["--device", "cpu", "--gpus", "1", "--tiny"])
    env = dict(DIRTY_ENV, nccl="2.21.5", cuda="12.8")
    assert "NCCL 2.21.5" in dist_bench.render([], env, args)


@pytest.mark.parametrize("argv,says", [
    (["--warmup-ms=-1"], ["argument --warmup-ms: must be a number of milliseconds >= 0, got '-1'"]),
    (["--rep-ms", "0"], ["argument --rep-ms: must be a finite number of milliseconds > 0, got '0'"]),
    (["--rep-ms", "nan"], ["argument --rep-ms: must be a finite number of milliseconds > 0, got 'nan'"]),
    (["--dit-forward-ms", "inf"], ["argument --dit-forward-ms: must be a finite number", "got 'inf'"]),
    (["--dit-forward-ms", "0"], ["argument --dit-forward-ms: must be a finite number of milliseconds > 0, got '0'"]),
    (["--link-GBps", "inf"], ["--link-GBps must be a finite number > 0, got inf"]),
    (["--device", "cuda"], ["--device cuda: CUDA is not available here"]),
])
def test_rank_share_bench_checks_its_times(argv, says, capsys, no_cuda):
    refused(capsys, rank_share_bench.parse_args, argv, *says)


@pytest.mark.parametrize("script", ["rank_share_bench", "dist_bench"])
def test_cpu_capable_scripts_refuse_a_file_as_out(script, capsys, a_file):
    parse = {"rank_share_bench": rank_share_bench.parse_args, "dist_bench": dist_bench.parse_args}[script]
    refused(capsys, parse, ["--device", "cpu", "--out", a_file], f"--out {a_file}: is a file, not a directory")


def test_vae_bench_counts_convolutions_beside_float32_output_products():
    """``conv_flops`` counts a convolution's FLOPs (2 x output x Cin x kernel) in a call that also runs
    ``bmm(..., out_dtype=float32)``, the middle attention's scores, which torch's own bmm formula cannot count;
    the products are not convolutions and are left out. Meta tensors: no device needed."""
    x = torch.empty(1, 4, 3, 6, 5, dtype=torch.bfloat16, device="meta")
    w = torch.empty(8, 4, 3, 3, 3, dtype=torch.bfloat16, device="meta")
    a = torch.empty(2, 7, 16, dtype=torch.bfloat16, device="meta")

    def call():
        torch.nn.functional.conv3d(x, w, padding=1)
        torch.bmm(a, a.transpose(1, 2), out_dtype=torch.float32)

    assert vae_bench.conv_flops(call) == 2 * (8 * 3 * 6 * 5) * (4 * 27)


# --------------------------------------------------------------------------------------
# card_power: what the card did during a benchmark's timed calls
# --------------------------------------------------------------------------------------

import card_power  # noqa: E402


class _FakeNvml:
    """An NVML whose energy counter advances 350 mJ a read (two reads: 0.35 J over the context)."""

    def __init__(self, *_):
        self.mj = 1000

    def energy_mj(self):
        self.mj += 350
        return self.mj

    def sm_mhz(self):
        return 1600

    def watts(self):
        return 690.0

    def celsius(self):
        return 61

    def limit_watts(self):
        return 700.0


def test_card_meter_reports_joules_a_call_and_the_sampled_clock(monkeypatch):
    monkeypatch.setattr(card_power, "Nvml", _FakeNvml)
    with card_power.CardMeter(period=0.001) as meter:
        time.sleep(0.02)
    s = meter.summary(calls=5)
    assert s["J_per_call"] == pytest.approx(0.35 / 5) and s["limit_W"] == 700.0
    assert s["samples"] > 0 and s["sm_MHz"] == [1600, 1600, 1600] and s["C"] == [61, 61, 61]
    assert s["W"] == pytest.approx(0.35 / meter.seconds)
    line = card_power.describe(s)
    assert line.startswith("0.1 J a call") and "(limit 700)" in line and "SM 1600-1600 MHz (median 1600)" in line


def test_card_meter_without_nvml_says_why_and_measures_nothing(monkeypatch):
    def missing(*_):
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    monkeypatch.setattr(card_power, "Nvml", missing)
    with card_power.CardMeter() as meter:
        pass
    s = meter.summary(calls=3)
    assert s == {"error": "NVML unavailable: libnvidia-ml.so.1: cannot open shared object file"}
    assert card_power.describe(s) == s["error"]
    timing = {"s": 1.0, "peak_GiB": 1.0, "first_s": 1.0, "card": s}
    vae = vae_bench.render({"env": DIRTY_ENV, "gemm_TFLOP/s": 900.0, "decode": {"diffusers": timing},
                            "encode": {"diffusers": timing}, "convolutions": {}, "accuracy": {}, "weights_GiB": 0.2},
                           argparse.Namespace(latent=[9, 90, 160], reps=3))
    assert "- diffusers: NVML unavailable" in vae
