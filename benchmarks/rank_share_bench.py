#!/usr/bin/env python
"""What each rank of a sequence-parallel routed attention layer computes, timed on one GPU.

For P ranks and each placement (Ulysses with contiguous head blocks, Ulysses with cost-balanced
heads, the frame-parallel hybrid with its global heads split by an all-to-all or gathered by an
all-gather), ``oasis_kernels.distributed.rank_calls`` gives the attention
calls every rank makes (the plans the layer builds; the collectives aside). Each distinct call is
timed here on one device, so the slowest rank's kernel time, the ranks' imbalance and, with
docs/DISTRIBUTED.md's traffic model at an assumed link rate, the layer's time on P GPUs and its
scaling efficiency are predicted before a machine of several GPUs is lent (issue 24's one-GPU part).
With ``--dit-forward-ms`` (a 30-layer DiT forward measured on one GPU at the same shape, e.g. by
benchmarks/model_bench.py) the DiT's per-rank time is predicted too: its non-attention work split
evenly by tokens, its attention at the slowest rank's time plus the modelled traffic.

    python benchmarks/rank_share_bench.py --grids 27,45,80 54,45,80 --ranks 1,2,4 --out DIR
    python benchmarks/rank_share_bench.py --grids 4,4,6 --head-dim 16 --device cpu   (a small check)

What it does not see: the collectives' own time on real links (modelled, not measured), their
overlap with the kernels (none assumed), the copies that lay out the all-to-alls' buffers and the
hybrid's halo padding, and the DiT's final all-gather.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from attn_bench import (_check_out_dir, _ints, _non_negative_ms, _Parser, _positive_ms,  # noqa: E402
                        _require_cuda, cpu_time_ms, environment)

import oasis_kernels as ok  # noqa: E402
from oasis_kernels.distributed import RankCall, _global_rows, _head_blocks, rank_calls, token_slices  # noqa: E402

#: the placements compared: (row name, strategy, balanced, the hybrid's global heads)
PLACEMENTS = (("ulysses, contiguous heads", "ulysses", False, "auto"),
              ("ulysses, balanced heads", "ulysses", True, "auto"),
              ("hybrid, global heads all-to-all", "hybrid", True, "all_to_all"),
              ("hybrid, global heads all-gather", "hybrid", True, "all_gather"))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def layer_plan(grid, mix, window) -> ok.RoutingPlan:
    """The layer's heads grouped by mode, global first (the DiT's kernel order)."""
    g, i, w = mix
    return ok.RoutingPlan(grid, [ok.Mode.GLOBAL] * g + [ok.Mode.INTRA] * i + [ok.Mode.WINDOW] * w, window)


def traffic_bytes(plan: ok.RoutingPlan, world: int, hybrid: bool, batch: int, head_dim: int, elt: int,
                  gather_globals: bool = False) -> float:
    """Bytes the busiest rank sends in one layer's forward (docs/DISTRIBUTED.md's model). Ulysses: rank r
    sends the q, k and v of its n_r tokens for the heads other ranks take, and the output of its b_r
    heads for the other ranks' tokens, ``3 n_r (H - b_r) + b_r (N - n_r)`` token-heads; the hybrid the
    same over its global heads only (or with ``gather_globals`` the k and v of its tokens of every global
    head to each other rank, ``2 n_r G (P - 1)``), plus the k and v of the window's temporal radius in
    frames to each neighbour for the window heads."""
    if world == 1:
        return 0.0
    t, h, w = plan.grid
    n = t * h * w
    counts = [stop - start for start, stop in token_slices(plan.grid, world)]
    heads = plan.modes.count(ok.Mode.GLOBAL) if hybrid else len(plan.modes)
    blocks = _head_blocks(heads, world)
    halo = plan.window[0] // 2 * h * w * plan.modes.count(ok.Mode.WINDOW) if hybrid else 0
    if hybrid and gather_globals:
        sent = [2 * counts[r] * heads * (world - 1) for r in range(world)]
    else:
        sent = [3 * counts[r] * (heads - blocks[r]) + blocks[r] * (n - counts[r]) for r in range(world)]
    return max(s + 2 * ((r > 0) + (r < world - 1)) * halo for r, s in enumerate(sent)) * batch * head_dim * elt


class Timer:
    """Times one routed-attention call per distinct plan (inputs made once per plan), forward and
    forward+backward: CUDA by triton.testing.do_bench's median, the CPU by wall-clock medians."""

    def __init__(self, device, dtype, batch, head_dim, warmup_ms, rep_ms):
        self.device, self.dtype, self.batch, self.head_dim = device, dtype, batch, head_dim
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.cache: dict = {}

    def __call__(self, call) -> dict:
        """``call``: an ``oasis_kernels.distributed.RankCall``."""
        if call not in self.cache:
            self.cache[call] = self._time(call)
        return self.cache[call]

    def _time(self, call):
        plan, heads = call.plan, len(call.plan.modes)
        rows = call.queries or plan.num_tokens
        make = functools.partial(torch.randn, device=self.device, dtype=self.dtype)
        q = make(self.batch, rows, heads, self.head_dim, requires_grad=True)
        k, v = (make(self.batch, plan.num_tokens, heads, self.head_dim, requires_grad=True) for _ in range(2))
        grad = make(self.batch, rows, heads, self.head_dim)
        if call.queries is None:
            def attend():
                return ok.routed_attention(q, k, v, plan)
        else:  # the global heads' rows, as the layer runs them
            def attend():
                return _global_rows(q, k, v)

        def fwd():
            with torch.no_grad():
                attend()

        def fwd_bwd():
            attend().backward(grad)
            q.grad = k.grad = v.grad = None

        times = {"fwd": self._ms(fwd), "fwd+bwd": self._ms(fwd_bwd)}
        del q, k, v, grad
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return times

    def _ms(self, fn) -> float:
        if self.device.type == "cuda":
            import triton.testing

            return triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
        return cpu_time_ms(fn, self.warmup_ms, self.rep_ms)["ms"]


