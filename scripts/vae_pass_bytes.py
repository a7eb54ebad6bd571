"""Bytes each memory-bound pass of WanVAE.decode moves at 720p, and, given a GPU profile of the same
decode, the rate each pass ran at: how far the passes beside the convolutions are from the card's memory
bandwidth (docs/PERF.md entry 18i).

    python scripts/vae_pass_bytes.py [--latent 9 12 20] [--piece 2]
        [--profile benchmarks/results/2026-12-05_h200_0e9de22/ab/main_1/vae_bench.md] [--out DIR]

The decode runs on the CPU in bf16 channels-last at a small latent size and every count is scaled by
the area ratio to 90x160 latents (33 frames 720x1280): the passes are per pixel, so the bytes scale
with the area exactly (the calls do not change). Counted per call, as the GPU kernels move them:
- ``norm_silu`` (Triton ``_norm_silu_kernel``): x read, the result written, the causal cache's frames
  written a second time where the pass writes them (``tail``); a residual block's pending sum: the residual
  read and the sum written (``residual``, ``sum_out``, docs/PERF.md entry 18t);
- ``add_bias_`` (Triton ``_add_bias_kernel``): x read and written, the residual read;
- ``interleave_phases`` (Triton ``_interleave_phases_kernel``): the upsamplers' four phases read, the output
  written (as many values; entry 18s);
- ``Tensor.copy_`` between two tensors (the profile's ``Memcpy DtoD``): read and written.
The profile: a ``vae_bench.md`` whose kernel table names these kernels (``benchmarks/vae_bench.py``);
its rows of the first decode variant are read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import oasis.vae_conv as vae_conv  # noqa: E402
import oasis.vae_kernels as vae_kernels  # noqa: E402
import oasis.wan_vae as wan_vae  # noqa: E402
from oasis.wan_vae import WanVAE, WanVAEConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from attn_bench import environment  # noqa: E402  (the runs' common record: date, commit, dirty, versions)

#: the profile's kernel name for each pass
KERNELS = {"norm_silu": "_norm_silu_kernel", "add_bias": "_add_bias_kernel", "interleave": "_interleave_phases_kernel",
           "copy": "Memcpy DtoD"}


def _bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class _Copies(TorchDispatchMode):
    """Counts ``aten.copy_`` between tensors outside the two Triton passes (on the CPU their torch
    expressions copy too; on the GPU those copies do not exist)."""

    def __init__(self, counts: Counter, calls: Counter):
        super().__init__()
        self.counts, self.calls, self.paused = counts, calls, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default and not self.paused:
            self.counts["copy"] += 2 * _bytes(args[0])
            self.calls["copy"] += 1
        return func(*args, **(kwargs or {}))


def count(latent, piece: int) -> tuple[Counter, Counter, Counter]:
    """(bytes per pass, calls per pass, bytes per (pass, channels)) of one decode at ``latent``."""
    counts, calls, by_width = Counter(), Counter(), Counter()
    mode = _Copies(counts, calls)
    norm_silu, add_bias_, interleave = wan_vae.norm_silu, vae_conv.add_bias_, vae_kernels.interleave_phases

    def counted(what, fn, moved):
        """``fn`` with the bytes ``moved(*args, **kwargs)`` says it moves counted under ``what`` (None: it
        does no pass), its own torch ops kept out of the copies' count."""
        def wrapper(x, *args, **kwargs):
            n = moved(x, *args, **kwargs)
            if n is not None:
                counts[what] += n
                calls[what] += 1
                by_width[what, x.shape[1]] += n
            mode.paused += 1
            try:
                return fn(x, *args, **kwargs)
            finally:
                mode.paused -= 1
        return wrapper

    counted_norm = counted("norm_silu", norm_silu, lambda x, *a, tail=None, residual=None, sum_out=None, **k: (
        2 * _bytes(x) + _bytes(tail) + _bytes(residual) + _bytes(sum_out)))
    counted_add = counted("add_bias", add_bias_, lambda x, bias, residual=None: (
        None if bias is None and residual is None else 2 * _bytes(x) + _bytes(residual)))
    # the phases hold the output's values: (H + 1)(W + 1) pixels of 4 Co channels read, 4 HW Co written
    counted_weave = counted("interleave", interleave, lambda o, bias=None: 2 * _bytes(o))

    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig(), encoder=False).to(torch.bfloat16).channels_last()
    z = torch.randn(1, 16, *latent, dtype=torch.bfloat16)
    # add_bias_ is called from both modules (wan_vae: a pending sum summed in a pass of its own)
    wan_vae.norm_silu, vae_conv.add_bias_, wan_vae.add_bias_ = counted_norm, counted_add, counted_add
    vae_kernels.interleave_phases = counted_weave
    try:
        with torch.no_grad(), mode:
            vae.decode(z, chunk=1, piece_frames=piece)
    finally:
        wan_vae.norm_silu, vae_conv.add_bias_, wan_vae.add_bias_ = norm_silu, add_bias_, add_bias_
        vae_kernels.interleave_phases = interleave
    return counts, calls, by_width


