"""Training-data throughput: HQ clips and their degradations (``oasis.data.PairDataset``) per second.

For each mode (consistent, inconsistent) it loads ``--clips`` pairs of the paper's size (17 frames
320x640 -> 80x160 LQ, synthetic HQ clips; a video folder with ``--videos``) with ``--workers``
DataLoader processes, and reports clips/s and the seconds one clip costs a worker. The issue's bar:
at least 4x the clips/s a training step consumes; divide a step's clips (batch x accumulate x GPUs)
by its seconds and compare.

    python benchmarks/degrade_bench.py --workers 0 2 --out benchmarks/results/<date>_<card>_<commit>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attn_bench import environment  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--size", type=int, nargs=3, default=[17, 320, 640], metavar=("F", "H", "W"))
    p.add_argument("--videos", help="a folder of HQ videos instead of synthetic clips")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from oasis.data import ClipSpec, PairDataset, SyntheticVideos, VideoFolder
    from oasis.degrade import Degradation

    spec = ClipSpec(*args.size)
    source = VideoFolder(args.videos, spec) if args.videos else SyntheticVideos(spec)
    rows = []
    for mode in ("consistent", "inconsistent"):
        data = PairDataset(source, Degradation(), mode)
        for workers in args.workers:
            loader = torch.utils.data.DataLoader(data, batch_sampler=[[i] for i in range(args.clips)],
                                                 num_workers=workers)
            start = time.perf_counter()
            n = sum(1 for _ in loader)
            s = time.perf_counter() - start
            row = {"mode": mode, "workers": workers, "clips": n, "s": s, "clips_per_s": n / s,
                   "worker_s_per_clip": s * max(workers, 1) / n}
            rows.append(row)
            print(json.dumps(row), flush=True)
    res = {"env": environment(torch.device("cpu")), "cpu_count": os.cpu_count(), "size": args.size,
           "source": args.videos or "synthetic", "rows": rows}
    md = [f"# Training-data throughput, {res['env'].get('cpu')} x{os.cpu_count()}, {res['env']['date'][:10]}, "
          f"commit {res['env']['commit'][:7]}", "",
          f"{args.size[0]} frames {args.size[1]}x{args.size[2]} -> x4 LQ, {res['source']} clips, {args.clips} per "
          "row, DataLoader workers (0: the main process).", "",
          "| mode | workers | clips/s | worker s per clip |", "|---|---|---|---|"]
    md += [f"| {r['mode']} | {r['workers']} | {r['clips_per_s']:.2f} | {r['worker_s_per_clip']:.2f} |" for r in rows]
    print("\n".join(md))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "degrade_bench.json").write_text(json.dumps(res, indent=1, default=str))
        (args.out / "degrade_bench.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
