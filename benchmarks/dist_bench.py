#!/usr/bin/env python
"""Routed attention and the OASIS DiT on several GPUs of one host (issue 24), in one command.

For each P of ``--gpus`` (one process per GPU, started here; NCCL with NVLink multicast off, as the
machines' notes ask), bf16, random weights at Wan2.1-1.3B's size:

* attention: one routed layer (12 heads of 128, 5 global / 4 intra / 3 window (3,5,5), grouped by mode
  as the DiT orders them) at each grid of ``--grids`` (B and the 2x longer clip), for each placement
  (Ulysses with contiguous heads, Ulysses with cost-balanced heads, the hybrid with its global heads split
  by the all-to-alls or gathered): the layer's forward and forward+backward; the same layer with its
  attention replaced by a stand-in that computes nothing (so its collectives, head gathers and halo
  alone); and each rank's attention calls alone (``rank_calls``: the kernels, no collectives). A time is
  the slowest rank's: the ranks start together (a barrier), each times the call, the maximum is taken.
* dit: the 30-layer routed DiT forward at the first grid, its tokens split over the P ranks
  (``WanDiT.set_sequence_parallel``: the hybrid with its defaults where it runs), compiled regions on CUDA.
* train: a DDP training step of the DiT at the paper's clip (17 frames 320x640, grid (5,20,40)), every
  rank its own clips, every block checkpointed, fused AdamW: clips per second per GPU.

Efficiency is one GPU's time over P x the P-GPU time (train: the per-GPU rate over one GPU's).

    python benchmarks/dist_bench.py --gpus 1,2,4 --out DIR
    python benchmarks/dist_bench.py --device cpu --gpus 1,2 --tiny        (gloo, small: a check of the code)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attn_bench import (_check_out_dir, _ints, _Parser, _positive_int, _require_cuda, _triple,  # noqa: E402
                        environment)
from model_bench import ROUTED, build_dit  # noqa: E402
from rank_share_bench import PLACEMENTS, Timer, layer_plan  # noqa: E402
from train_bench import TINY, forward_backward  # noqa: E402

import oasis_kernels as ok  # noqa: E402
import oasis_kernels.distributed as okd  # noqa: E402
from oasis import WanConfig, WanDiT  # noqa: E402

TINY_GRIDS = ["4,4,6"]
TINY_ROUTED = ["global", "intra", "window"]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def slowest_ms(fn, device, reps: int, warmup: int = 1) -> float:
    """The median over ``reps`` of the slowest rank's time for ``fn`` (the ranks start together)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        fn()
        _sync(device)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed) * 1e3)
    return statistics.median(times)


