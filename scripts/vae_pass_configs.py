"""The VAE's norm pass (``oasis.vae_kernels.norm_silu``) and bias pass (``add_bias_``) at the decoder's shapes, in
every tile and warp count tried, on a GPU: which configuration moves the bytes fastest (docs/PERF.md entry 18t).

Shapes: 2 frames channels-last bf16 at 96 channels 720x1280, 192 at 360x640 and 384 at 180x320 (a piece of the
decode's last three stages). The norm pass reads ``x`` and writes the normalised frames and a 2-frame cache tail;
with ``--residual`` it also reads a residual and writes the sum (a residual block's output summed on the way).
GB/s counts the bytes the pass must move; each row is the median of ``--reps`` event-timed launches. On a Hopper GPU
the CUDA pass (``oasis.vae_cuda.norm_silu``, docs/PERF.md entry 18y) is timed beside Triton's tiles, on the same
tensors; ``--default-tile`` times Triton's default tile only.

    python scripts/vae_pass_configs.py --out $OUT/vae_pass_configs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from model_bench import cuda_ms  # noqa: E402

from oasis import vae_cuda, vae_kernels  # noqa: E402

SHAPES = [(96, 720, 1280), (192, 360, 640), (384, 180, 320)]
BLOCK_S = [8, 16, 32, 64, 128]
WARPS = [2, 4, 8]


def median_ms(fn, reps):
    return statistics.median(cuda_ms(fn, reps, warmup=3))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path)
    p.add_argument("--default-tile", action="store_true", help="Triton's default tile only (no sweep)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    rows = []
    real_tiles, real_warps = vae_kernels._channel_tiles, vae_kernels._norm_warps
    for c, h, w in SHAPES:
        fmt = torch.channels_last_3d
        x = torch.randn(1, c, 2, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=fmt)
        r = torch.randn_like(x)
        out = torch.empty_like(x)
        tail = torch.empty_like(x)
        gamma = torch.ones(c, device="cuda", dtype=torch.bfloat16)
        bias = torch.zeros(c, device="cuda", dtype=torch.bfloat16)
        one = x.numel() * 2
        default = real_tiles(c)[1], real_warps(real_tiles(c)[0])
        for residual in (False, True):
            extra = dict(residual=r, sum_out=x) if residual else {}
            moved = (5 if residual else 3) * one  # x (and r) read; out, tail (and the sum) written
            why = vae_cuda.norm_why_not(x, out=out, tail=tail, **extra)
            if why is None:
                ms = median_ms(lambda: vae_cuda.norm_silu(x, gamma, c ** 0.5, out=out, bias=bias, tail=tail, **extra),
                               a.reps)
                rows.append(dict(pass_="norm_cuda", channels=c, residual=residual, ms=ms, GBps=moved / ms / 1e6))
                print(f"norm c={c} res={residual:d} CUDA pass: {ms:.4f} ms {moved / ms / 1e6:7.0f} GB/s", flush=True)
            else:
                print(f"norm c={c} res={residual:d} CUDA pass not run: {why}", flush=True)
            for bs in BLOCK_S:
                for nw in WARPS:
                    if a.default_tile and (bs, nw) != default:
                        continue
                    vae_kernels._channel_tiles = lambda cc, bs=bs: (real_tiles(cc)[0], bs)
                    vae_kernels._norm_warps = lambda bc, nw=nw: nw
                    try:
                        if residual:
                            def fn():
                                vae_kernels.norm_silu_triton(x, gamma, c ** 0.5, out=out, bias=bias, tail=tail,
                                                             residual=r, sum_out=x)
                            moved = 5 * one  # x, r read; sum, out, tail written
                        else:
                            def fn():
                                vae_kernels.norm_silu_triton(x, gamma, c ** 0.5, out=out, bias=bias, tail=tail)
                            moved = 3 * one
                        ms = median_ms(fn, a.reps)
                    except Exception as e:  # a configuration that does not compile (registers)
                        rows.append(dict(pass_="norm", channels=c, residual=residual, block_s=bs, warps=nw,
                                         error=str(e)[:200]))
                        continue
                    finally:
                        vae_kernels._channel_tiles, vae_kernels._norm_warps = real_tiles, real_warps
                    rows.append(dict(pass_="norm", channels=c, residual=residual, block_s=bs, warps=nw, ms=ms,
                                     GBps=moved / ms / 1e6, default=(bs, nw) == default))
                    print(f"norm c={c} res={residual:d} BLOCK_S={bs:3d} warps={nw}: {ms:.4f} ms "
                          f"{moved / ms / 1e6:7.0f} GB/s{'  (default)' if (bs, nw) == default else ''}", flush=True)
        ms = median_ms(lambda: vae_kernels.add_bias_(x, bias, r), a.reps)
        rows.append(dict(pass_="add_bias", channels=c, ms=ms, GBps=3 * one / ms / 1e6))
        print(f"add_bias c={c}: {ms:.4f} ms {3 * one / ms / 1e6:7.0f} GB/s", flush=True)
        ms = median_ms(lambda: out.copy_(x), a.reps)
        rows.append(dict(pass_="copy", channels=c, ms=ms, GBps=2 * one / ms / 1e6))
        print(f"copy c={c}: {ms:.4f} ms {2 * one / ms / 1e6:7.0f} GB/s", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
