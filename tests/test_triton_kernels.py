"""The fused Triton kernels for local heads, against the float64 reference.

Without CUDA they run under TRITON_INTERPRET=1 (set by conftest) on small shapes; on a GPU
the same cases run compiled, plus the paper's grids and a seeded random sweep.
"""

import random

import pytest
import torch

import oasis_kernels as ok
from conftest import DEVICE
from parity import check_backend, make_qkv

LOCAL_TRITON = {"intra": "triton", "window": "triton"}
GPU = DEVICE == "cuda"
gpu_only = pytest.mark.skipif(not GPU, reason="needs CUDA (the interpreter covers the small cases)")
# seconds to tens of seconds each under the interpreter: left out of the default run, CI runs them
slow = pytest.mark.slow

# (grid, window, modes, head_dim, dtype): awkward shapes first
CASES = [
    ((2, 3, 5), (3, 5, 5), "wiw", 64, torch.float32),
    ((3, 7, 11), (3, 5, 5), "iwgw", 64, torch.bfloat16),
    ((3, 7, 11), (1, 3, 3), "ww", 128, torch.float16),
    ((3, 7, 11), (5, 7, 7), "wi", 128, torch.bfloat16),
    ((4, 6, 9), (3, 5, 5), "wi", 64, torch.float32),
    ((1, 1, 1), (3, 5, 5), "wi", 64, torch.float32),       # a single token
    ((1, 6, 9), (3, 5, 5), "iw", 64, torch.bfloat16),      # T=1
    ((2, 3, 5), (9, 9, 11), "w", 64, torch.float32),       # window covers the grid
    ((2, 3, 5), (3, 3, 3), "wi", 96, torch.float16),       # head dim not a power of two
    ((2, 9, 13), (1, 1, 1), "wi", 32, torch.bfloat16),     # window of one token
    # intra heads only (INTRA_ONLY: whole key blocks unmasked, the frame end masked)
    ((3, 7, 11), (3, 5, 5), "ii", 64, torch.bfloat16),     # 77-token frames: one full block and a tail
    ((2, 4, 16), (3, 5, 5), "ii", 64, torch.float32),      # 64-token frames: full blocks only
    ((2, 3, 5), (3, 5, 5), "i", 96, torch.float16),        # a frame shorter than one block, D padded
]


def _ids(case):
    grid, window, modes, d, dtype = case
    return f"{'x'.join(map(str, grid))}-w{''.join(map(str, window))}-{modes}-d{d}-{str(dtype)[6:]}"


def _params(cases):
    # cases of 200 tokens or more take 3-14 s each under the interpreter
    return [pytest.param(c, marks=slow) if c[0][0] * c[0][1] * c[0][2] >= 200 else c for c in cases]


@pytest.mark.parametrize("case", _params(CASES), ids=_ids)
def test_kernels_match_reference(case, device):
    grid, window, modes, d, dtype = case
    plan = ok.RoutingPlan(grid, list(modes), window)
    q, k, v = make_qkv((1, plan.num_tokens, plan.heads, d), dtype, device)
    check_backend(q, k, v, plan, LOCAL_TRITON)


@slow
@pytest.mark.parametrize("sliced", [True, False], ids=["sliced-walk", "general-walk"])
@pytest.mark.parametrize("grid,window", [((3, 7, 11), (3, 5, 5)), ((3, 6, 9), (1, 3, 3)), ((5, 9, 6), (3, 3, 5))])
def test_both_walks(grid, window, sliced, device, monkeypatch):
    """Each window walk of the kernels (sliced: one block per halo frame; general: packed codes),
    forced by restricting the configs, forward and all gradients."""
    from oasis_kernels.kernels import local_attention as la

    for tuned in (la._fwd, la._bwd):
        monkeypatch.setattr(tuned, "autotuner", None)  # launch the first fitting config, no autotuner
        monkeypatch.setattr(tuned, "manual", {})
        monkeypatch.setattr(tuned, "configs", [c for c in tuned.configs if c.kwargs["SLICED"] == sliced])
    plan = ok.RoutingPlan(grid, ["w", "i", "w"], window)
    q, k, v = make_qkv((2, plan.num_tokens, plan.heads, 64), torch.bfloat16, device)
    check_backend(q, k, v, plan, LOCAL_TRITON)
    # every tile kernel that ran (the delta kernel has no walk)
    chosen = [c for name, kernel in la.chosen_configs().items() if name != "bwd_delta" for c in kernel.values()]
    assert chosen and all(f"SLICED: {sliced}" in c for c in chosen), chosen


