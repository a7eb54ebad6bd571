"""The norm pass (b7d1881's three-slice kernel) at 96 and 192 channels with parts of its work left out, against a
copy (run from the repository root on a GPU; output in norm_probe.log, docs/PERF.md entry 18w)."""
import sys, statistics, torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from model_bench import cuda_ms
from oasis import vae_kernels as vk
for c, h, w in ((96, 720, 1280), (192, 360, 640)):
    x = torch.randn(1, c, 2, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    out = torch.empty_like(x); tail = torch.empty_like(x); g = torch.ones(c, device="cuda", dtype=torch.bfloat16); b = torch.zeros_like(g)
    one = x.numel() * 2
    for name, kw, moved in (("full", dict(bias=b, tail=tail), 3), ("no tail", dict(bias=b), 2), ("no tail no silu", dict(bias=b, silu=False), 2),
                            ("no tail no bias", dict(), 2)):
        ms = statistics.median(cuda_ms(lambda: vk.norm_silu_triton(x, g, 2.0, out=out, **kw), 20, warmup=3))
        print(f"c={c} {name}: {ms:.4f} ms {moved * one / ms / 1e6:.0f} GB/s", flush=True)
    ms = statistics.median(cuda_ms(lambda: out.copy_(x), 20, warmup=3)); print(f"c={c} copy {2 * one / ms / 1e6:.0f} GB/s")
