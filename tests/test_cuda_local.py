"""The CUDA kernels for the local heads (csrc/local_attention/, backend "cuda").

Without a GPU (CI): every kernel compiles with the machine's nvcc for sm_90a, with no register
spills, and the backend declines with its reasons. On a Hopper GPU: forward, LSE and gradients
against the float64 reference (the Triton tests' cases and rule), a seeded random sweep, the
paper's grids, determinism and outputs written only where asked.
"""

import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import oasis_kernels as ok
from oasis_kernels.backends import BACKENDS
from oasis_kernels.dispatch import BackendError
from oasis_kernels.kernels import cuda_local
from parity import check_backend, make_qkv

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CUDA = {"intra": "cuda", "window": "cuda"}
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture(scope="module")
def ptxas_report():
    """``-Xptxas -v`` of the kernels' translation unit, compiled for sm_90a (object file only)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    src = ROOT / "csrc" / "local_attention" / "local_attention.cu"
    proc = subprocess.run([nvcc, *cuda_local.NVCC_FLAGS, "-Xptxas", "-v", "-c", str(src), "-o", os.devnull],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = {}
    for name, body in re.findall(r"Compiling entry function '(\w+)' for 'sm_90a'\n(.*?)(?=ptxas info\s+: Compiling|\Z)",
                                 proc.stderr, flags=re.S):
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
        regs = re.search(r"Used (\d+) registers", body)
        report[name] = dict(spill_stores=int(spill[1]), spill_loads=int(spill[2]), registers=int(regs[1]))
    # ptxas's note that it serialised a function's wgmma (one at a time, each waited for), which it
    # prints apart from the entry's block
    for code, name in re.findall(r"\((C75\d\d)\) Potential Performance Loss: wgmma[^']*'(\w+)'", proc.stderr):
        report.setdefault(name, {})["wgmma_serialised"] = code
    return report


@pytest.mark.slow  # the fixture: ~18 s of nvcc on 2 cores
def test_every_kernel_compiles_for_sm90a(ptxas_report):
    # 2 dtypes x D 64, 128
    kinds = {"forward_wgmma_kernel": 4, "forward_tma_intra_kernel": 4, "forward_tma_window_kernel": 4,
             "dq_wgmma_kernel": 4, "dkdv_wgmma_kernel": 4, "delta_kernel": 4}
    for kind, count in kinds.items():
        found = [n for n in ptxas_report if kind in n]
        assert len(found) == count, f"{kind}: {found}"


@pytest.mark.slow  # the fixture: ~18 s of nvcc on 2 cores
def test_wgmma_is_not_serialised(ptxas_report):
    """The kernels' warpgroup MMAs stay asynchronous: ptxas serialises them when other instructions
    write a wgmma's inputs or read its accumulators inside a stage (C7513, C7514), which costs the
    overlap the kernel is written for."""
    serialised = {n: r["wgmma_serialised"] for n, r in ptxas_report.items() if "wgmma_serialised" in r}
    assert not serialised, serialised


@pytest.mark.slow  # the fixture: ~18 s of nvcc on 2 cores
def test_no_register_spills(ptxas_report):
    spilling = {n: r for n, r in ptxas_report.items() if r.get("spill_stores") or r.get("spill_loads")}
    assert not spilling, f"kernels spill registers: {spilling}"


@pytest.mark.slow  # ~11 s of nvcc and the check on 2 cores
def test_tile_geometry_on_the_cpu(tmp_path):
    """csrc/local_attention/geometry.cuh (host and device code) built for the CPU by nvcc and run:
    for random grids, windows, tile shapes and block widths, the programs' rows, the tokens each
    thread loads, the visibility bits and the warps' frame skips score every visible (query, key)
    pair exactly once (tests/cuda/geometry_check.cu)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    exe = tmp_path / "geometry_check"
    build = subprocess.run([nvcc, "-std=c++17", "-O2", "-I", str(ROOT / "csrc" / "local_attention"),
                            str(ROOT / "tests" / "cuda" / "geometry_check.cu"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    seed = random.randrange(2**31)
    run = subprocess.run([str(exe), "300", str(seed)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "geometry ok" in run.stdout, f"seed {seed}: {run.stdout[-3000:]}"


def test_wgmma_blocks_compile_and_match_a_matmul_on_hopper(tmp_path):
    """csrc/hopper/wgmma.cuh (descriptors of 128-byte-swizzled tiles, the SS and RS forms of
    m64n64k16, bf16 and fp16) built for sm_90a with no spills (tests/cuda/wgmma_check.cu); on a Hopper GPU the
    program checks each form against a CPU matmul and fails on a mismatch."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    exe = tmp_path / "wgmma_check"
    build = subprocess.run([nvcc, *cuda_local.NVCC_FLAGS, "-Xptxas", "-v", "-I", str(ROOT / "csrc" / "hopper"),
                            str(ROOT / "tests" / "cuda" / "wgmma_check.cu"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert not re.search(r"[1-9]\d* bytes spill (stores|loads)", build.stderr), build.stderr[-3000:]
    if not HOPPER:
        return
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "PASS" in run.stdout, run.stdout[-3000:]


def test_declines_with_reasons(device):
    plan = ok.RoutingPlan((2, 3, 5), ["w", "i"], (3, 3, 3))
    q = torch.randn(1, plan.num_tokens, 2, 96, dtype=torch.float32, device=device)
    reasons = BACKENDS["cuda"].why_not(ok.Mode.WINDOW, q, plan)
    if device == "cpu":
        assert reasons == ["needs a CUDA tensor, got device cpu"]
    else:
        assert any("float16 and bfloat16" in r for r in reasons) and any("head dim 64 or 128" in r for r in reasons)
    assert BACKENDS["cuda"].why_not(ok.Mode.GLOBAL, q, plan)[0].startswith("does not serve global heads")
    with pytest.raises(BackendError, match="cuda"):
        ok.routed_attention(q, q, q, plan, backend=LOCAL_CUDA)


def test_auto_never_picks_it_unmeasured():
    from oasis_kernels.backends import CUDA_BEFORE_TRITON, PRIORITY

    # nothing measured faster than Triton yet (docs/PERF.md entry 21): no rule, no place in the order
    assert all("cuda" not in names for names in PRIORITY.values()) and not CUDA_BEFORE_TRITON


def test_library_reason_without_cuda():
    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA here")
    loaded, why = cuda_local.library()
    assert not loaded and "without CUDA" in why


# --- on a Hopper GPU -------------------------------------------------------------------------

def _kernels_or_skip():
    if not HOPPER:
        pytest.skip("the CUDA local kernels are built for sm_90a (Hopper)")
    loaded, why = cuda_local.library()
    if not loaded:
        if os.environ.get("OASIS_EXPECT_EXTENSION") == "1":
            pytest.fail(f"the CUDA local kernels must load here: {why}")
        pytest.skip(why)


# (grid, window, modes, head_dim, dtype): awkward shapes first
CASES = [
    ((3, 7, 11), (3, 5, 5), "iwgw", 64, torch.bfloat16),
    ((3, 7, 11), (1, 3, 3), "ww", 128, torch.float16),
    ((3, 7, 11), (5, 7, 7), "wi", 128, torch.bfloat16),
    ((1, 1, 1), (3, 5, 5), "wi", 64, torch.float16),       # a single token
    ((1, 6, 9), (3, 5, 5), "iw", 64, torch.bfloat16),      # T=1
    ((2, 3, 5), (9, 9, 11), "w", 128, torch.bfloat16),     # window covers the grid
    ((2, 9, 13), (1, 1, 1), "wi", 64, torch.bfloat16),     # window of one token
    ((6, 5, 37), (3, 5, 5), "wiw", 128, torch.float16),    # T not a multiple of the tile's 4 frames
    ((3, 7, 11), (3, 5, 5), "ii", 64, torch.bfloat16),     # 77-token frames: a full block and a tail
    ((2, 4, 16), (3, 5, 5), "ii", 128, torch.float16),     # 64-token frames: full blocks only
    ((2, 3, 5), (3, 5, 5), "i", 128, torch.bfloat16),      # a frame shorter than one block
    ((5, 3, 40), (3, 13, 13), "wwi", 64, torch.bfloat16),  # a halo slice of several blocks
]


def _ids(case):
    grid, window, modes, d, dtype = case
    return f"{'x'.join(map(str, grid))}-w{''.join(map(str, window))}-{modes}-d{d}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernels_match_reference(case, device):
    _kernels_or_skip()
    grid, window, modes, d, dtype = case
    plan = ok.RoutingPlan(grid, list(modes), window)
    q, k, v = make_qkv((2, plan.num_tokens, plan.heads, d), dtype, device)
    check_backend(q, k, v, plan, LOCAL_CUDA)


@pytest.mark.parametrize("grid", [(5, 20, 40), (9, 45, 80)])
def test_paper_grids(grid, device):
    _kernels_or_skip()
    plan = ok.RoutingPlan(grid, ["w", "i", "w", "i"], (3, 5, 5))
    q, k, v = make_qkv((1, plan.num_tokens, plan.heads, 128), torch.bfloat16, device)
    check_backend(q, k, v, plan, LOCAL_CUDA)


@pytest.mark.parametrize("seed", range(16))
def test_random_sweep(seed, device):
    _kernels_or_skip()
    rng = random.Random(seed)
    grid = (rng.randint(1, 7), rng.randint(1, 30), rng.randint(1, 40))
    window = tuple(rng.choice([1, 3, 5, 7, 9]) for _ in range(3))
    modes = [rng.choice("wig") for _ in range(rng.randint(1, 6))]
    d = rng.choice([64, 128])
    dtype = rng.choice([torch.bfloat16, torch.float16])
    plan = ok.RoutingPlan(grid, modes, window)
    q, k, v = make_qkv((rng.randint(1, 2), plan.num_tokens, plan.heads, d), dtype, device)
    check_backend(q, k, v, plan, LOCAL_CUDA, what=f"seed={seed}")


def test_strided_heads_of_one_projection(device):
    """q/k/v as strided views of one fused projection, heads routed out of order, batch 2."""
    _kernels_or_skip()
    plan = ok.RoutingPlan((3, 5, 6), ["w", "g", "i", "w", "i"], (3, 3, 5))
    qkv = torch.randn(2, plan.num_tokens, 3, plan.heads, 64, dtype=torch.bfloat16, device=device)
    q, k, v = qkv.unbind(2)
    check_backend(q, k, v, plan, LOCAL_CUDA)


def test_backward_is_deterministic(device):
    _kernels_or_skip()
    plan = ok.RoutingPlan((5, 20, 40), ["w", "i", "w"], (3, 5, 5))
    q, k, v = make_qkv((1, plan.num_tokens, 3, 128), torch.bfloat16, device, requires_grad=True)
    dout = torch.randn_like(q)
    grads = []
    for _ in range(2):
        out = ok.routed_attention(q, k, v, plan, backend=LOCAL_CUDA)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_writes_only_its_heads(device):
    """Outputs poisoned with NaN: the ops write every element of their heads and nothing else."""
    _kernels_or_skip()
    grid, radii, n, heads = (3, 7, 11), (1, 2, 2), 231, 4
    q, k, v, dout = (torch.randn(2, n, heads, 64, dtype=torch.float16, device=device) for _ in range(4))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, heads, n), float("nan"), device=device)
    table = torch.tensor([3, 0, 2], dtype=torch.int32, device=device)  # window 3, 0; intra 2
    cuda_local.forward(q, k, v, out, lse, table, 2, grid, radii, 0.125)
    local = [0, 2, 3]
    assert not out[:, :, local].isnan().any() and not lse[:, local].isnan().any()
    assert out[:, :, 1].isnan().all() and lse[:, 1].isnan().all(), "the kernel wrote a head it was not given"
    dq, dk, dv = (torch.full_like(q, float("nan")) for _ in range(3))
    cuda_local.backward(dout, q, k, v, out, lse, dq, dk, dv, table, 2, grid, radii, 0.125)
    for g in (dq, dk, dv):
        assert not g[:, :, local].isnan().any() and g[:, :, 1].isnan().all()


def test_under_torch_compile(device):
    _kernels_or_skip()
    plan = ok.RoutingPlan((3, 8, 8), ["w", "g", "i"], (3, 5, 5))
    q, k, v = make_qkv((1, plan.num_tokens, 3, 64), torch.bfloat16, device)
    f = torch.compile(lambda a, b, c: ok.routed_attention(a, b, c, plan, backend=LOCAL_CUDA), fullgraph=True)
    torch.testing.assert_close(f(q, k, v), ok.routed_attention(q, k, v, plan, backend=LOCAL_CUDA), rtol=0, atol=0)


def test_bad_direct_calls_stay_in_bounds(device):
    """A head table entry outside the heads is skipped (nothing written, nothing read out of
    bounds); a grid whose product wraps around int64 is refused; the backend declines a batch x
    local heads beyond the launch grid's 65535 rows."""
    _kernels_or_skip()
    grid, n = (2, 3, 5), 30
    q, k, v = (torch.randn(1, n, 2, 64, dtype=torch.bfloat16, device=device) for _ in range(3))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((1, 2, n), float("nan"), device=device)
    table = torch.tensor([1, 7, -3], dtype=torch.int32, device=device)
    cuda_local.forward(q, k, v, out, lse, table, 1, grid, (1, 1, 1), 0.125)
    torch.cuda.synchronize()
    assert not out[:, :, 1].isnan().any() and out[:, :, 0].isnan().all()
    with pytest.raises(RuntimeError, match="out of range"):
        cuda_local.forward(q, k, v, out, lse, table, 1, (3, 6148914691236517206, 1), (0, 0, 0), 0.125)
    plan = ok.RoutingPlan((1, 1, 2), ["w"] * 12, (1, 1, 1))
    big = torch.randn(5462, 2, 12, 64, dtype=torch.bfloat16, device=device)
    assert any("65535" in r for r in BACKENDS["cuda"].why_not(ok.Mode.WINDOW, big, plan))


def test_local_heads_run_on_the_tma_kernels(device):
    """Intra and (3, 5, 5) window heads of tensors TMA can address run on the TMA kernels (the launcher falls
    back to the wgmma kernel silently otherwise, so the parity tests alone would not say which ran); a
    frame's last block reads zeros past its end, so NaN in the next frame's keys and values stays out of its
    rows."""
    _kernels_or_skip()
    from torch.profiler import ProfilerActivity, profile

    for window in ((1, 3, 3), (3, 5, 5)):  # slices of 36 positions (rows past them zeroed) and of 64
        plan = ok.RoutingPlan((3, 7, 11), ["i", "w", "i"], window)
        q, k, v = make_qkv((1, plan.num_tokens, plan.heads, 128), torch.bfloat16, device)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            clean = ok.routed_attention(q, k, v, plan, backend=LOCAL_CUDA)
            torch.cuda.synchronize()
        names = [e.key for e in prof.key_averages()]
        assert any("forward_tma_intra_kernel" in n for n in names), names
        assert any("forward_tma_window_kernel" in n for n in names), (window, names)
        check_backend(q, k, v, plan, LOCAL_CUDA, what=f"window={window}")
    hw = 7 * 11
    k2, v2 = k.clone(), v.clone()
    k2[:, hw:2 * hw], v2[:, hw:2 * hw] = float("nan"), float("nan")
    with torch.no_grad():
        poisoned = ok.routed_attention(q, k2, v2, plan, backend=LOCAL_CUDA)
    intra = [0, 2]  # the "i" heads
    assert torch.equal(poisoned[:, :hw, intra], clean[:, :hw, intra])