def _describe(call) -> str:
    modes = "".join("giw"[m] for m in call.plan.modes)
    if call.queries is None:
        return f"{call.plan.grid} {modes}"
    return f"{call.queries} queries of {call.plan.grid} {modes}"


def bench_grid(plan: ok.RoutingPlan, args, timer: Timer) -> list[dict]:
    """Rows for one grid: one GPU, then each rank count and placement."""
    elt = torch.finfo(DTYPES[args.dtype]).bits // 8
    one = timer(RankCall(plan))
    rows = [dict(grid=list(plan.grid), ranks=1, placement="one GPU", rank_fwd_ms=[one["fwd"]],
                 rank_fwd_bwd_ms=[one["fwd+bwd"]], traffic_MB=0.0)]
    for world in args.ranks:
        if world == 1:
            continue
        for name, strategy, balanced, global_heads in PLACEMENTS:
            try:
                calls = rank_calls(plan, world, strategy, balanced=balanced, global_heads=global_heads,
                                   head_dim=args.head_dim)
            except ValueError as exc:  # the placement cannot run this layer on `world` ranks
                rows.append(dict(grid=list(plan.grid), ranks=world, placement=name, skipped=str(exc)))
                continue
            fwd = [sum(timer(c)["fwd"] for c in rank) for rank in calls]
            fwd_bwd = [sum(timer(c)["fwd+bwd"] for c in rank) for rank in calls]
            traffic = traffic_bytes(plan, world, strategy == "hybrid", args.batch, args.head_dim, elt,
                                    gather_globals=global_heads == "all_gather")
            rows.append(dict(grid=list(plan.grid), ranks=world, placement=name, rank_fwd_ms=fwd,
                             rank_fwd_bwd_ms=fwd_bwd, traffic_MB=traffic / 1e6,
                             calls=[[_describe(c) for c in rank] for rank in calls]))
    for row in rows:
        if "skipped" in row:
            continue
        comm = row["traffic_MB"] * 1e6 / (args.link_GBps * 1e9) * 1e3  # ms, forward; the backward mirrors it
        row["traffic_ms"] = comm
        for key, passes in (("fwd", 1), ("fwd_bwd", 2)):
            times = row[f"rank_{key}_ms"]
            slowest = max(times)
            row[f"{key}_slowest_ms"] = slowest
            row[f"{key}_imbalance"] = slowest / (sum(times) / len(times))
            row[f"{key}_layer_ms"] = slowest + passes * comm
            base = one["fwd"] if key == "fwd" else one["fwd+bwd"]
            row[f"{key}_efficiency"] = base / (row["ranks"] * row[f"{key}_layer_ms"])
        if args.dit_forward_ms:
            # the DiT's other work split evenly by tokens; its attention at the layer's predicted time
            rest = args.dit_forward_ms - args.layers * one["fwd"]
            row["dit_fwd_ms"] = rest / row["ranks"] + args.layers * row["fwd_layer_ms"]
            row["dit_efficiency"] = args.dit_forward_ms / (row["ranks"] * row["dit_fwd_ms"])
    return rows


