# A probe as it ran (3592bc6, H200): where the OasisVSR call's time outside its three stages goes
import sys, time, torch
sys.path.insert(0, "benchmarks")
from model_bench import build_dit, ROUTED
from oasis import WanConfig
from oasis.pipeline import OasisVSR, _to_uint8
from oasis.projector import LatentProjector
from oasis.vae import WanDecoder
from oasis.wan_vae import WanVAEDecoder
dev = torch.device("cuda"); torch.manual_seed(0); cfg = WanConfig()
model = build_dit(cfg, dev)
vae = WanVAEDecoder().to(device=dev, dtype=torch.bfloat16).eval().requires_grad_(False)
pipe = OasisVSR(model, LatentProjector().to(dev), WanDecoder(vae), context=model.context)
model.set_routing([ROUTED] * cfg.num_layers)
video = torch.randint(0, 256, (33, 180, 320, 3), dtype=torch.uint8)
def t(fn, n=3):
    r = []
    for _ in range(n):
        torch.cuda.synchronize(); s = time.perf_counter(); y = fn(); torch.cuda.synchronize(); r.append(time.perf_counter() - s)
    return y, [round(v * 1e3, 1) for v in r]
with torch.no_grad():
    out, ms = t(lambda: pipe(video, progress=False)); print("whole call ms", ms)
    x = video.permute(3, 0, 1, 2)[None].to(dev).float().div(127.5).sub(1)
    y, ms = t(lambda: pipe.restore_clip(x)); print("restore_clip ms", ms)
    u, ms = t(lambda: _to_uint8(y[0])); print("to_uint8 ms", ms)
    _, ms = t(lambda: torch.empty(u.shape, dtype=torch.uint8).copy_(u)); print("D2H fresh pageable ms", ms)
    host = torch.empty(u.shape, dtype=torch.uint8); host.fill_(0)
    _, ms = t(lambda: host.copy_(u)); print("D2H touched pageable ms", ms)
    _, ms = t(lambda: torch.empty(u.shape, dtype=torch.uint8).fill_(0)); print("host alloc+touch ms", ms)
    _, ms = t(lambda: torch.empty(u.shape, dtype=torch.uint8, pin_memory=True)); print("pinned alloc (cached after 1st) ms", ms)
    pinned = torch.empty(u.shape, dtype=torch.uint8, pin_memory=True)
    _, ms = t(lambda: pinned.copy_(u)); print("D2H pinned ms", ms)
    s = torch.cuda.Stream()
    def pieces():
        for i in range(0, 33, 4):
            pinned[i:i + 4].copy_(u[i:i + 4], non_blocking=True)
    _, ms = t(pieces); print("D2H pinned pieces ms", ms)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pipe(video, progress=False); torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
    prof.export_chrome_trace(__import__("os").environ["OUT"] + "/vsr_trace.json")
