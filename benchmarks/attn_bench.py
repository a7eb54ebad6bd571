#!/usr/bin/env python
"""Routed attention against everything a user could run instead, and against the hardware.

    python benchmarks/attn_bench.py                      # S, A, B presets, fwd and fwd+bwd
    python benchmarks/attn_bench.py --shapes A --pass fwd --mix 5,4,3
    python benchmarks/attn_bench.py --grid 9,45,80 --routing routing.json --layer 3

Every row is timed the same way in one process: ``triton.testing.do_bench`` median after
warm-up, rotating among input sets larger than L2 together. Ceilings (device-to-device copy
bandwidth, a large bf16 matmul) are measured in the same run. FLOPs count only unmasked
query-key pairs (4*D per pair forward, 2.5x that backward). Each row's floor is the larger of
its FLOPs over the matmul ceiling and its bytes (q, k, v read and o written once; backward:
q, k, v, o, dO read and dq, dk, dv written once) over the copy bandwidth.

``--graphs S`` also times every row of the named shapes as CUDA-graph replays (the row run
once per input set, captured once): GPU time without host launch overhead, for all rows alike.

Rows of this package are checked against the chunked reference before they are timed; a
failing row is reported and not timed; the exit code is then 1.

Without CUDA (or with ``--device cpu``) the rows the CPU can run are checked and timed on
scaled-down presets, honouring the other flags; warm wall-clock medians, the first call shown
apart (``CPU_NOTE`` below, also in ``--help``). CPU times are no GPU figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))

import oasis_kernels as ok  # noqa: E402
from oasis_kernels.masks import mask_for  # noqa: E402

SHAPES = {"S": (5, 20, 40), "A": (9, 45, 80), "B": (27, 45, 80)}
#: the presets on the CPU: H and W divided by 5, T by 3 (S keeps 2 of its 5 frames), so that every
#: row runs in well under a second on a laptop while frames, rows and windows keep their roles
CPU_SHAPES = {"S": (2, 4, 8), "A": (3, 9, 16), "B": (9, 9, 16)}
CPU_NOTE = """\
without CUDA (or with --device cpu) the same rows that can run on the CPU are checked and timed
(ours, and PyTorch's SDPA for the global and intra heads) on scaled-down presets:
S (5,20,40) -> (2,4,8), A (9,45,80) -> (3,9,16), B (27,45,80) -> (9,9,16); --grid is used as given.
Every other flag is honoured; --graphs and the FlexAttention rows need CUDA and are refused.
Times are wall-clock medians of warm calls (the first call, with its dispatch decisions and
allocations, is shown apart as "first ms"). Nothing is written without --out. CPU times say
nothing about GPU performance: GPU figures need CUDA.
"""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
L2_ROTATION_BYTES = 256 << 20  # rotate inputs until the sets together exceed any L2 by far


# --------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    group: str                       # routed | global | intra | window | floor
    make: object                     # make(q, k, v) -> callable returning out ([B, N, h, D] or [B, h, N, D])
    heads: list[int]                 # which heads of the inputs the row computes
    plan: ok.RoutingPlan             # what the row computes, for FLOPs, bytes and checking
    ours: bool = False
    context: object = contextlib.nullcontext  # entered around every timed call (fwd, or fwd+bwd)
    setup_s: float = 0.0             # mask build time etc., reported apart from the timing
    graphable: bool = True           # False: the row makes its own CUDA graphs (no --graphs capture of it)
    results: dict = field(default_factory=dict)


def _sdpa_row(name, group, backend, heads, plan, frame_batched=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # "cpu": no forcing, PyTorch's own choice (its CPU flash kernel)
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
          "efficient": SDPBackend.EFFICIENT_ATTENTION, "cpu": None}[backend]
    t = plan.grid[0]

    def make(q, k, v):
        sel = [x[:, :, heads[0]:heads[-1] + 1] for x in (q, k, v)]
        leaves = None
        if len(heads) < q.shape[2]:
            # own tensors for a head subset: PyTorch's cuDNN backward hit an illegal memory
            # access on head slices of wider tensors (H200, cuDNN 9.19); copied outside timing
            sel = leaves = [x.detach().contiguous().requires_grad_(x.requires_grad) for x in sel]
        if frame_batched:
            sel = [x.reshape(x.shape[0] * t, x.shape[1] // t, *x.shape[2:]) for x in sel]
        qh, kh, vh = (x.transpose(1, 2) for x in sel)

        def run():
            with sdpa_kernel([be]) if be is not None else contextlib.nullcontext():
                return F.scaled_dot_product_attention(qh, kh, vh)
        return run, leaves

    return Row(name, group, make, heads, plan)


def _ours_row(name, group, plan, heads, backend, context=contextlib.nullcontext, compile_mode=None):
    """Our routed attention on ``heads``; with ``compile_mode``, under ``torch.compile`` with that
    mode ("reduce-overhead": CUDA graphs made and replayed by torch.compile, what a user does
    when a layer is host-bound)."""
    sub = ok.RoutingPlan(plan.grid, [plan.modes[h] for h in heads], plan.window)
    contiguous = heads == list(range(heads[0], heads[-1] + 1))
    call = functools.partial(ok.routed_attention, plan=sub, backend=backend)
    if compile_mode:
        call = torch.compile(call, mode=compile_mode, fullgraph=True, dynamic=False)

    def make(q, k, v):
        sel = [x[:, :, heads[0]:heads[-1] + 1] if contiguous else x[:, :, heads] for x in (q, k, v)]
        return lambda: call(*sel)

    return Row(name, group, make, heads, sub, ours=True, context=context, graphable=compile_mode is None)


def _flex_mask_mod(plan: ok.RoutingPlan, heads, device):
    t_, h_, w_ = plan.grid
    hw = h_ * w_
    rt, rh, rw = plan.radii
    modes = torch.tensor([int(plan.modes[h]) for h in heads], device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        qt, kt = q_idx // hw, kv_idx // hw
        qh, kh = (q_idx // w_) % h_, (kv_idx // w_) % h_
        qw, kw = q_idx % w_, kv_idx % w_
        m = modes[h]
        window = ((qt - kt).abs() <= rt) & ((qh - kh).abs() <= rh) & ((qw - kw).abs() <= rw)
        return (m == 0) | ((m == 1) & (qt == kt)) | ((m == 2) & window)

    return mask_mod


def _flex_row(name, group, plan, heads, device, dense=False):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    sub = ok.RoutingPlan(plan.grid, [plan.modes[h] for h in heads], plan.window)
    setup = 0.0
    block_mask = None
    if not dense:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        block_mask = create_block_mask(_flex_mask_mod(plan, heads, device), B=None, H=len(heads),
                                       Q_LEN=plan.num_tokens, KV_LEN=plan.num_tokens, device=device, _compile=True)
        torch.cuda.synchronize()
        setup = time.perf_counter() - t0

    def make(q, k, v):
        qh, kh, vh = (x[:, :, heads[0]:heads[-1] + 1].transpose(1, 2) for x in (q, k, v))
        return lambda: flex(qh, kh, vh, block_mask=block_mask)

    row = Row(name, group, make, heads, sub, setup_s=setup)
    return row


def build_rows(plan: ok.RoutingPlan, args, device) -> list[Row]:
    """All rows for one shape. ``plan`` is the routed layer (heads grouped by mode)."""
    n_heads = plan.heads
    all_heads = list(range(n_heads))
    g_heads = list(plan.heads_of("global"))
    rows: list[Row] = []
    want = set(args.backends)

    def on(name):
        return "all" in want or name in want

    def group(name):  # FlexAttention rows compile and build masks when made: skip unwanted ones first
        return "all" in args.groups or name in args.groups

    cuda = device.type == "cuda"
    # routed layer
    if on("ours"):
        rows.append(_ours_row("routed, oasis auto", "routed", plan, all_heads, "auto"))
        if cuda:
            rows.append(_ours_row("routed, oasis auto, one stream (no overlap)", "routed", plan, all_heads, "auto",
                                  context=ok.single_stream))
            rows.append(_ours_row("routed, oasis triton (all local heads)", "routed", plan, all_heads, "triton"))
            if plan.heads_of("window"):  # the candidate for auto's CUDA_BEFORE_TRITON rule, in the layer itself
                rows.append(_ours_row("routed, oasis auto, window heads on cuda", "routed", plan, all_heads,
                                      {"window": "cuda"}))
            if plan.num_tokens <= 8192:  # host-bound sizes, where CUDA graphs pay
                rows.append(_ours_row("routed, oasis auto, torch.compile reduce-overhead", "routed", plan, all_heads,
                                      "auto", compile_mode="reduce-overhead"))
        if not cuda or plan.num_tokens <= 8192:
            rows.append(_ours_row("routed, oasis reference", "routed", plan, all_heads, "reference"))
    if cuda and (on("flex") or on("flex-routed")) and group("routed"):
        rows.append(_flex_row("routed, FlexAttention per-head block mask", "routed", plan, all_heads, device))
    if g_heads and on("sdpa"):
        sub = ok.RoutingPlan(plan.grid, ["global"] * len(g_heads), plan.window)
        kind = "cuDNN" if cuda else "CPU"
        rows.append(_sdpa_row(f"{len(g_heads)} global heads alone, SDPA {kind} (floor for routed)", "floor",
                              "cudnn" if cuda else "cpu", g_heads, sub))
    # all heads global
    gplan = ok.RoutingPlan(plan.grid, ["global"] * n_heads, plan.window)
    if on("sdpa"):
        for be in ("cudnn", "flash", "efficient") if cuda else ("cpu",):
            rows.append(_sdpa_row(f"{n_heads} global heads, SDPA {be}", "global", be, all_heads, gplan))
    if cuda and on("flex") and group("global"):
        rows.append(_flex_row(f"{n_heads} global heads, FlexAttention", "global", gplan, all_heads, device, dense=True))
    if on("ours"):
        rows.append(_ours_row(f"{n_heads} global heads, oasis auto", "global", gplan, all_heads, "auto"))
    # single patterns
    iplan = ok.RoutingPlan(plan.grid, ["intra"] * n_heads, plan.window)
    wplan = ok.RoutingPlan(plan.grid, ["window"] * n_heads, plan.window)
    if on("sdpa"):
        rows.append(_sdpa_row(f"{n_heads} intra heads, SDPA {'cuDNN' if cuda else 'CPU'} on (B*T, H*W)", "intra",
                              "cudnn" if cuda else "cpu", all_heads, iplan, frame_batched=True))
    if on("ours"):
        rows.append(_ours_row(f"{n_heads} intra heads, oasis auto", "intra", iplan, all_heads, "auto"))
        if cuda:  # the local kernels by name: Triton's, and csrc/'s (a row with an error where they cannot run)
            for be in ("triton", "cuda"):
                rows.append(_ours_row(f"{n_heads} intra heads, oasis {be}", "intra", iplan, all_heads, be))
            for be in ("triton", "cuda"):
                rows.append(_ours_row(f"{n_heads} window heads, oasis {be}", "window", wplan, all_heads, be))
        else:
            rows.append(_ours_row(f"{n_heads} window heads, oasis auto", "window", wplan, all_heads, "auto"))
    if cuda and on("flex") and group("intra"):
        rows.append(_flex_row(f"{n_heads} intra heads, FlexAttention block mask", "intra", iplan, all_heads, device))
    if cuda and on("flex") and group("window"):
        rows.append(_flex_row(f"{n_heads} window heads, FlexAttention block mask", "window", wplan, all_heads, device))
    return [r for r in rows if group(r.group)]


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------

def measure_ceilings(device) -> dict:
    import triton.testing

    n = 1 << 30  # 1 GiB
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t_copy = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    t_mm = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": 2 * n / t_copy / 1e6, "matmul_TFLOPs": 2 * 8192**3 / t_mm / 1e9,
            "copy_ms": t_copy, "matmul_ms": t_mm}


def cpu_time_ms(fn, warmup_ms: float, rep_ms: float, min_reps: int = 3, max_reps: int = 1000) -> dict:
    """Wall time of warm calls of ``fn`` on the CPU: the first call (dispatch decisions,
    allocations, lazy imports) and warm-up calls for ``warmup_ms`` (at least one) are not
    timed; then ``fn`` runs until ``rep_ms`` have passed and at least ``min_reps`` times.
    ``{"ms": median, "first_ms": the first call, "reps": timed calls}``."""
    t0 = time.perf_counter()
    fn()
    first = 1e3 * (time.perf_counter() - t0)
    start = time.perf_counter()
    fn()
    while 1e3 * (time.perf_counter() - start) < warmup_ms:
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or 1e3 * (time.perf_counter() - start) < rep_ms):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    mid = len(times) // 2
    median = times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])
    return {"ms": median, "first_ms": first, "reps": len(times)}


def visible_pairs(plan: ok.RoutingPlan) -> int:
    return sum(mask_for(m, plan.grid, plan.window).visible_pairs() for m in plan.modes)


def row_costs(row: Row, batch: int, head_dim: int, elt: int, pass_: str) -> tuple[float, float]:
    """(FLOPs, floor bytes) of one call of the row."""
    fwd_flops = 4.0 * visible_pairs(row.plan) * head_dim * batch
    tensor = batch * row.plan.num_tokens * len(row.heads) * head_dim * elt
    if pass_ == "fwd":
        return fwd_flops, 4.0 * tensor
    return 3.5 * fwd_flops, 12.0 * tensor


def _runner(row: Row, q, k, v):
    """``(run, inputs to differentiate)``: make() returns run, or (run, leaves) when the row
    differentiates its own copies of q, k, v."""
    made = row.make(q, k, v)
    run, leaves = made if isinstance(made, tuple) else (made, None)
    return run, tuple(leaves) if leaves else (q, k, v)


def _callable(row: Row, sets, pass_):
    """A no-argument function that runs the row once on the next input set."""
    runners = [_runner(row, q, k, v) for q, k, v, _ in sets]
    if pass_ == "fwd":
        cycle = itertools.cycle(runners)

        def fwd():
            run, _ = next(cycle)
            with torch.no_grad(), row.context():
                return run()
        return fwd

    # a random output gradient per set, shaped and strided like the row's output (rows return
    # [B, N, h, D], [B, h, N, D] or frame-batched views); drawn on the CPU, since a failed graph
    # capture leaves the CUDA generator unusable for the rest of the process
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        grads = []
        for run, _ in runners:
            out = run()
            grads.append(torch.empty_like(out).copy_(torch.randn(out.shape, dtype=out.dtype, generator=gen)))
    cycle = itertools.cycle([(run, inputs, g) for (run, inputs), g in zip(runners, grads)])

    def fwdbwd():
        run, inputs, do = next(cycle)
        with row.context():
            torch.autograd.grad(run(), inputs, do)
    return fwdbwd


def capture_graph(fn, calls=1, warmup=3, side=None) -> "torch.cuda.CUDAGraph":
    """``calls`` calls of ``fn`` captured in one CUDA graph, after ``warmup`` calls on the side
    stream ``side`` (a new one if None) that the capture then uses: PyTorch's recipe, which the
    first uses of autograd leaves need (see ``_graph_ms``)."""
    side = side or torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for _ in range(calls):
            fn()
    return graph


def _graph_ms(row: Row, sets, pass_, args) -> float:
    """GPU time of one call of the row without the host: the row run once per input set,
    captured in one CUDA graph and replayed. PyTorch's recipe for capturing autograd: the
    leaves are made, warmed up and captured on one side stream (leaves used on another stream
    before tie their AccumulateGrad nodes to it, and the capture fails)."""
    import triton.testing

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        own = [tuple(x.detach().clone().requires_grad_() for x in s[:3]) + (None,) for s in sets]
        fn = _callable(row, own, pass_)
    graph = capture_graph(fn, calls=len(own), warmup=2 * len(own), side=side)
    return triton.testing.do_bench(graph.replay, warmup=args.warmup_ms, rep=args.rep_ms,
                                   return_mode="median") / len(own)


def check_row(row: Row, q, k, v, reference) -> tuple[bool, float]:
    run, _ = _runner(row, q, k, v)
    with torch.no_grad(), row.context():
        out = run()
    ref = reference[:, :, row.heads]
    err = (out.float() - ref.float()).abs().max().item()
    tol = 1e-3 if q.dtype == torch.float32 else 3e-2
    return bool(math.isfinite(err) and err <= tol * max(1.0, ref.abs().max().item())), err


def bench_shape(name, plan, args, device, dtype, ceilings):
    """Check and time every row for one shape. On CUDA: ``do_bench`` medians and the floor
    against ``ceilings``; on the CPU (``ceilings`` None): warm wall-clock medians
    (:func:`cpu_time_ms`), no floor."""
    cuda = device.type == "cuda"
    if cuda:
        import triton.testing

    b, d, n = args.batch, args.head_dim, plan.num_tokens
    elt = torch.finfo(dtype).bits // 8
    per_set = 3 * b * n * plan.heads * d * elt
    # the CPU has no L2 to defeat at these sizes: two sets (rows still alternate between them)
    n_sets = max(2, min(8, math.ceil(L2_ROTATION_BYTES / per_set))) if cuda else 2
    sets = []
    for _ in range(n_sets):
        q, k, v = (torch.randn(b, n, plan.heads, d, dtype=dtype, device=device) for _ in range(3))
        sets.append((q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), None))
    q0, k0, v0, _ = sets[0]
    with torch.no_grad():
        reference = ok.routed_attention(q0.detach().float(), k0.detach().float(), v0.detach().float(),
                                        plan, backend="reference")
    ref_by_plan = {}
    rows = build_rows(plan, args, device)
    passes = ["fwd", "fwdbwd"] if args.pass_ == "both" else [args.pass_]
    if name in args.graphs:
        passes += _graph_passes(passes)
    for row in rows:
        status = "ok"
        if row.ours:
            ref = reference
            if row.plan.modes != tuple(plan.modes[h] for h in row.heads):
                key = row.plan
                if key not in ref_by_plan:
                    with torch.no_grad():
                        ref_by_plan[key] = ok.routed_attention(
                            q0.detach().float(), k0.detach().float(), v0.detach().float(),
                            ok.RoutingPlan(plan.grid, [row.plan.modes[0]] * plan.heads, plan.window),
                            backend="reference")
                ref = ref_by_plan[key]
            good, err = check_row(row, q0.detach(), k0.detach(), v0.detach(), ref)
            row.results["max_abs_err"] = err
            if not good:
                status = f"FAILED check (max abs err {err:.3e})"
        row.results["status"] = status
        for p in passes:
            base_pass, graph = p.split(" ")[0], p.endswith(" graph")
            flops, bytes_ = row_costs(row, b, d, elt, base_pass)
            entry = {"flops": flops, "floor_bytes": bytes_}
            if status == "ok":
                try:
                    if graph and not row.graphable:
                        raise NotImplementedError("the row makes its own CUDA graphs")
                    if graph:
                        torch.cuda.synchronize()
                        ms = _graph_ms(row, sets, base_pass, args)
                    elif not cuda:
                        timed = cpu_time_ms(_callable(row, sets, base_pass), args.warmup_ms, args.rep_ms)
                        ms = timed.pop("ms")
                        entry.update(timed)
                    else:
                        fn = _callable(row, sets, base_pass)
                        if not row.graphable:  # torch.compile's CUDA graphs: compile and record before timing
                            for _ in range(3 * len(sets)):
                                fn()
                        ms = triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
                except Exception as exc:  # a baseline that cannot run here (e.g. a backend missing)
                    entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    print(f"  [{name}] {row.name}: {p}: {entry['error']}", flush=True)
                    row.results[p] = entry
                    continue
                entry.update(ms=ms, tflops=flops / ms / 1e9)
                if ceilings:
                    t_compute = flops / (ceilings["matmul_TFLOPs"] * 1e9)
                    t_memory = bytes_ / (ceilings["copy_GBps"] * 1e6)
                    entry.update(
                        pct_matmul=100 * t_compute / ms, floor_ms=max(t_compute, t_memory),
                        bound="compute" if t_compute >= t_memory else "memory",
                        pct_floor=100 * max(t_compute, t_memory) / ms,
                    )
            row.results[p] = entry
        print(f"  [{name}] {row.name}: " + ", ".join(
            f"{p} {row.results[p].get('ms', float('nan')):.3f} ms" for p in passes) + f" ({status})", flush=True)
    # speedups against FlexAttention's routed row and the global-heads floor
    for p in passes:
        ref_rows = {r.group: r for r in rows if "Flex" in r.name}
        floor = next((r for r in rows if r.group == "floor"), None)
        for r in rows:
            e = r.results.get(p, {})
            if "ms" not in e:
                continue
            flex = ref_rows.get(r.group)
            if flex is not None and "ms" in flex.results.get(p, {}):
                e["vs_flex"] = flex.results[p]["ms"] / e["ms"]
            if r.group == "routed" and floor is not None and "ms" in floor.results.get(p, {}):
                e["vs_global_floor"] = e["ms"] / floor.results[p]["ms"]
    del sets
    if cuda:
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------

def cpu_name() -> str:
    """The host CPU's model name (platform.processor() is empty on most Linux hosts)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device, libraries=()) -> dict:
    """Where and with what a run measured; ``libraries``: names of the libraries it compares against or
    goes through (distributions, e.g. "diffusers", "av", "Pillow"; "nccl": PyTorch's NCCL), each
    recorded under its name (see :func:`library_version`)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # the CPU path runs without Triton
        triton_version = "not installed"

    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "commit": os.environ.get("OASIS_COMMIT") or _git("rev-parse", "HEAD"),
        "dirty": os.environ.get("OASIS_DIRTY") or _dirty(),
        "oasis_kernels": ok.__version__,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sms=props.multi_processor_count, gpu_mem_GiB=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), driver=_driver())
        env["global_stores"] = _global_stores()
        env["local_backward"] = _local_backward()
    else:
        env.update(cpu=cpu_name(), threads=torch.get_num_threads())
    env.update({name: library_version(name) for name in libraries})
    return env


def library_version(name: str) -> str:
    """The installed version of the distribution ``name``, or "not installed"; "nccl": the NCCL version
    PyTorch runs with ("no CUDA" without CUDA)."""
    if name == "nccl":
        if not torch.cuda.is_available():
            return "no CUDA"
        try:
            version = torch.cuda.nccl.version()
        except Exception:  # a build without NCCL
            return "unknown"
        return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _commit(env: dict, digits: int = 12) -> str:
    """The run's commit as the reports name it: ``digits`` hex digits, "(dirty)" after them when the
    tree had uncommitted changes (the numbers may then not be the commit's)."""
    return f"{env['commit'][:digits]}{' (dirty)' if env['dirty'] is True else ''}"


def _local_backward() -> str:
    """Which local-heads backward this build runs (an older checkout run by scripts/ab_bench.sh
    may have the dQ-then-dK/dV one, chosen by its CONCURRENT_BWD flag)."""
    from oasis_kernels.kernels import local_attention as la
    if getattr(la, "CONCURRENT_BWD", True):
        return "delta kernel, then dQ and dK/dV in one launch"
    return "dQ (writes delta), then dK/dV"


def _global_stores() -> str:
    """How the cuDNN global heads' results reach the routed tensors in this build (an older
    checkout run by scripts/ab_bench.sh may lack the modules)."""
    try:
        from oasis_kernels.kernels import cudnn_direct
        available = cudnn_direct.available() if hasattr(cudnn_direct, "available") else cudnn_direct.AVAILABLE
        if available:
            return "written in place by cuDNN (direct path, in the eager C++ replay too)"
        direct = f"no direct path ({cudnn_direct.last_decline()}); "
    except ImportError:
        direct = ""
    try:
        from oasis_kernels.kernels import row_copies
        return direct + ("fused copy kernel" if row_copies.FUSED else "copy_ per tensor")
    except (ImportError, AttributeError):
        return direct + "unknown"


def _triton_configs() -> dict:
    try:
        from oasis_kernels.kernels.local_attention import chosen_configs
        return chosen_configs()
    except Exception as exc:
        return {"error": str(exc)}


def _dirty():
    """True/False from git; "unknown" where there is no repository (the device machine's copy)."""
    status = _git("status", "--porcelain")
    return "unknown" if status == "unknown" else status != ""


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout
        return out.strip().splitlines()[0]
    except Exception:
        return "unknown"


def table(results, passes, cpu=False) -> list[str]:
    """Rows of the report; ``cpu``: warm and first-call times and GFLOP/s (no floor, no Flex)."""
    head = ["shape", "row"]
    for p in passes:
        head += [f"{p} ms", f"{p} first ms", f"{p} GFLOP/s"] if cpu else \
            [f"{p} ms", f"{p} TFLOP/s", f"{p} %floor", f"{p} vs flex"]
    head += ["err", "setup s"]
    lines = [head]
    for shape, rows in results.items():
        for r in rows:
            cells = [shape, r.name]
            for p in passes:
                e = r.results.get(p, {})
                if cpu:
                    gflops = e["tflops"] * 1e3 if "tflops" in e else None
                    cells += [_f(e.get("ms"), 3), _f(e.get("first_ms"), 1), _f(gflops, 1)]
                    continue
                cells += [_f(e.get("ms"), 3), _f(e.get("tflops"), 1), _f(e.get("pct_floor"), 1),
                          _f(e.get("vs_flex"), 2, "x")]
            cells += [_f(r.results.get("max_abs_err"), 1, fmt="e"), _f(r.setup_s or None, 1)]
            lines.append(cells)
    return lines


def _f(x, nd, suffix="", fmt="f"):
    if x is None:
        return "-"
    return f"{x:.{nd}{fmt}}{suffix}"


def render_text(lines) -> str:
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(lines[0]))]
    out = []
    for j, r in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_markdown(lines, env, ceilings, args) -> str:
    md = [f"# attn_bench: {env.get('gpu', 'cpu')}, {args.dtype}, heads={args.heads}, D={args.head_dim}, "
          f"batch={args.batch}, mix={args.mix_text}, window={tuple(args.window)}", ""]
    md.append(f"torch {env['torch']}, triton {env['triton']}, cuDNN {env.get('cudnn')}, CUDA {env.get('cuda')}, "
              f"driver {env.get('driver')}, commit `{env['commit'][:12]}`{' (dirty)' if env['dirty'] is True else ''}, "
              f"{env['date']}.")
    if env.get("global_stores"):
        md.append(f"Global heads' results: {env['global_stores']}.")
    if env.get("local_backward"):
        md.append(f"Local heads' backward: {env['local_backward']}.")
    if ceilings:
        md.append(f"Ceilings measured in this run: copy {ceilings['copy_GBps']:.0f} GB/s (read+write), "
                  f"bf16 matmul {ceilings['matmul_TFLOPs']:.0f} TFLOP/s.")
    if "gpu" in env:
        md.append("Times are medians in ms; %floor = the row's floor (max of FLOPs/matmul ceiling, "
                  "bytes/copy bandwidth) over its time; vs flex = FlexAttention's time for the same rows over "
                  "this one.")
    else:
        md.append(f"CPU ({env.get('cpu')}, {env.get('threads')} threads), scaled-down shapes: times are wall-clock "
                  f"medians of warm calls in ms, the first call apart. Not GPU figures.")
    md.append("")
    md.append("| " + " | ".join(lines[0]) + " |")
    md.append("|" + "---|" * len(lines[0]))
    for r in lines[1:]:
        md.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(md) + "\n"


