"""The eager C++ replay (oasis_kernels.fastpath, csrc/eager_routed.cpp) against the Python path.

On CPU: the C++ source compiles with the machine's nvcc against the installed torch's headers,
and without the extension every call takes the Python path. On the device: replays give the
Python path's results (the same kernels in the same order: forward bitwise, gradients to
cuDNN's non-determinism) and pass the fp64 parity rule; calls it cannot replay (CUDA-graph
capture, unaligned pointers, other backends) fall back.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import oasis_kernels as ok
from oasis_kernels import fastpath
from parity import check_backend, make_qkv

ROOT = Path(__file__).resolve().parents[1]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
built = pytest.mark.skipif(fastpath._C is None, reason=f"needs the C++ extension: {fastpath.UNAVAILABLE}")


def _torch_flags(tmp_path) -> list[str]:
    """Include dirs and ABI define for compiling against the installed torch's headers."""
    from torch.utils.cpp_extension import include_paths

    # CPU wheels of torch ship the CUDA headers but not this generated one (CUDA builds do)
    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [f"-I{tmp_path}", *(f"-I{p}" for p in include_paths()),
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


@pytest.mark.slow  # ~50 s of nvcc on a 2-core CPU
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_csrc_compiles_with_nvcc(tmp_path):
    assert sorted((ROOT / "csrc").glob("*.c*")), "csrc/ holds no sources"
    for source in sorted((ROOT / "csrc").glob("*.cpp")):
        cmd = ["nvcc", "-std=c++20", "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")),
               *_torch_flags(tmp_path), f"-I{sysconfig.get_paths()['include']}", "-DTORCH_EXTENSION_NAME=_C",
               "-Xcompiler", "-fPIC,-w"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
        assert (tmp_path / (source.stem + ".o")).stat().st_size > 0
    for source in sorted((ROOT / "csrc").glob("*.cu")):  # plain CUDA: the device code too
        obj = tmp_path / (source.stem + "_cu.o")
        cmd = ["nvcc", "-std=c++17", "-c", str(source), "-o", str(obj), "-gencode=arch=compute_90,code=sm_90"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
        assert obj.stat().st_size > 0


def _cudnn_frontend_paths():
    spec = importlib.util.spec_from_file_location("cudnn_frontend_paths", ROOT / "csrc" / "cudnn_frontend_paths.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_direct_cudnn_path_compiles_where_its_headers_are(tmp_path):
    """csrc/cudnn_sdpa.cpp's frontend branch (the one GPU builds take), with setup.py's flags,
    where the frontend/cuDNN/NVRTC headers are found (pip install nvidia-cudnn-frontend, or
    CUDNN_FRONTEND_INCLUDE); test_csrc_compiles_with_nvcc covers the branch built without them."""
    paths = _cudnn_frontend_paths()
    dirs, missing = paths.include_dirs()
    if missing:
        pytest.skip(f"direct cuDNN path not buildable here: {missing}")
    obj = tmp_path / "cudnn_sdpa.o"
    cmd = ["nvcc", "-std=c++20", "-c", str(ROOT / "csrc" / "cudnn_sdpa.cpp"), "-o", str(obj),
           *(f"-I{d}" for d in dirs), *_torch_flags(tmp_path), *paths.DEFINES,
           "-Xcompiler", "-fPIC,-w,-fvisibility=hidden"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    # the frontend's dynamic loading needs its user to define this handle (an undefined one
    # failed the extension's import on the device)
    symbols = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
    assert any(line.split()[-1:] == ["cudnn_frontend::cudnn_dlhandle"] and " B " in line
               for line in symbols.splitlines()), "cudnn_frontend::cudnn_dlhandle is not defined"


def test_without_the_extension_calls_take_the_python_path(monkeypatch, device):
    monkeypatch.setattr(fastpath, "_C", None)
    plan = ok.RoutingPlan.from_counts((2, 3, 5), 1, 1, 1, (1, 3, 3))
    q, k, v = make_qkv((1, plan.num_tokens, 3, 16), torch.float32, device)
    assert fastpath.forward(ok.prepare(q, plan, scale=0.25), q, k, v) is None
    out = ok.routed_attention(q, k, v, plan, backend="reference")
    assert torch.isfinite(out).all()


class _FakeCompiled:
    """What fastpath reads of a Triton CompiledKernel."""

    def __init__(self, signature, num_ctas=1, scratch=0):
        self.src = SimpleNamespace(signature=signature)
        self.run = SimpleNamespace(global_scratch_size=scratch, profile_scratch_size=0)
        self.metadata = SimpleNamespace(num_warps=4, shared=1024, num_ctas=num_ctas, launch_cooperative_grid=False,
                                        launch_pdl=False)
        self.function = 1234


def _launch(arguments, signature, **kw):
    from oasis_kernels.kernels.launching import Launch
    return Launch(_FakeCompiled(signature, **kw), (7, 3, 1), tuple(arguments))


def test_launch_spec_packs_parameters_in_signature_order_without_constexprs():
    q, o = torch.zeros(4), torch.zeros(4)
    arguments = [("Q", q), ("O", o), ("sqb", 96), ("T", 1), ("qk_scale", 0.25), ("D", 64), ("BLOCK_D", 64)]
    signature = {"Q": "*bf16", "O": "*bf16", "sqb": "i32", "T": "i32", "qk_scale": "fp32", "D": "constexpr",
                 "BLOCK_D": "constexpr"}
    spec = fastpath._launch_spec(_launch(arguments, signature), {"Q": q, "O": o})
    assert spec[:7] == (1234, (7, 3, 1), 128, 1024, 1, False, False)
    assert spec[7] == [(0, fastpath.ROLE_NAMES.index("Q"), 0.0), (0, fastpath.ROLE_NAMES.index("OUT"), 0.0),
                       (1, 96, 0.0), (1, 1, 0.0), (3, 0, 0.25)]


@pytest.mark.parametrize("case", ["copy passed", "unknown tensor", "unknown type", "scratch", "cluster"])
def test_launch_spec_declines_what_it_cannot_replay(case):
    q = torch.zeros(4)
    arguments, signature, kw, checks = [("Q", q), ("n", 3)], {"Q": "*fp16", "n": "i32"}, {}, {"Q": q}
    if case == "copy passed":
        checks = {"Q": torch.zeros(4)}
    elif case == "unknown tensor":
        arguments, signature = [("X", q)], {"X": "*fp16"}
    elif case == "unknown type":
        signature = {"Q": "*fp16", "n": "u1"}
    elif case == "scratch":
        kw = {"scratch": 64}
    else:
        kw = {"num_ctas": 2}
    assert fastpath._launch_spec(_launch(arguments, signature, **kw), checks) is None
    assert fastpath._launch_spec(None, {}) is None


def test_recording_collects_launches_of_its_thread_only():
    from oasis_kernels.kernels import launching as la

    kernel = SimpleNamespace(arg_names=["Q", "n", "BLOCK"])
    hit = (_FakeCompiled({"Q": "*fp16", "n": "i32", "BLOCK": "constexpr"}), (2, 1, 1), ["BLOCK"], {"BLOCK": 64})
    la._record(kernel, hit, (torch.zeros(1), 5), {})  # outside a recording: ignored
    with la.recording() as launches:
        la._record(kernel, hit, (torch.zeros(1), 5), {})
        la._record(kernel, None, (), {})  # a launch through Triton's own path
    assert len(launches) == 2 and launches[1] is None
    assert [(n, t, v) for n, t, v in launches[0].parameters() if n != "Q"] == [("n", "i32", 5)]
    assert launches[0].grid == (2, 1, 1)


@pytest.mark.skipif(os.environ.get("OASIS_EXPECT_EXTENSION") != "1",
                    reason="set OASIS_EXPECT_EXTENSION=1 where the extension must be there (scripts/device_tests.sh)")
def test_the_extension_is_built_and_matches():
    # an extension missing, failing to load, or built from other sources (its roles differ) is
    # otherwise only a silent fallback to the Python path
    assert fastpath._C is not None, fastpath.UNAVAILABLE
    assert tuple(fastpath._C.ROLES) == fastpath.ROLE_NAMES


def _replays(plan, shape, dtype, backend="auto", offset=0):
    """Outputs and gradients of the Python path and of the third call (a replay), same inputs."""
    base = [torch.randn(shape[0] * shape[1] * shape[2] * shape[3] + offset, device="cuda", dtype=dtype)
            for _ in range(3)]
    q, k, v = (b[offset:].view(shape).requires_grad_() for b in base)
    do = torch.randn(shape, device="cuda", dtype=dtype)

    def step():
        o = ok.routed_attention(q, k, v, plan, backend=backend)
        return (o, *torch.autograd.grad(o, (q, k, v), do))

    with ok.use_settings(eager_replay=False):
        python = step()
    step(), step()
    return python, step()


def _replayed(plan):
    """The prepared calls of ``plan`` that have a C++ replay, as (forward, backward) pairs."""
    from oasis_kernels import call as call_module

    return [(c.replay_forward, c.replay_backward) for c in call_module._CALLS.values()
            if c.plan == plan and c.replay_forward]


@gpu
@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid,counts,d", [((5, 20, 40), (5, 4, 3), 128), ((3, 7, 11), (2, 1, 1), 64),
                                           ((1, 9, 13), (1, 2, 1), 128)])
def test_replay_matches_the_python_path(grid, counts, d, dtype):
    from oasis_kernels import call as call_module

    call_module._CALLS.clear()
    plan = ok.RoutingPlan.from_counts(grid, *counts, (3, 5, 5))
    python, replay = _replays(plan, (2, plan.num_tokens, sum(counts), d), dtype)
    (forward, backward), = _replayed(plan)
    assert backward and forward.has_backward()  # the third call ran the C++ node's own replay
    torch.testing.assert_close(replay[0], python[0], rtol=0, atol=0)  # same kernels, same order
    for name, r, p in zip(("dq", "dk", "dv"), replay[1:], python[1:]):
        torch.testing.assert_close(r, p, msg=lambda m, name=name: f"{name}: {m}")  # cuDNN's dQ accumulates atomically


@gpu
@built
def test_replay_follows_the_settings_of_its_call():
    """A call prepared with ``cudnn_direct`` off replays without the direct cuDNN path and with
    ``overlap`` off on one stream: the same numbers, and each setting keys its own call."""
    from oasis_kernels import call as call_module

    plan = ok.RoutingPlan.from_counts((3, 7, 11), 2, 1, 1, (3, 5, 5))
    with ok.use_settings(cudnn_direct=False, overlap=False):
        python, replay = _replays(plan, (2, plan.num_tokens, 4, 64), torch.bfloat16)
    torch.testing.assert_close(replay[0], python[0], rtol=0, atol=0)
    for name, r, p in zip(("dq", "dk", "dv"), replay[1:], python[1:]):
        torch.testing.assert_close(r, p, msg=lambda m, name=name: f"{name}: {m}")
    made = [c for c in call_module._CALLS.values() if c.plan == plan and c.replay_forward]
    assert made and all(not c.settings.cudnn_direct and not c.forks(replayed=True) for c in made)


@gpu
@built
def test_replay_serves_strided_global_heads_and_local_only_plans():
    for modes in ("gigwgi", "iiww"):
        plan = ok.RoutingPlan((3, 8, 8), list(modes), (3, 5, 5))
        python, replay = _replays(plan, (1, plan.num_tokens, len(modes), 64), torch.bfloat16)
        for r, p in zip(replay, python):
            torch.testing.assert_close(r, p)
        assert len(_replayed(plan)) == 1, modes


@gpu
@built
def test_double_backward_through_the_cpp_node_is_an_error():
    """As the Python path's once_differentiable: create_graph=True gives first-order gradients
    (equal to the Python path's); differentiating through them raises instead of being wrong."""
    plan = ok.RoutingPlan.from_counts((3, 7, 11), 2, 1, 1, (3, 5, 5))
    q, k, v = make_qkv((1, plan.num_tokens, 4, 64), torch.bfloat16, "cuda", requires_grad=True)
    do = torch.randn_like(q)
    for _ in range(2):
        o = ok.routed_attention(q, k, v, plan)
        want = torch.autograd.grad(o, (q, k, v), do)
    o = ok.routed_attention(q, k, v, plan)
    assert "RoutedFunction" in o.grad_fn.name()  # the C++ node
    dout = do.clone().requires_grad_()
    got = torch.autograd.grad(o, (q, k, v), dout, create_graph=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        got[0].float().sum().backward()  # e.g. a gradient penalty in the loss


@gpu
@built
def test_unaligned_inputs_fall_back_and_stay_correct():
    plan = ok.RoutingPlan.from_counts((3, 7, 11), 2, 1, 1, (3, 5, 5))
    q, k, v = make_qkv((1, plan.num_tokens, 4, 64), torch.bfloat16, "cuda")
    ok.routed_attention(q, k, v, plan)  # prepares the aligned signature
    ok.routed_attention(q, k, v, plan)
    python, replay = _replays(plan, (1, plan.num_tokens, 4, 64), torch.bfloat16, offset=4)  # 8-byte offset
    for r, p in zip(replay, python):
        torch.testing.assert_close(r, p)


@gpu
@built
@pytest.mark.parametrize("grid,counts", [((5, 20, 40), (5, 4, 3)), ((3, 7, 11), (1, 2, 1))])
def test_replays_pass_the_parity_rule(grid, counts):
    plan = ok.RoutingPlan.from_counts(grid, *counts, (3, 5, 5))
    q, k, v = make_qkv((1, plan.num_tokens, sum(counts), 128), torch.bfloat16, "cuda")
    for attempt in range(3):  # the first prepares, the later ones replay
        check_backend(q, k, v, plan, "auto", what=f"call {attempt}")


@gpu
@built
def test_capture_declines_and_the_graph_replays_correctly():
    plan = ok.RoutingPlan.from_counts((3, 7, 11), 2, 1, 1, (3, 5, 5))
    q, k, v = make_qkv((1, plan.num_tokens, 4, 64), torch.bfloat16, "cuda")
    want = ok.routed_attention(q, k, v, plan)
    ok.routed_attention(q, k, v, plan)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        out = ok.routed_attention(q, k, v, plan)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=0, atol=0)



def _copy_cases(device):
    """(src, dst) pairs of the shapes the dense backends store, plus ones the fused kernel hands
    back to ``copy_``: a fifth pair (it takes four), a last dimension that is not contiguous."""
    big = torch.zeros(2, 60, 12, 64, device=device, dtype=torch.bfloat16)
    lse = torch.zeros(2, 12, 60, device=device)
    pairs = [(torch.randn(2, 60, 5, 64, device=device, dtype=torch.bfloat16), big[:, :, 2:7]),
             (torch.randn(2, 5, 60, device=device).unsqueeze(-1), lse[:, 2:7].unsqueeze(-1)),
             (torch.randn(6, 20, 3, 64, device=device, dtype=torch.bfloat16),
              big[:, :, 8:11].view(6, 20, 3, 64)),
             (torch.randn(2, 3, 3, 20, device=device).transpose(1, 2), lse[:, 8:11].view(2, 3, 3, 20)),
             (torch.randn(2, 60, 1, 64, device=device, dtype=torch.bfloat16), big[:, :, 11:12])]
    odd = torch.zeros(2, 60, 1, 64, device=device, dtype=torch.bfloat16)
    pairs.append((torch.randn(2, 60, 1, 128, device=device, dtype=torch.bfloat16)[..., ::2], odd))
    return pairs


def _narrow_cases(device):
    """Pairs whose rows the fused kernel moves in 8-, 4- and 2-byte vectors (rows of 36 bf16,
    18 bf16, and odd element offsets)."""
    wide = torch.zeros(1, 40, 6, 36, device=device, dtype=torch.bfloat16)
    odd = torch.zeros(1, 40, 7, 19, device=device, dtype=torch.bfloat16)
    return [(torch.randn(1, 40, 2, 36, device=device, dtype=torch.bfloat16), wide[:, :, 1:3]),
            (torch.randn(1, 40, 2, 18, device=device, dtype=torch.bfloat16), wide[:, :, 4:6, 2:20]),
            (torch.randn(1, 40, 3, 19, device=device, dtype=torch.bfloat16), odd[:, :, 3:6])]


def _check_copies(pairs):
    for i, (src, dst) in enumerate(pairs):
        assert torch.equal(dst, src), f"pair {i}: max diff {(dst.float() - src.float()).abs().max().item():.3e}"


def test_copy_pairs_copies_every_pair_without_the_extension():
    from oasis_kernels.kernels.row_copies import copy_pairs

    pairs = _copy_cases("cpu") + _narrow_cases("cpu")
    copy_pairs(pairs)
    _check_copies(pairs)


@gpu
@built
def test_copy_pairs_fused_copies_every_pair():
    from oasis_kernels.kernels import row_copies

    assert row_copies.FUSED, "the extension is built but has no copy_pairs (built from older sources?)"
    for pairs in (_copy_cases("cuda"), _narrow_cases("cuda")):
        fastpath._C.copy_pairs(pairs)
        torch.cuda.synchronize()
        _check_copies(pairs)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
