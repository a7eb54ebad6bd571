"""Decode A/B in interleaved rounds: WanVAE.conv_kernel cudnn / cuda / cuda-192 (latents [9,90,160], chunk 1,
2-frame pieces), 5 timed decodes per variant per round, the card metered (benchmarks/card_power.py)."""
import json, statistics, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "."); sys.path.insert(0, "benchmarks")
from attn_bench import environment
from card_power import CardMeter, describe
from oasis import WanVAE

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
kernels = sys.argv[3].split(",") if len(sys.argv) > 3 else ["cudnn", "cuda", "cuda-192"]
dev = torch.device("cuda")
torch.manual_seed(0)
vae = WanVAE(encoder=False).to(dev, torch.bfloat16).eval().requires_grad_(False).channels_last()
vae.autotune = True
z = torch.randn(1, 16, 9, 90, 160, device=dev, dtype=torch.bfloat16)
res = {"env": environment(dev), "rounds": {k: [] for k in kernels}, "cards": {k: [] for k in kernels}, "diff": {}}
with torch.no_grad():
    ref = None
    for k in kernels:
        vae.conv_kernel = k
        y = vae.decode(z, 1, piece_frames=2); torch.cuda.synchronize()
        if ref is None:
            ref = y
        else:
            res["diff"][k] = (y.float() - ref.float()).abs().max().item()
        del y
    for r in range(rounds):
        for k in kernels:
            vae.conv_kernel = k
            vae.decode(z, 1, piece_frames=2); torch.cuda.synchronize()
            with CardMeter(dev) as m:
                for _ in range(5):
                    t0 = time.perf_counter(); vae.decode(z, 1, piece_frames=2); torch.cuda.synchronize()
                    res["rounds"][k].append(time.perf_counter() - t0)
            res["cards"][k].append(m.summary(calls=5))
            print(r, k, [round(x, 4) for x in res["rounds"][k][-5:]], describe(res["cards"][k][-1]), flush=True)
md = [f"# Decode A/B by conv_kernel, {res['env'].get('gpu')}, {res['env'].get('commit')}", "",
      "| conv_kernel | s (median of all) | min | J a call (rounds) | max abs diff vs cudnn |", "|---|---|---|---|---|"]
for k in kernels:
    v = res["rounds"][k]
    js = ", ".join(f"{c['J_per_call']:.0f}" for c in res["cards"][k])
    md.append(f"| {k} | {statistics.median(v):.4f} | {min(v):.4f} | {js} | {res['diff'].get(k, 0):.4g} |")
(out / "ab.json").write_text(json.dumps(res, indent=1, default=str)); (out / "ab.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