def plot(results, passes, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(passes), len(results), figsize=(6 * len(results), 0.45 * 22 * len(passes) + 1),
                             squeeze=False)
    for i, p in enumerate(passes):
        for j, (shape, rows) in enumerate(results.items()):
            ax = axes[i][j]
            rs = [r for r in rows if "ms" in r.results.get(p, {})]
            if not rs:  # e.g. a graph pass that only one shape ran: log axes need data
                ax.set_axis_off()
                continue
            names = [r.name for r in rs]
            ms = [r.results[p]["ms"] for r in rs]
            colors = ["tab:blue" if r.ours else ("tab:gray" if r.group == "floor" else "tab:orange") for r in rs]
            ax.barh(range(len(rs)), ms, color=colors)
            ax.set_yticks(range(len(rs)), names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xscale("log")
            ax.set_xlabel("ms (log)")
            ax.set_title(f"{shape} {p}")
    fig.suptitle(title + "   (blue: oasis-kernels, orange: alternatives, gray: floor)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """A bad command line ends with one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _ints(text: str, what: str, count: int | None = None) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if count is not None and len(values) != count:
        raise argparse.ArgumentTypeError(f"{what}: expected {count} comma-separated integers, got {text!r}")
    return values


def _triple(text: str, what: str, normalize) -> tuple[int, int, int]:
    """A grid or window ``T,H,W`` checked by ``normalize`` (``ok.normalize_grid`` or ``ok.normalize_window``)."""
    values = _ints(text, what, 3)
    try:
        return normalize(values)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{what} {text}: {exc}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _non_negative_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number of milliseconds >= 0, got {text!r}")
    return value


def _positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number of milliseconds > 0, got {text!r}")
    return value


def _names(text: str, what: str, known, kind: str = "name(s)") -> list[str]:
    """A comma list of names from ``known`` (``what`` and ``kind`` word the error)."""
    names = [x for x in text.split(",") if x]
    unknown = [x for x in names if x not in known]
    if unknown or not names:
        given = f"unknown {kind} {unknown}" if unknown else "none given"
        raise argparse.ArgumentTypeError(f"{what}: {given}; choose from {', '.join(known)}")
    return names


def _check_out_dir(p: argparse.ArgumentParser, out) -> None:
    """``--out`` is a directory written after the measurement: a file of that name is refused now,
    not with a FileExistsError once the run's time is spent."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        p.error(f"--out {out}: is a file, not a directory")


def _require_cuda(p: argparse.ArgumentParser, what: str = "--device cuda") -> None:
    """Refuse a run that needs CUDA where there is none: exit 2 naming ``what`` (after the other
    arguments were checked, so a bad flag is named on any machine)."""
    if not torch.cuda.is_available():
        p.error(f"{what}: CUDA is not available here")


BACKENDS = ("all", "ours", "sdpa", "flex", "flex-routed")
GROUPS = ("all", "routed", "floor", "global", "intra", "window")
#: the groups each --backends name makes rows in (build_rows; "floor" only for a layer with global
#: heads): a --backends/--groups pair that selects no row is refused before any timing
BACKEND_GROUPS = {"ours": {"routed", "global", "intra", "window"}, "sdpa": {"floor", "global", "intra"},
                  "flex": {"routed", "global", "intra", "window"}, "flex-routed": {"routed"}}


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=CPU_NOTE)
    p.add_argument("--shapes", default="S,A,B",
                   help="comma list of presets from benchmarks/ANCHORS.md: S (5,20,40), A (9,45,80), B (27,45,80); "
                        "on the CPU each is scaled down (see below)")
    p.add_argument("--grid", default=None, help="T,H,W instead of --shapes (used as given, on the CPU too)")
    p.add_argument("--heads", type=_positive_int, default=12, help="attention heads (default 12; --routing sets it)")
    p.add_argument("--head-dim", type=_positive_int, default=128, help="head dim D (default 128)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="input dtype (default bf16)")
    p.add_argument("--mix", default="5,4,3", help="global,intra,window head counts (grouped in that order)")
    p.add_argument("--routing", default=None, help="routing JSON from oasis-route; takes --layer's modes")
    p.add_argument("--layer", type=int, default=0, help="layer of --routing to bench (default 0)")
    p.add_argument("--window", default="3,5,5", help="window heads' size Pt,Ph,Pw, odd (default 3,5,5)")
    p.add_argument("--pass", dest="pass_", default="both", choices=["fwd", "fwdbwd", "both"],
                   help="forward, forward+backward or both (default)")
    p.add_argument("--backends", default="all",
                   help="comma list of: ours, sdpa, flex, flex-routed (only Flex's routed row) (default all; "
                        "FlexAttention needs CUDA)")
    p.add_argument("--groups", default="all",
                   help="comma list of row groups to time: routed, floor, global, intra, window (default all)")
    p.add_argument("--out", default=None, help="directory for JSON, markdown and PNG (default on CUDA: "
                                               "benchmarks/results/<date>; on the CPU nothing is written without it)")
    p.add_argument("--graphs", default="", help="shapes (e.g. S) whose rows are also timed as CUDA-graph replays: "
                   "GPU time without host launch overhead, for every row alike (CUDA only)")
    p.add_argument("--warmup-ms", type=_non_negative_ms, default=25,
                   help="warm-up time per row and pass, ms (default 25; the CPU also drops the first call)")
    p.add_argument("--rep-ms", type=_non_negative_ms, default=200,
                   help="timed time per row and pass, ms (default 200; the CPU times at least 3 calls)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"],
                   help="where to run (default: cuda if present, else cpu)")
    args = p.parse_args(argv)
    try:
        args.mix_counts = _ints(args.mix, "--mix", 3)
        args.window = _ints(args.window, "--window", 3)
        args.grid = _ints(args.grid, "--grid", 3) if args.grid else None
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    try:
        args.window = ok.normalize_window(args.window)
        args.grid = ok.normalize_grid(args.grid) if args.grid else None
    except (TypeError, ValueError) as exc:
        p.error(f"--window/--grid: {exc}")
    if min(args.mix_counts) < 0:
        p.error(f"--mix {args.mix}: head counts must be >= 0")
    try:
        args.shapes = _names(args.shapes, "--shapes", SHAPES, "preset(s)")
    except argparse.ArgumentTypeError as exc:
        p.error(f"{exc} (or give --grid)")
    try:
        args.backends = _names(args.backends, "--backends", BACKENDS)
        args.groups = _names(args.groups, "--groups", GROUPS, "group(s)")
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    args.graphs = [x for x in args.graphs.split(",") if x]
    unknown = [x for x in args.graphs if x not in SHAPES and x != "custom"]
    if unknown:
        p.error(f"--graphs: unknown shape(s) {unknown}; choose from {', '.join(SHAPES)} or custom (--grid)")
    if args.routing and not Path(args.routing).is_file():
        p.error(f"--routing {args.routing}: no such file")
    if args.routing:  # the file's layer sets the heads and modes: other settings of them would be ignored
        given = [flag for flag, dest in (("--heads", "heads"), ("--mix", "mix")) if getattr(args, dest) != p.get_default(dest)]
        if given:
            p.error(f"--routing {args.routing}: its layer sets the heads and modes; leave out {', '.join(given)}")
    _check_out_dir(p, args.out)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        _require_cuda(p)
    if args.device == "cpu":
        # what the CPU cannot do is refused rather than ignored
        if args.graphs:
            p.error(f"--graphs {','.join(args.graphs)}: CUDA graphs need CUDA; the CPU times eager calls")
        flex = sorted(set(args.backends) & {"flex", "flex-routed"})
        if flex:
            p.error(f"--backends {','.join(flex)}: the FlexAttention rows need CUDA; on the CPU: ours, sdpa")
    try:
        plan = make_plan(args.grid or SHAPES[args.shapes[0]], args)  # --mix/--heads, --routing/--layer agree
    except (ValueError, TypeError, OSError) as exc:
        p.error(str(exc).splitlines()[0])
    backends = BACKEND_GROUPS if "all" in args.backends else args.backends
    made = set().union(*(BACKEND_GROUPS[b] for b in backends if args.device == "cuda" or "flex" not in b))
    if not plan.heads_of("global"):
        made.discard("floor")
    if not ("all" in args.groups or made & set(args.groups)):
        p.error(f"--backends {','.join(args.backends)} --groups {','.join(args.groups)}: nothing matches "
                f"(those backends make rows in: {', '.join(sorted(made)) or 'none here'})")
    return args


def make_plan(grid, args) -> ok.RoutingPlan:
    """The routed layer for ``grid``: --routing's --layer, else --mix (ValueError when they do not fit)."""
    if args.routing:
        from oasis_kernels.routing import load_routing

        routing = load_routing(args.routing)
        plan = routing.plan(args.layer, grid)
        args.heads = plan.heads
        args.mix_text = f"{args.routing}[layer {args.layer}]"
        # group heads by mode so each dense baseline reads one contiguous slice
        return plan.permuted()
    g, i, w = args.mix_counts
    if g + i + w != args.heads:
        raise ValueError(f"--mix {args.mix} routes {g + i + w} heads but --heads is {args.heads}")
    args.mix_text = f"{g}g/{i}i/{w}w"
    return ok.RoutingPlan.from_counts(grid, g, i, w, args.window)


def cpu_main(args) -> int:
    """No CUDA (or --device cpu): check and time the rows the CPU can run, on the scaled-down
    presets (:data:`CPU_SHAPES`) or --grid, honouring the other flags (see :data:`CPU_NOTE`)."""
    device = torch.device("cpu")
    dtype = DTYPES[args.dtype]
    shapes = {"custom": args.grid} if args.grid else {s: CPU_SHAPES[s] for s in args.shapes}
    passes = ["fwd", "fwdbwd"] if args.pass_ == "both" else [args.pass_]
    env = environment(device)
    print(f"CPU ({env['cpu']}, {env['threads']} threads), torch {env['torch']}: no CUDA here, so GPU figures need a "
          f"GPU; timing warm calls on {'--grid as given' if args.grid else 'scaled-down presets'}", flush=True)
    results = {}
    for name, grid in shapes.items():
        plan = make_plan(grid, args)
        scaled = f" (scaled down from {SHAPES[name]})" if name in SHAPES else ""
        print(f"{name} {grid}{scaled} N={plan.num_tokens} {plan}, batch={args.batch}, D={args.head_dim}, "
              f"{args.dtype}", flush=True)
        print(ok.explain(torch.empty(args.batch, plan.num_tokens, plan.heads, args.head_dim, dtype=dtype), plan),
              flush=True)
        results[name] = bench_shape(name, plan, args, device, dtype, None)
    print()
    print(render_text(table(results, passes, cpu=True)))
    if args.out:
        out_dir, stem = write_results(results, shapes, passes, env, None, args)
        print(f"\nwrote {out_dir}/{stem}.{{json,md,png}}")
    failed = [r.name for rows in results.values() for r in rows if r.results.get("status") != "ok"]
    if failed:
        print(f"rows that failed their correctness check: {failed}")
    return 1 if failed else 0


def _graph_passes(passes) -> list[str]:
    """The CUDA-graph variants of ``passes`` (``--graphs``)."""
    return [f"{p} graph" for p in passes]


def _all_passes(results, passes, args) -> list[str]:
    graphs = any(name in args.graphs for name in results)
    return passes + _graph_passes(passes) if graphs else passes


def write_results(results, shapes, passes, env, ceilings, args):
    """JSON, markdown and PNG of the shapes measured so far; returns ``(dir, file stem)``."""
    passes = _all_passes(results, passes, args)
    lines = table(results, passes, cpu="gpu" not in env)
    out_dir = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / dt.date.today().isoformat()
    out_dir.mkdir(parents=True, exist_ok=True)
    device_name = env.get("gpu", "cpu")
    stem = f"attn_bench_{device_name.replace(' ', '_')}_{args.dtype}"
    payload = {
        "env": env, "ceilings": ceilings,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "triton_configs": _triton_configs(),
        "shapes": {name: {"grid": list(shapes[name]), "rows": [
            {"name": r.name, "group": r.group, "ours": r.ours, "heads": r.heads, "plan": repr(r.plan),
             "setup_s": r.setup_s, **r.results} for r in rows]} for name, rows in results.items()},
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    (out_dir / f"{stem}.md").write_text(render_markdown(lines, env, ceilings, args))
    plot(results, passes, out_dir / f"{stem}.png", f"{device_name} {args.dtype} {args.mix_text}")
    return out_dir, stem


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        return cpu_main(args)
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    shapes = {"custom": args.grid} if args.grid else {s: SHAPES[s] for s in args.shapes}
    passes = ["fwd", "fwdbwd"] if args.pass_ == "both" else [args.pass_]
    env = environment(device)
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}", flush=True)
    ceilings = measure_ceilings(device)
    print(f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 matmul {ceilings['matmul_TFLOPs']:.0f} TFLOP/s",
          flush=True)
    results = {}
    for name, grid in shapes.items():
        plan = make_plan(grid, args)
        print(f"{name} {grid} N={plan.num_tokens} {plan}", flush=True)
        print(ok.explain(torch.empty(args.batch, plan.num_tokens, plan.heads, args.head_dim, dtype=dtype,
                                     device=device), plan), flush=True)
        results[name] = bench_shape(name, plan, args, device, dtype, ceilings)
        # write after every shape: a later shape that crashes the process loses only itself
        out_dir, stem = write_results(results, shapes, passes, env, ceilings, args)
    print()
    print(render_text(table(results, _all_passes(results, passes, args))))
    print(f"\nwrote {out_dir}/{stem}.{{json,md,png}}")
    failed = [r.name for rows in results.values() for r in rows if r.results.get("status") != "ok"]
    if failed:
        print(f"rows that failed their correctness check: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
