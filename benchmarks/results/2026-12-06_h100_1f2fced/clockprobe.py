"""Scratch probe: decode walls and GPU spans rep by rep, back to back then after 3 s idle, with nvidia-smi samples."""
import json, subprocess, sys, time, os
import torch
sys.path.insert(0, '.')
from oasis import WanVAE
torch.manual_seed(0)
vae = WanVAE().to('cuda', torch.bfloat16).eval().requires_grad_(False).channels_last()
vae.autotune = True
z = torch.randn(1, 16, 9, 90, 160, device='cuda', dtype=torch.bfloat16)
out = os.environ.get('OUT', 'out')
with torch.no_grad():
    for _ in range(2):
        vae.decode(z, 1, piece_frames=2)
    torch.cuda.synchronize()
    smi = subprocess.Popen(['nvidia-smi', '--query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active',
                            '--format=csv,noheader,nounits', '-lms', '20'], stdout=open(f'{out}/smi.csv', 'w'), stderr=subprocess.STDOUT)
    time.sleep(1.0)
    rows = []
    def rep(tag):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(); t0 = time.perf_counter(); a.record()
        vae.decode(z, 1, piece_frames=2); b.record(); torch.cuda.synchronize()
        rows.append((tag, time.time(), time.perf_counter() - t0, a.elapsed_time(b) / 1e3))
    for i in range(12):
        rep('hot')
    for i in range(4):
        time.sleep(3.0); rep('after 3 s idle')
    smi.terminate(); smi.wait()
for r in rows:
    print(f"{r[0]:>16} t={r[1]:.2f} wall {r[2]:.4f} span {r[3]:.4f}")
json.dump(rows, open(f'{out}/clockprobe.json', 'w'))
