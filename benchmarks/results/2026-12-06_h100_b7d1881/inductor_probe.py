"""The VAE's norm + SiLU written in PyTorch and compiled by Inductor, at 96 and 192 channels (run from the repository
root on a GPU with TORCH_LOGS=output_code; output and generated code in inductor_probe.log, docs/PERF.md entry 18w)."""
import sys, statistics, torch, torch.nn.functional as F
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from model_bench import cuda_ms
for c, h, w in ((96, 720, 1280), (192, 360, 640)):
    x = torch.randn(1, c, 2, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    g = torch.ones(c, 1, 1, 1, device="cuda", dtype=torch.float32)
    def f(x):
        y = F.normalize(x.float(), dim=1) * g * 2.0
        return F.silu(y).to(torch.bfloat16)
    cf = torch.compile(f)
    cf(x)
    ms = statistics.median(cuda_ms(lambda: cf(x), 20, warmup=3))
    print(f"c={c} inductor norm+silu: {ms:.4f} ms {2 * x.numel() * 2 / ms / 1e6:.0f} GB/s", flush=True)