def render_markdown(results, env, args) -> str:
    g, i, w = args.mix
    md = [f"# rank_share_bench: {env.get('gpu', 'cpu')}, {args.dtype}, {g}g/{i}i/{w}w heads of D={args.head_dim}, "
          f"batch {args.batch}, window {tuple(args.window)}", "",
          f"torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, driver {env.get('driver')}, "
          f"commit `{env['commit'][:12]}`{' (dirty)' if env['dirty'] is True else ''}, {env['date']}.",
          f"Each rank's attention calls (`oasis_kernels.distributed.rank_calls`) timed one after another on this "
          f"one device, medians in ms; the traffic is docs/DISTRIBUTED.md's model for the busiest rank at "
          f"{args.link_GBps:g} GB/s, added without overlap (twice for forward+backward). Efficiency = one GPU's "
          f"time / (P x the predicted time). Not a measurement on several GPUs.", ""]
    head = ["grid", "P", "placement", "fwd slowest rank", "fwd imbalance", "traffic MB", "fwd layer",
            "fwd eff.", "fwd+bwd slowest rank", "fwd+bwd layer", "fwd+bwd eff."]
    if args.dit_forward_ms:
        head += ["DiT fwd", "DiT eff."]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results:
        grid = "x".join(str(x) for x in row["grid"])
        if "skipped" in row:
            md.append(f"| {grid} | {row['ranks']} | {row['placement']} | cannot run: {row['skipped']} |"
                      + " |" * (len(head) - 4))
            continue
        cells = [grid, str(row["ranks"]), row["placement"], f"{row['fwd_slowest_ms']:.3f}",
                 f"{row['fwd_imbalance']:.2f}", f"{row['traffic_MB']:.1f}", f"{row['fwd_layer_ms']:.3f}",
                 f"{100 * row['fwd_efficiency']:.0f}%", f"{row['fwd_bwd_slowest_ms']:.3f}",
                 f"{row['fwd_bwd_layer_ms']:.3f}", f"{100 * row['fwd_bwd_efficiency']:.0f}%"]
        if args.dit_forward_ms:
            # the DiT's time is given for the first grid only: the other grids' rows have none
            cells += ([f"{row['dit_fwd_ms']:.1f}", f"{100 * row['dit_efficiency']:.0f}%"] if "dit_fwd_ms" in row
                      else ["-", "-"])
        md.append("| " + " | ".join(cells) + " |")
    md.append("")
    md.append("Calls per rank (grid, modes):")
    for row in results:
        if row.get("calls"):
            md.append(f"- {'x'.join(map(str, row['grid']))}, P={row['ranks']}, {row['placement']}: "
                      + "; ".join(f"rank {r}: " + ", ".join(c) for r, c in enumerate(row["calls"])))
    return "\n".join(md) + "\n"


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grids", nargs="+", default=["27,45,80", "54,45,80"],
                   help="latent grids T,H,W (default B = 27,45,80 and the 2x longer clip 54,45,80)")
    p.add_argument("--ranks", default="1,2,4", help="rank counts P (default 1,2,4)")
    p.add_argument("--mix", default="5,4,3", help="global,intra,window head counts, grouped in that order (default 5,4,3)")
    p.add_argument("--window", default="3,5,5", help="window heads' size Pt,Ph,Pw (default 3,5,5)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--link-GBps", type=float, default=450.0,
                   help="each GPU's link rate per direction for the traffic model (default 450: NVLink 4 on an H200)")
    p.add_argument("--dit-forward-ms", type=_positive_ms, default=None,
                   help="a 30-layer DiT forward measured on one GPU at the first grid (ms); adds the DiT's prediction")
    p.add_argument("--layers", type=int, default=30, help="attention layers of that DiT (default 30)")
    # a warm-up of 0 ms still runs one call before the timing (as attn_bench's): only a negative or
    # non-finite one is wrong
    p.add_argument("--warmup-ms", type=_non_negative_ms, default=25.0,
                   help="warm-up per call, ms (default 25; at least one call either way)")
    p.add_argument("--rep-ms", type=_positive_ms, default=100.0, help="timed time per call, ms (default 100)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if present, else cpu")
    p.add_argument("--out", default=None, help="directory for rank_share_bench.json and .md")
    args = p.parse_args(argv)
    try:
        args.grids = [ok.normalize_grid(_ints(g, "--grids", 3)) for g in args.grids]
        args.ranks = _ints(args.ranks, "--ranks")
        args.mix = _ints(args.mix, "--mix", 3)
        args.window = ok.normalize_window(_ints(args.window, "--window", 3))
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        p.error(str(exc))
    if min(args.ranks) < 1:
        p.error(f"--ranks: every rank count must be >= 1, got {args.ranks}")
    if min(args.mix) < 0 or sum(args.mix) == 0:
        p.error(f"--mix: head counts must be >= 0 with at least one head, got {args.mix}")
    for name in ("head_dim", "batch", "layers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (args.link_GBps > 0 and math.isfinite(args.link_GBps)):
        p.error(f"--link-GBps must be a finite number > 0, got {args.link_GBps}")
    _check_out_dir(p, args.out)
    if args.device == "cuda":
        _require_cuda(p)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timer = Timer(device, DTYPES[args.dtype], args.batch, args.head_dim, args.warmup_ms, args.rep_ms)
    results = []
    for n, grid in enumerate(args.grids):
        saved = args.dit_forward_ms
        if n > 0:  # the DiT's time is for the first grid only
            args.dit_forward_ms = None
        results += bench_grid(layer_plan(grid, args.mix, args.window), args, timer)
        args.dit_forward_ms = saved
    env = environment(device)
    md = render_markdown(results, env, args)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
        (out / "rank_share_bench.json").write_text(json.dumps(dict(env=env, args=settings, rows=results), indent=1,
                                                              default=str))
        (out / "rank_share_bench.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