class _NoAttention(torch.autograd.Function):
    """A stand-in for an attention call: zeros of q's shape, and zero gradients (no math)."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return torch.zeros_like(q)

    @staticmethod
    def backward(ctx, g):
        return tuple(torch.zeros_like(x) for x in ctx.saved_tensors)


@contextlib.contextmanager
def collectives_only():
    """The distributed layer with its attention calls replaced by :class:`_NoAttention`."""
    routed, rows = okd._routed_attention, okd._global_rows
    okd._routed_attention = lambda q, k, v, plan: _NoAttention.apply(q, k, v)
    okd._global_rows = lambda q, k, v: _NoAttention.apply(q, k, v)
    try:
        yield
    finally:
        okd._routed_attention, okd._global_rows = routed, rows


def attention_rows(args, device, dtype) -> list[dict]:
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    placements = [("one GPU", "auto", True, "auto")] if world == 1 else PLACEMENTS
    timer = Timer(device, dtype, 1, args.head_dim, 5, 20)  # each rank's calls alone
    for grid in args.grids:
        plan = layer_plan(grid, args.mix, args.window)
        start, stop = okd.token_slices(grid, world)[rank]
        make = lambda: torch.randn(1, stop - start, len(plan.modes), args.head_dim, device=device,  # noqa: E731
                                   dtype=dtype, requires_grad=True)
        q, k, v = make(), make(), make()
        dout = torch.randn_like(q)
        for name, strategy, balanced, global_heads in placements:
            row = {"section": "attention", "grid": list(grid), "ranks": world, "placement": name}
            try:
                calls = okd.rank_calls(plan, world, strategy, balanced=balanced, global_heads=global_heads,
                                       head_dim=args.head_dim)
            except ValueError as exc:  # the placement cannot run this layer on this many ranks
                rows.append({**row, "skipped": str(exc)})
                continue

            def layer():
                return okd.routed_attention(q, k, v, plan, strategy=strategy, balanced=balanced,
                                            global_heads=global_heads)

            def fwd():
                with torch.no_grad():
                    layer()

            def fwd_bwd():
                layer().backward(dout)
                q.grad = k.grad = v.grad = None

            row["fwd_ms"] = slowest_ms(fwd, device, args.reps)
            row["fwd_bwd_ms"] = slowest_ms(fwd_bwd, device, args.reps)
            if world > 1:
                with collectives_only():
                    row["collectives_fwd_ms"] = slowest_ms(fwd, device, args.reps)
                    row["collectives_fwd_bwd_ms"] = slowest_ms(fwd_bwd, device, args.reps)
                mine = [timer(c) for c in calls[rank]]
                kernels = torch.tensor([sum(t["fwd"] for t in mine), sum(t["fwd+bwd"] for t in mine)],
                                       dtype=torch.float64, device=device)
                dist.all_reduce(kernels, op=dist.ReduceOp.MAX)
                row["kernels_fwd_ms"], row["kernels_fwd_bwd_ms"] = (float(x) for x in kernels)
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    return rows


def _dit(args, device, dtype) -> WanDiT:
    cfg = TINY if args.tiny else WanConfig()
    torch.manual_seed(0)  # the same weights on every rank
    model = build_dit(cfg, device) if dtype == torch.bfloat16 else \
        WanDiT(cfg).init_weights().to(device, dtype).eval()
    if dtype != torch.bfloat16:
        model.set_context(torch.randn(cfg.text_len, cfg.text_dim, device=device) * 0.1)
    model.set_routing([TINY_ROUTED if args.tiny else ROUTED] * cfg.num_layers)
    return model


def dit_rows(args, device, dtype) -> list[dict]:
    world, rank = dist.get_world_size(), dist.get_rank()
    model = _dit(args, device, dtype)
    if world > 1:
        model.set_sequence_parallel()
    model.compile_regions(device.type == "cuda")
    t, h, w = args.grids[0]
    cfg = model.config
    z = torch.randn(1, cfg.in_channels, t, 2 * h, 2 * w, device=device, dtype=dtype,
                    generator=torch.Generator(device).manual_seed(1))

    def forward():
        with torch.no_grad():
            model(z, 799.0)

    row = {"section": "dit", "grid": [t, h, w], "ranks": world, "forward_ms": slowest_ms(forward, device, args.reps)}
    if rank == 0:
        print(json.dumps(row), flush=True)
    return [row]


def train_rows(args, device, dtype) -> list[dict]:
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = TINY if args.tiny else WanConfig()
    latent = (5, 8, 16) if args.tiny else (5, 40, 80)
    torch.manual_seed(0)
    model = WanDiT(cfg).init_weights().to(device).train()  # float32 weights, bf16 autocast on CUDA
    model.set_context(torch.randn(cfg.text_len, cfg.text_dim, device=device) * 0.1)
    model.set_routing([TINY_ROUTED if args.tiny else ROUTED] * cfg.num_layers)
    model.activation_checkpointing = cfg.num_layers
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator(device).manual_seed(100 + rank)  # every rank its own clips
    latents = torch.randn(args.train_batch, cfg.in_channels, *latent, device=device, generator=gen)
    steps = torch.full((args.train_batch,), 799.0, device=device)

    def step():
        forward_backward(ddp, latents, steps, device.type, device.type == "cuda")
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = slowest_ms(step, device, args.reps, warmup=2)
    del ddp, opt  # DDP's reducer before the process group goes (gloo aborted a rank's exit otherwise)
    row = {"section": "train", "ranks": world, "batch_per_gpu": args.train_batch, "step_ms": ms,
           "clips_per_s_per_gpu": args.train_batch / ms * 1e3}
    if rank == 0:
        print(json.dumps(row), flush=True)
    return [row]


def worker(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if cuda else torch.float32
    try:
        rows = []
        for section, fn in (("attention", attention_rows), ("dit", dit_rows), ("train", train_rows)):
            if section in args.what:
                rows += fn(args, device, dtype)
        if rank == 0:
            results[world] = rows
        dist.barrier()  # every rank done with its collectives before any tears the group down
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def efficiencies(rows: list[dict]) -> None:
    """Each row's efficiency against the one-GPU row of its section and grid (in place)."""
    one = {(r["section"], tuple(r.get("grid", ()))): r for r in rows if r["ranks"] == 1 and "skipped" not in r}
    for r in rows:
        base = one.get((r["section"], tuple(r.get("grid", ()))))
        if base is None or "skipped" in r or r["ranks"] == 1:
            continue
        p = r["ranks"]
        if r["section"] == "attention":
            r["fwd_efficiency"] = base["fwd_ms"] / (p * r["fwd_ms"])
            r["fwd_bwd_efficiency"] = base["fwd_bwd_ms"] / (p * r["fwd_bwd_ms"])
        elif r["section"] == "dit":
            r["efficiency"] = base["forward_ms"] / (p * r["forward_ms"])
        else:
            r["efficiency"] = r["clips_per_s_per_gpu"] / base["clips_per_s_per_gpu"]