# 77-token frames, so the intra heads walk a full unmasked block (64 keys under the interpreter)
# and a tail, in a mixed launch as in an intra-only one
@pytest.mark.parametrize("grid,modes", [pytest.param((2, 7, 11), "wiw", marks=slow), ((2, 7, 11), "ii")],
                         ids=["mixed", "intra-only"])
@pytest.mark.parametrize("scale", [0.0, -0.2, 0.6], ids=["scale0", "negative", "large"])
def test_any_softmax_scale(scale, grid, modes, device):
    """Scale 0 (uniform attention) and negative scales: masked scores must stay at -inf (and
    the unmasked blocks of intra-only launches scale before the softmax)."""
    plan = ok.RoutingPlan(grid, list(modes), (3, 3, 3))
    q, k, v = make_qkv((1, plan.num_tokens, plan.heads, 32), torch.float32, device)
    check_backend(q, k, v, plan, LOCAL_TRITON, scale=scale)


@slow
def test_batch_and_strided_heads(device):
    """Batch 2, q/k/v as strided views of one fused projection; heads routed out of order."""
    plan = ok.RoutingPlan((3, 5, 6), ["w", "g", "i", "w", "i"], (3, 3, 5))
    qkv = torch.randn(2, plan.num_tokens, 3, plan.heads, 64, dtype=torch.bfloat16, device=device)
    q, k, v = qkv.unbind(2)
    check_backend(q, k, v, plan, "triton")


def test_non_contiguous_head_dim(device):
    plan = ok.RoutingPlan((2, 3, 5), ["w", "i"], (3, 3, 3))
    q, k, v = (torch.randn(1, 30, 2, 128, device=device, dtype=torch.float16)[..., ::2] for _ in range(3))
    check_backend(q, k, v, plan, LOCAL_TRITON)


@slow
def test_every_output_element_is_written(device):
    """Poison outputs with NaN, call the launchers directly, and find no NaN left in local heads
    (the forward; the backward's delta kernel and its one launch of dQ and dK/dV programs)."""
    from oasis_kernels.kernels.local_attention import local_attention_backward, local_attention_forward

    grid, radii = (3, 7, 11), (1, 2, 2)
    n, heads = 231, 4
    q, k, v, dout = (torch.randn(2, n, heads, 64, dtype=torch.float16, device=device) for _ in range(4))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, heads, n), float("nan"), device=device)
    table = torch.tensor([3, 0, 2], dtype=torch.int32, device=device)  # window 3, 0; intra 2
    local_attention_forward(q, k, v, out, lse, table, 2, grid, radii, 0.125)
    local = [0, 2, 3]
    assert not out[:, :, local].isnan().any() and not lse[:, local].isnan().any()
    assert out[:, :, 1].isnan().all(), "the kernel wrote a head it was not given"
    dq, dk, dv = (torch.full_like(q, float("nan")) for _ in range(3))
    local_attention_backward(dout, q, k, v, out, lse, dq, dk, dv, table, 2, grid, radii, 0.125)
    for g in (dq, dk, dv):
        assert not g[:, :, local].isnan().any() and g[:, :, 1].isnan().all()


# mixed launches (window and intra heads) and intra-only ones; 77-token frames: a full block and a tail
@slow
@pytest.mark.parametrize("grid,window,modes,d,dtype", [((3, 7, 11), (3, 5, 5), "wiw", 64, torch.bfloat16),
                                                      ((2, 7, 11), (3, 3, 3), "ii", 128, torch.float16)],
                         ids=["mixed-d64-bf16", "intra-only-d128-fp16"])
