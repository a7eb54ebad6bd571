"""The local-attention kernels' tile configurations and the rules that say which suit a launch.

A config is a ``triton.Config`` of the tile ``(BT, BH, BW)``, the key block ``BLOCK_N``, the
``SLICED`` walk, warps and stages. The autotuner (:mod:`.launching`) times the configs that
:func:`fitting` keeps for a launch; without autotuning the first one kept is used, so each list
starts with the config that suits the paper's shapes.
"""

from __future__ import annotations

import os

import triton

__all__ = ["INTERPRET", "TUNING_KEY", "FWD_CONFIGS", "BWD_CONFIGS", "WIDE_ROWS", "config", "fits", "fitting", "prune"]

#: Triton's interpreter (``TRITON_INTERPRET=1``, read by Triton at import): CPU tests
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: the launch arguments the autotuner keys its choice on
TUNING_KEY = ["T", "H", "W", "RT", "RH", "RW", "n_local", "n_window", "BLOCK_D"]


def config(bt, bh, bw, bn, warps, stages, sliced) -> triton.Config:
    return triton.Config({"BT": bt, "BH": bh, "BW": bw, "BLOCK_N": bn, "SLICED": sliced}, num_warps=warps,
                         num_stages=stages)


# fp32 rows of more than 128 elements: the only tiles whose blocks fit in shared memory in all
# three kernels (sm_90, D = 256: 103 / 135 / 135 KB; 64-token tiles need up to 279 KB)
WIDE_ROWS = config(2, 4, 4, 32, 4, 2, False)

if INTERPRET:
    # the interpreter runs each program in numpy: small tiles keep CPU tests fast. The first
    # config that fits is used: sliced where the window allows it ((3,5,5), (1,3,3)), else the
    # general walk ((5,7,7)), so CPU tests cover both
    FWD_CONFIGS = [config(1, 4, 4, 64, 1, 1, True), config(1, 4, 8, 64, 1, 1, False)]
    BWD_CONFIGS = list(FWD_CONFIGS)
else:
    # first fitting entry = the choice when autotuning is off. Sliced (4,4,4) tiles suit the
    # paper's (3,5,5) window: their 6 x 8 x 8 halo is 6 blocks of 64 with no padding and 384 keys
    # per query, like the (2,4,8) general tile whose 4 x 8 x 12 halo needs per-score coordinate
    # arithmetic; 128-query tiles suit intra-frame heads. Few configs: each costs a compile on
    # first use. benchmarks/local_bench.py times candidates one by one.
    FWD_CONFIGS = [
        config(4, 4, 4, 64, 4, 2, True),
        config(4, 4, 4, 64, 4, 3, True),
        config(8, 4, 4, 64, 8, 2, True),
        config(2, 4, 8, 64, 4, 2, False),
        config(2, 8, 8, 64, 8, 2, False),
        config(2, 4, 8, 32, 4, 3, False),  # intra-only launches at S: 0.059 vs 0.071+ ms (PERF.md, entry 12)
        WIDE_ROWS,
        config(1, 8, 8, 64, 4, 2, False),  # single-frame grids (images); also the fallback
    ]
    BWD_CONFIGS = [
        config(4, 4, 4, 64, 4, 2, True),
        config(4, 4, 4, 64, 8, 2, True),  # no dK/dV spills (4 warps spill 160 B); not in a recorded run yet
        config(2, 4, 4, 64, 4, 2, True),
        config(2, 4, 8, 32, 4, 3, False),
        config(2, 4, 8, 32, 4, 4, False),  # intra-only dK/dV at S: 0.104 vs 0.108 ms (PERF.md, entry 12)
        config(2, 4, 8, 64, 4, 2, False),
        WIDE_ROWS,
        config(1, 8, 8, 64, 4, 2, False),  # single-frame grids (images); also the fallback
    ]


def fits(c, args) -> bool:
    """Whether config ``c`` suits this launch: a sliced walk needs the halo's h x w slice to fit
    one block; tiles much larger than the grid gain nothing (BT=4 on a T=1 grid), and BT=1
    tiles are kept for single-frame grids; big tiles spill at head dims over 128, and fp32 rows
    over 128 elements take ``WIDE_ROWS`` only (shared memory). Launches of intra heads only use
    tiles of 64+ tokens where frames are that long: smaller ones compile to Ampere-style MMAs
    instead of Hopper's wgmma at 4 warps, and dQ spills with them."""
    bt, bh, bw = c.kwargs["BT"], c.kwargs["BH"], c.kwargs["BW"]
    if c.kwargs["SLICED"] and (bh + 2 * args["RH"]) * (bw + 2 * args["RW"]) > c.kwargs["BLOCK_N"]:
        return False
    # fp32 inputs (the only ones computed with "ieee" dots) in rows over 512 bytes: one config
    wide = args["DOT_PREC"] == "ieee" and args["BLOCK_D"] > 128 and not INTERPRET
    if wide or c == WIDE_ROWS:
        return wide and c == WIDE_ROWS
    t, h, w = args["T"], args["H"], args["W"]
    if bt > triton.next_power_of_2(t) or bh > 2 * triton.next_power_of_2(h) or bw > 2 * triton.next_power_of_2(w):
        return False
    if bt == 1 and t > 1 and not INTERPRET:
        return False
    if args["n_window"] == 0 and bt * bh * bw < 64 <= h * w and not INTERPRET:
        return False
    return not (args["BLOCK_D"] > 128 and bt * bh * bw > 64)


def fitting(configs, args):
    """The configs that suit the launch (see ``fits``), or else the last general-walk config of
    the list (a 64-query single-frame tile, correct for any launch, if slow on odd grids)."""
    kept = [c for c in configs if fits(c, args)]
    if not kept and fits(WIDE_ROWS, args):  # fp32 rows over 128 elements, a list without it
        kept = [WIDE_ROWS]
    if not kept:
        kept = [c for c in configs if not c.kwargs["SLICED"]][-1:]
    if not kept:
        raise ValueError(f"no Triton config of {configs} can run T, H, W = {args['T']}, {args['H']}, {args['W']} "
                         f"with radii {args['RT']}, {args['RH']}, {args['RW']}")
    return kept


def prune(configs, named_args, **kwargs):
    return fitting(configs, {**named_args, **kwargs})