def render(rows: list[dict], env: dict, args) -> str:
    f = lambda x, nd=2: "-" if x is None else f"{x:.{nd}f}"  # noqa: E731
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    md = [f"# dist_bench: {env.get('gpu', 'cpu')} x {', '.join(map(str, args.gpus))}, commit `{env['commit'][:12]}`"
          f"{' (dirty)' if env['dirty'] is True else ''}, {env['date']}", "",
          f"torch {env['torch']}, CUDA {env.get('cuda')}, NCCL {env.get('nccl', '-')}, driver {env.get('driver')}; "
          f"{'tiny config (a check of the code, not a measurement)' if args.tiny else 'Wan2.1-1.3B sizes, bf16'}; "
          f"medians of {args.reps} of the slowest rank's times, ms.", ""]
    att = [r for r in rows if r["section"] == "attention"]
    if att:
        md += ["| grid | P | placement | fwd | fwd eff. | fwd+bwd | fwd+bwd eff. | collectives fwd / fwd+bwd | "
               "kernels fwd / fwd+bwd |", "|---|---|---|---|---|---|---|---|---|"]
        for r in att:
            grid = "x".join(map(str, r["grid"]))
            if "skipped" in r:
                md.append(f"| {grid} | {r['ranks']} | {r['placement']} | cannot run: {r['skipped']} | | | | | |")
                continue
            md.append(f"| {grid} | {r['ranks']} | {r['placement']} | {f(r['fwd_ms'])} | {pct(r.get('fwd_efficiency'))} | "
                      f"{f(r['fwd_bwd_ms'])} | {pct(r.get('fwd_bwd_efficiency'))} | "
                      f"{f(r.get('collectives_fwd_ms'))} / {f(r.get('collectives_fwd_bwd_ms'))} | "
                      f"{f(r.get('kernels_fwd_ms'))} / {f(r.get('kernels_fwd_bwd_ms'))} |")
        md.append("")
    dit = [r for r in rows if r["section"] == "dit"]
    if dit:
        md += ["| DiT forward, grid | P | ms | efficiency |", "|---|---|---|---|"]
        md += [f"| {'x'.join(map(str, r['grid']))} | {r['ranks']} | {f(r['forward_ms'], 1)} | {pct(r.get('efficiency'))} |"
               for r in dit]
        md.append("")
    train = [r for r in rows if r["section"] == "train"]
    if train:
        md += ["| training step (DDP) | P | batch per GPU | step ms | clips/s per GPU | per-GPU rate vs one GPU |",
               "|---|---|---|---|---|---|"]
        md += [f"| | {r['ranks']} | {r['batch_per_gpu']} | {f(r['step_ms'], 1)} | {f(r['clips_per_s_per_gpu'])} | "
               f"{pct(r.get('efficiency'))} |" for r in train]
    return "\n".join(md) + "\n"


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default="1,2,4", help="process counts P, one GPU each (default 1,2,4)")
    p.add_argument("--grids", nargs="+", default=None,
                   help="latent grids T,H,W (default 27,45,80 and 54,45,80; --tiny: 4,4,6)")
    p.add_argument("--what", default="attention,dit,train", help="sections: attention, dit, train")
    p.add_argument("--mix", default="5,4,3", help="global,intra,window heads of the attention layer (default 5,4,3)")
    p.add_argument("--window", default="3,5,5", help="window heads' size Pt,Ph,Pw, odd (default 3,5,5)")
    p.add_argument("--head-dim", type=_positive_int, default=None, help="default 128 (--tiny: 16)")
    p.add_argument("--reps", type=_positive_int, default=5)
    p.add_argument("--train-batch", type=_positive_int, default=1,
                   help="clips per GPU in the training step (default 1)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if present")
    p.add_argument("--tiny", action="store_true", help="tiny DiT and grid (a check of the code)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        args.gpus = _ints(args.gpus, "--gpus")
        args.mix = _ints(args.mix, "--mix", 3)
        # checked here, in the parent: a bad window would otherwise fail in every spawned worker
        args.window = _triple(args.window, "--window", ok.normalize_window)
        grids = args.grids or (TINY_GRIDS if args.tiny else ["27,45,80", "54,45,80"])
        args.grids = [_triple(g, "--grids", ok.normalize_grid) for g in grids]
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if min(args.mix) < 0 or sum(args.mix) == 0:
        p.error(f"--mix: head counts must be >= 0 with at least one head, got {args.mix}")
    args.what = [w for w in args.what.split(",") if w]
    if not args.what or set(args.what) - {"attention", "dit", "train"}:
        p.error(f"--what: attention, dit and/or train, got {','.join(args.what)!r}")
    _check_out_dir(p, args.out)
    if args.device == "cuda":
        _require_cuda(p)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if min(args.gpus) < 1 or (args.device == "cuda" and max(args.gpus) > torch.cuda.device_count()):
        p.error(f"--gpus {args.gpus}: each between 1 and the {torch.cuda.device_count()} GPUs here"
                if args.device == "cuda" else f"--gpus {args.gpus}: each at least 1")
    if args.head_dim is None:  # None, not 0: a --head-dim 0 is refused above, never replaced
        args.head_dim = 16 if args.tiny else 128
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # NVLink multicast stays off (docs/DISTRIBUTED.md, the machines' notes)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    results = mp.Manager().dict()
    for world in args.gpus:
        mp.spawn(worker, args=(world, _free_port(), args, results), nprocs=world, join=True)
    rows = [r for world in args.gpus for r in results[world]]
    efficiencies(rows)
    env = environment(torch.device(args.device), libraries=("nccl",) if args.device == "cuda" else ())
    md = render(rows, env, args)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
        (args.out / "dist_bench.json").write_text(json.dumps({"env": env, "args": settings, "rows": rows}, indent=1,
                                                             default=str))
        (args.out / "dist_bench.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
