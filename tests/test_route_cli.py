"""``oasis-route``: arguments checked before any work, one-line errors with exit code 2, help for
every option, the model factory found from the working directory."""

import argparse
import json
import sys

import pytest
import torch

from oasis_kernels.routing import LayerRouting, RoutingFile, load_routing
from oasis_kernels.routing.cli import build_parser, main
from oasis_kernels.plan import Mode
from toy_dit import HEADS, HEAD_DIM, LAYERS

MODULE = "cli_toy_model"
MODEL_SOURCE = '''
import torch
import oasis_kernels as ok
import toy_dit

BUILT = []


def build():
    BUILT.append(1)
    return toy_dit.build()


def build_routed():
    model = toy_dit.build()
    for blk in model.blocks:
        blk.self_attn.plan = ok.RoutingPlan(toy_dit.GRID, ["global", "intra", "window", "global"], (1, 3, 3))
    return model


def build_plain():  # no routed_attention anywhere
    return torch.nn.Linear(64, 64)


NOT_A_FUNCTION = 3
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding the model module and two latents, with neither it nor ''
    on sys.path: what a console script sees (its sys.path starts with its bin folder)."""
    (tmp_path / f"{MODULE}.py").write_text(MODEL_SOURCE)
    latents = tmp_path / "latents"
    latents.mkdir()
    for i in range(2):
        torch.save(torch.randn(1, 30, HEADS * HEAD_DIM), latents / f"v{i}.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield tmp_path
    sys.modules.pop(MODULE, None)
    sys.modules.pop("filemodel", None)


def run(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``oasis-route argv``."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def failed(capsys, *argv) -> str:
    """Run a command that must fail cleanly; its one stderr line (after a progress bar that
    was cleared: carriage returns, no newline)."""
    rc, _, err = run(capsys, *argv)
    line = err.split("\r")[-1]
    assert rc == 2 and err.count("\n") == 1 and line.startswith("oasis-route: error: "), (rc, err)
    return line.strip()


def calibrate(*extra, model=f"{MODULE}:build", inputs="latents"):
    return ["calibrate", "--model", model, "--inputs", inputs, "--window", "1,3,3", "--layers", "self_attn$",
            "--device", "cpu", "--backend", "reference", *extra]


def not_imported() -> bool:
    return MODULE not in sys.modules


def test_factory_module_found_in_the_working_directory(workdir, capsys):
    rc, out, err = run(capsys, *calibrate("--out", "r.json"))
    assert rc == 0, err
    assert out.startswith(f"r.json: {LAYERS} layers, 2 videos")
    assert load_routing(workdir / "r.json").num_layers == LAYERS
    # a file path works too, from anywhere
    (workdir / "sub").mkdir()
    (workdir / "sub" / "filemodel.py").write_text(MODEL_SOURCE)
    rc, _, err = run(capsys, *calibrate("--out", "r2.json", "--limit", "1", model="sub/filemodel.py:build"))
    assert rc == 0, err
    assert load_routing(workdir / "r2.json").videos == 1


def test_bad_numbers_fail_before_any_work(workdir, capsys):
    for flag, value, want in [("--rho", "1.5", "argument --rho: must be a number in [0, 1]"),
                              ("--rho", "x", "argument --rho: must be a number in [0, 1], got 'x'"),
                              ("--eps", "0", "argument --eps: must be a number in (0, 1), got '0'"),
                              ("--window", "2,3,3", "argument --window: must be three odd positive sizes"),
                              ("--window", "3,5", "argument --window"),
                              ("--query-stride", "0", "argument --query-stride: must be an integer >= 1"),
                              ("--limit", "-1", "argument --limit: must be an integer >= 0"),
                              ("--layers", "(", "argument --layers: not a regular expression"),
                              ("--backend", "cuda", "argument --backend: invalid choice: 'cuda'")]:
        assert want in failed(capsys, *calibrate(flag, value))
    assert "must be 'module:function' or 'file.py:function', got 'cli_toy_model'" in failed(
        capsys, *calibrate(model=MODULE))
    assert "required: --inputs" in failed(capsys, "calibrate", "--model", f"{MODULE}:build")
    assert "argument --rho: must be a number in [0, 1] (fraction of heads kept global), got '-0.1'" in failed(
        capsys, "assign", "r.json", "--rho", "-0.1", "--out", "x.json")
    assert "required: {calibrate,assign,agree,show}" in failed(capsys)
    assert not_imported()


def test_device_and_backend_fail_before_any_work(workdir, capsys, monkeypatch):
    argv = ["calibrate", "--model", f"{MODULE}:build", "--inputs", "latents"]
    if not torch.cuda.is_available():
        assert "--device cuda: CUDA is not available here" in failed(capsys, *argv, "--device", "cuda")
        # the default device is the CPU, and Triton's statistics need CUDA (or the interpreter)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert "--backend triton needs --device cuda (the device is cpu)" in failed(capsys, *argv, "--backend",
                                                                                    "triton")
    else:
        assert "this machine has" in failed(capsys, *argv, "--device", "cuda:99")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "--backend triton needs --device cuda" in failed(capsys, *argv, "--device", "cpu", "--backend", "triton")
    assert "'gpu' is not a torch device" in failed(capsys, *argv, "--device", "gpu")
    assert "only cuda and cpu" in failed(capsys, *argv, "--device", "meta")
    assert not_imported()


def test_inputs_and_out_fail_before_any_work(workdir, capsys):
    assert "--inputs missing: no such folder" in failed(capsys, *calibrate(inputs="missing"))
    assert "not a folder" in failed(capsys, *calibrate(inputs="latents/v0.pt"))
    (workdir / "empty").mkdir()
    (workdir / "empty" / ".DS_Store").write_text("")
    assert "--inputs empty: the folder holds no input files" in failed(capsys, *calibrate(inputs="empty"))
    assert "--out nowhere/r.json: the folder 'nowhere' does not exist" in failed(
        capsys, *calibrate("--out", "nowhere/r.json"))
    assert "--out latents: is a folder" in failed(capsys, *calibrate("--out", "latents"))
    assert "--out: give a file name such as routing.json" in failed(capsys, *calibrate("--out", ""))
    assert not_imported()


def test_model_errors(workdir, capsys):
    assert "--model nomodule:build: no module 'nomodule' in the working directory" in failed(
        capsys, *calibrate(model="nomodule:build"))
    assert "no such file 'missing.py'" in failed(capsys, *calibrate(model="missing.py:build"))
    (workdir / "broken_dep.py").write_text("import not_a_module_anywhere\n")
    try:
        assert "importing 'broken_dep' failed: No module named 'not_a_module_anywhere'" in failed(
            capsys, *calibrate(model="broken_dep:build"))
    finally:
        sys.modules.pop("broken_dep", None)
    assert f"module '{MODULE}' has no 'nothere'" in failed(capsys, *calibrate(model=f"{MODULE}:nothere"))
    assert "'NOT_A_FUNCTION' is a int, not a function" in failed(capsys, *calibrate(model=f"{MODULE}:NOT_A_FUNCTION"))
    # non-latent inputs need load_input: refused before the model is built
    (workdir / "latents" / "clip.mp4").write_bytes(b"\0")
    assert "clip.mp4 is not a .pt/.safetensors latent" in failed(capsys, *calibrate())
    assert sys.modules[MODULE].BUILT == []


def test_model_problems_found_on_the_first_video(workdir, capsys):
    assert "--layers 'nothing_matches' matches none of the model's" in failed(
        capsys, "calibrate", "--model", f"{MODULE}:build", "--inputs", "latents", "--layers", "nothing_matches")
    assert "the model already routes some heads" in failed(capsys, *calibrate(model=f"{MODULE}:build_routed"))
    line = failed(capsys, "calibrate", "--model", f"{MODULE}:build_plain", "--inputs", "latents", "--device", "cpu")
    assert "no attention calls were observed on v0.pt: the model must call oasis_kernels.routed_attention" in line
    (workdir / "latents" / "v0.pt").write_bytes(b"not a tensor file")
    assert "v0.pt: cannot read it as a .pt file" in failed(capsys, *calibrate())


def test_late_problems_fail_before_the_calibration(workdir, capsys):
    """A damaged latent after good ones fails before the model is made (it had failed after the ones before
    it were calibrated, the work lost); a latent of another size is the model's one line, not its
    traceback; an --out that cannot be opened fails before any work (a folder whose mode allows writing
    can still refuse: /proc)."""
    torch.save(torch.randn(1, 30, HEADS * HEAD_DIM), workdir / "latents" / "v2.pt")
    (workdir / "latents" / "zz.pt").write_bytes(b"not a tensor file")
    assert "zz.pt: cannot read it as a .pt file" in failed(capsys, *calibrate())
    assert sys.modules[MODULE].BUILT == []
    torch.save(torch.randn(1, 31, HEADS * HEAD_DIM), workdir / "latents" / "zz.pt")  # 31 tokens: not the grid's
    assert "zz.pt: the model refused it:" in failed(capsys, *calibrate())
    (workdir / "latents" / "zz.pt").unlink()
    assert "--out /proc/r.json:" in failed(capsys, *calibrate("--out", "/proc/r.json"))
    assert sys.modules[MODULE].BUILT == [1]  # the one run that reached the model: the latent of another size
    rc, _, _ = run(capsys, *calibrate("--out", "r.json"))
    assert rc == 0 and load_routing("r.json").num_layers > 0


def _routing(layers, heads) -> RoutingFile:
    modes = [Mode.GLOBAL, Mode.INTRA, Mode.WINDOW]
    return RoutingFile([LayerRouting(f"blocks.{i}", [modes[(i + h) % 3] for h in range(heads)],
                                     {"kl_intra": [1.0] * heads, "kl_window": [2.0] * heads}) for i in range(layers)],
                       0.4, (3, 5, 5), 1e-6, 1, 1, 1)


def test_routing_file_commands(workdir, capsys):
    _routing(2, 4).save("a.json")
    _routing(2, 4).save("same.json")
    _routing(3, 4).save("other.json")
    rc, out, _ = run(capsys, "agree", "a.json", "same.json")
    assert rc == 0 and float(out) == 1.0
    assert ("a.json and other.json: routing files route different models (2 layers of 4 heads vs 3 layers of 4 "
            "heads)") in failed(capsys, "agree", "a.json", "other.json")
    assert "nothere.json: no such routing file" in failed(capsys, "agree", "a.json", "nothere.json")
    assert "latents: is a folder" in failed(capsys, "show", "latents")
    (workdir / "junk.json").write_text("{")
    assert "junk.json: not an oasis routing file (not JSON" in failed(capsys, "show", "junk.json")
    (workdir / "list.json").write_text("[]")
    assert "list.json: not an oasis routing file (format='list'" in failed(capsys, "show", "list.json")
    data = json.loads((workdir / "a.json").read_text())
    del data["layers"][0]["modes"]
    (workdir / "damaged.json").write_text(json.dumps(data))
    assert "damaged.json: damaged oasis routing file (missing 'modes')" in failed(capsys, "show", "damaged.json")
    for layer in data["layers"]:
        layer["modes"], layer["stats"] = ["global"] * 4, {}
    (workdir / "nostats.json").write_text(json.dumps(data))
    assert "no kl_intra/kl_window statistics" in failed(capsys, "assign", "nostats.json", "--rho", "0.3",
                                                        "--out", "x.json")
    assert "--out nowhere/x.json: the folder 'nowhere' does not exist" in failed(
        capsys, "assign", "a.json", "--rho", "0.3", "--out", "nowhere/x.json")
    # files of one model only: the same layer names in order, the same window
    other_names = _routing(2, 4)
    other_names.layers[0].name = "other.0"
    other_names.save("renamed.json")
    assert "name their layers otherwise (1 of 2: 'blocks.0' against 'other.0' first)" in failed(
        capsys, "agree", "a.json", "renamed.json")
    wider = _routing(2, 4)
    wider.window = (1, 3, 3)
    wider.save("window.json")
    assert "route window heads of (3, 5, 5) and (1, 3, 3)" in failed(capsys, "agree", "a.json", "window.json")
    # settings and layers of the wrong kind: one line each, before any work
    good = json.loads((workdir / "a.json").read_text())
    for change, says in ((lambda d: d.update(rho="abc"), "rho must be a number >= 0.0 and <= 1.0, got 'abc'"),
                         (lambda d: d.update(rho=7), "rho must be a number"),
                         (lambda d: d.update(videos=-3), "videos must be an int >= 0"),
                         (lambda d: d.update(eps="x"), "eps must be a number > 0.0"),
                         (lambda d: d.update(query_stride=0), "query_stride must be an int >= 1"),
                         (lambda d: d.update(num_global=999), "num_global must be an int >= 0 and <= 8"),
                         (lambda d: d["layers"][1].update(name="blocks.0"), "layers named twice: ['blocks.0']"),
                         (lambda d: d["layers"][1].update(name=7), "a layer's name must be a string, got 7"),
                         (lambda d: d["layers"][1].update(modes="wwgg"), "modes must be a list"),
                         (lambda d: d["layers"][1]["modes"].append("global"),
                          "stats 'kl_intra' must be 5 numbers, one per head"),
                         (lambda d: d["layers"][0]["stats"].update(kl_intra=[None] * 4), "stats 'kl_intra' must be 4"),
                         (lambda d: d.update(layers=[]), "damaged oasis routing file (no layers)"),
                         (lambda d: [layer.update(modes=[], stats={}) for layer in d["layers"]],
                          "layer 'blocks.0' routes no heads")):
        data = json.loads(json.dumps(good))
        change(data)
        (workdir / "bad.json").write_text(json.dumps(data))
        assert says in failed(capsys, "show", "bad.json"), says
    rc, out, _ = run(capsys, "assign", "a.json", "--rho", "0.5", "--out", "b.json")
    assert rc == 0 and out == "b.json: rho=0.5, 4 global heads\n"
    rc, out, _ = run(capsys, "show", "b.json")
    modes = "".join(m.short for m in load_routing("b.json").layers[0].modes)
    assert rc == 0 and out.splitlines()[1].split() == ["blocks.0", modes]


def test_every_option_has_help_and_the_epilogue_a_worked_example(capsys):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"oasis-route {name} {action.dest}: no help"
    for argv in (["--help"], ["calibrate", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "worked example" in text and "oasis-route calibrate --model mymodel:build --inputs latents/" in text
        assert 'ok.RoutingPlan(grid, ["global"] * heads)' in text
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    text = capsys.readouterr().out
    assert "every head global and carries the real (T, H, W) grid" in " ".join(text.split())