def test_backward_batch_two(grid, window, modes, d, dtype, device):
    """The backward (``_bwd_delta_kernel``, then one launch of dQ and dK/dV programs) of mixed and
    intra-only launches: forward and all gradients, batch 2."""
    plan = ok.RoutingPlan(grid, list(modes), window)
    q, k, v = make_qkv((2, plan.num_tokens, plan.heads, d), dtype, device)
    check_backend(q, k, v, plan, LOCAL_TRITON)


@gpu_only
@pytest.mark.parametrize("grid", [(5, 20, 40), (9, 45, 80)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paper_grids(grid, dtype, device):
    plan = ok.RoutingPlan(grid, ["w", "i", "w", "i"], (3, 5, 5))
    q, k, v = make_qkv((1, plan.num_tokens, plan.heads, 128), dtype, device)
    check_backend(q, k, v, plan, LOCAL_TRITON)


@gpu_only
@pytest.mark.parametrize("modes", ["wi", "ii"])
def test_fp32_rows_over_128_elements(modes, device):
    """fp32 at D=256 needs the one config whose blocks fit in shared memory (64-token tiles
    need up to 279 KB on sm_90; found by the intra-only sweep with autotuning off)."""
    plan = ok.RoutingPlan((3, 7, 11), list(modes), (3, 5, 5))
    q, k, v = make_qkv((1, plan.num_tokens, plan.heads, 256), torch.float32, device)
    check_backend(q, k, v, plan, LOCAL_TRITON)


@gpu_only
@pytest.mark.parametrize("seed", range(8))
def test_intra_only_launches(seed, device):
    """Launches of intra heads only (the unmasked full-block walk): frames that are and are not
    multiples of the tiles, single-frame grids, every head dim and dtype."""
    rng = random.Random(1000 + seed)
    grid = (rng.randint(1, 6), rng.choice([1, 4, 8, 20, 33]), rng.choice([1, 8, 16, 40, 57]))
    d = rng.choice([64, 96, 128, 256])
    dtype = rng.choice([torch.bfloat16, torch.float16, torch.float32])
    plan = ok.RoutingPlan(grid, ["i"] * rng.randint(1, 3), (3, 5, 5))
    q, k, v = make_qkv((rng.randint(1, 2), plan.num_tokens, plan.heads, d), dtype, device)
    check_backend(q, k, v, plan, LOCAL_TRITON, what=f"seed={seed}")


@gpu_only
@pytest.mark.parametrize("seed", range(16))
def test_random_sweep(seed, device):
    rng = random.Random(seed)
    grid = (rng.randint(1, 6), rng.randint(1, 30), rng.randint(1, 40))
    window = tuple(rng.choice([1, 3, 5, 7, 9]) for _ in range(3))
    modes = [rng.choice("wig") for _ in range(rng.randint(1, 6))]
    d = rng.choice([32, 64, 96, 128, 256])
    dtype = rng.choice([torch.bfloat16, torch.float16, torch.float32])
    plan = ok.RoutingPlan(grid, modes, window)
    q, k, v = make_qkv((rng.randint(1, 2), plan.num_tokens, plan.heads, d), dtype, device)
    check_backend(q, k, v, plan, LOCAL_TRITON, what=f"seed={seed}")


@gpu_only
def test_backward_is_deterministic(device):
    plan = ok.RoutingPlan((5, 20, 40), ["w", "i", "w"], (3, 5, 5))
    q, k, v = make_qkv((1, plan.num_tokens, 3, 128), torch.bfloat16, device, requires_grad=True)
    dout = torch.randn_like(q)
    grads = []
    for _ in range(2):
        out = ok.routed_attention(q, k, v, plan, backend="triton")
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@gpu_only
def test_direct_launches_follow_strides_and_alignment(monkeypatch):
    """After the first launch of a key, launches skip Triton's launch path (``Tuned.direct``);
    a new layout or a misaligned base pointer must get the kernel Triton would choose for it.
    The launcher is called directly: the API would copy an unaligned view first."""
    from oasis_kernels.backends.triton_local import HeadTable
    from oasis_kernels.kernels import launching
    from oasis_kernels.kernels import local_attention as la

    plan = ok.RoutingPlan((3, 7, 11), ["w", "i", "g"], (3, 5, 5))
    n = plan.num_tokens * plan.heads * 64
    shape = (1, plan.num_tokens, plan.heads, 64)
    base = [torch.randn(n + 8, dtype=torch.bfloat16, device=DEVICE) for _ in range(3)]
    layouts = {
        "contiguous": lambda x: x[:n].view(shape),
        "offset by one element": lambda x: x[1:1 + n].view(shape),
        "heads-major": lambda x: x[:n].view(1, plan.heads, plan.num_tokens, 64).transpose(1, 2),
    }
    direct = []
    la._fwd.direct.clear()  # first launches of this test's keys go through Triton
    real = launching.launch_compiled
    monkeypatch.setattr(launching, "launch_compiled", lambda *a: direct.append(1) or real(*a))
    heads = HeadTable.of(plan, [(ok.Mode.WINDOW, (0,)), (ok.Mode.INTRA, (1,))], DEVICE)
    table, n_window = heads.on(DEVICE), heads.n_window
    scale = 64 ** -0.5
    for round_ in range(2):  # the second round hits the direct path for every layout
        for name, make in layouts.items():
            q, k, v = (make(x) for x in base)
            out = torch.zeros(shape, dtype=q.dtype, device=DEVICE)
            lse = torch.zeros(1, plan.heads, plan.num_tokens, device=DEVICE)
            before = len(direct)
            la.local_attention_forward(q, k, v, out, lse, table, n_window, plan.grid, heads.radii, scale)
            assert (len(direct) > before) == (round_ == 1), f"{name}: round {round_} launched directly: {len(direct) > before}"
            want = ok.routed_attention(*(x.contiguous() for x in (q, k, v)), plan, scale=scale, backend=LOCAL_TRITON)
            torch.testing.assert_close(out[:, :, :2], want[:, :, :2], rtol=0, atol=2e-2, msg=lambda m: f"{name}: {m}")
    # and through the API, with gradients
    for name, make in layouts.items():
        check_backend(*(make(x) for x in base), plan, LOCAL_TRITON)


@gpu_only
def test_side_stream_overlap_gives_identical_results(monkeypatch):
    """Global heads on a high-priority side stream, local heads on the caller's (RoutedCall._run):
    the same numbers as running everything in order, forward and gradients, also on a
    non-default caller stream and inside a CUDA graph."""
    from oasis_kernels import call as call_module
    from oasis_kernels import streams

    plan = ok.RoutingPlan((3, 7, 11), ["g", "i", "w", "g", "w"], (3, 5, 5))
    q, k, v = make_qkv((2, plan.num_tokens, plan.heads, 64), torch.bfloat16, DEVICE, requires_grad=True)
    dout = torch.randn_like(q)

    def run(q, k, v):
        out = ok.routed_attention(q, k, v, plan, backend=LOCAL_TRITON)
        # detached: a live autograd graph would tie the leaves' AccumulateGrad to old streams
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))

    calls = []
    real_side = streams.side_stream
    monkeypatch.setattr(streams, "side_stream", lambda device: calls.append(device) or real_side(device))
    with ok.use_settings(overlap=False):
        serial = run(q, k, v)
    assert not calls
    with ok.use_settings(overlap_min_flops=0):  # a small layer would stay on one stream
        overlapped = run(q, k, v)
    assert len(calls) == 2  # forward and backward forked
    # the rest forks too (restored when the test ends)
    monkeypatch.setattr(call_module.config, "_current", ok.settings().replace(overlap_min_flops=0))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        on_stream = run(q, k, v)
        # CUDA graph, PyTorch's recipe: leaves made, warmed up and captured on one side stream
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        for _ in range(2):
            run(*leaves)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        captured = run(*leaves)
    graph.replay()  # same inputs: the replay must reproduce the eager numbers
    torch.cuda.synchronize()
    local = list(plan.heads_of("intra") + plan.heads_of("window"))
    for other in (overlapped, on_stream, captured):
        for a, b in zip(serial, other):
            # the Triton kernels are deterministic; cuDNN's dQ of the global heads may not be
            assert torch.equal(a[:, :, local], b[:, :, local]), (a.float() - b.float()).abs().max()
            torch.testing.assert_close(a, b)