def profile_rows(path: Path) -> dict[str, tuple[float, int]]:
    """{pass: (seconds, calls)} from the first decode kernel table of a vae_bench.md."""
    rows, inside = {}, False
    for line in path.read_text().splitlines():
        if line.startswith("Kernels of ") and "(decode)" in line:
            if inside:
                break
            inside = True
            continue
        if inside and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            name = cells[0].strip("`")
            for what, kernel in KERNELS.items():
                if name.startswith(kernel):
                    rows[what] = (float(cells[1]), int(cells[2]))
    if not rows:
        raise ValueError(f"{path}: no decode kernel table naming {sorted(KERNELS.values())}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", nargs=3, type=int, default=[9, 12, 20], metavar=("T", "H", "W"))
    p.add_argument("--piece", type=int, default=2, help="piece_frames of the decode (default 2)")
    p.add_argument("--profile", type=Path, default=None, help="a vae_bench.md of the same decode on a GPU")
    p.add_argument("--out", type=Path, default=None, help="directory for vae_pass_bytes.json and .md")
    a = p.parse_args(argv)
    if min(a.latent) < 1 or a.piece < 1:
        p.error(f"--latent and --piece must be positive, got {a.latent} and {a.piece}")
    if a.profile is not None and not a.profile.is_file():
        p.error(f"--profile {a.profile}: no such file")
    if a.out is not None and a.out.exists() and not a.out.is_dir():
        p.error(f"--out {a.out} is a file")
    profile = profile_rows(a.profile) if a.profile is not None else {}
    start = time.perf_counter()
    counts, calls, by_width = count(a.latent, a.piece)
    scale = (90 * 160) / (a.latent[1] * a.latent[2])
    env = environment(torch.device("cpu"))
    result = {"date": env["date"], "commit": env["commit"], "dirty": env["dirty"], "device": "cpu", "latent": a.latent, "piece_frames": a.piece, "scaled_to": [a.latent[0], 90, 160],
              "cpu_seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
              "profile": None if a.profile is None else str(a.profile), "passes": {}}
    lines = [f"Passes of WanVAE.decode (chunk 1, {a.piece}-frame pieces), bytes counted on the CPU at latents "
             f"{a.latent} and scaled to {[a.latent[0], 90, 160]}" + (f"; times from {a.profile}" if profile else ""),
             "", "| pass | calls | GB | GPU s | TB/s |", "|---|---|---|---|---|"]
    for what in KERNELS:
        gb = counts[what] * scale / 1e9
        row = {"calls": calls[what], "gigabytes": round(gb, 2),
               "by_channels": {str(c): round(v * scale / 1e9, 2) for (w, c), v in sorted(by_width.items()) if w == what}}
        secs = calls_seen = None
        if what in profile:
            secs, calls_seen = profile[what]
            row.update(gpu_seconds=secs, gpu_calls=calls_seen, tb_per_s=round(gb / 1e3 / secs, 2))
        result["passes"][what] = row
        lines.append(f"| {what} | {calls[what]}" + (f" (GPU {calls_seen})" if calls_seen is not None else "")
                     + f" | {gb:.1f} | " + (f"{secs:.4f} | {gb / 1e3 / secs:.2f} |" if secs else "- | - |"))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "vae_pass_bytes.json").write_text(json.dumps(result, indent=1) + "\n")
        (a.out / "vae_pass_bytes.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
