"""Decode and encode A/B in interleaved rounds by WanVAE.conv_kernel (latents [9,90,160] <-> 33 frames 720p; decode
chunk 1, 2-frame pieces; encode chunk 1), 5 timed calls per variant per round, the card metered
(benchmarks/card_power.py). argv: out rounds variants(comma: a conv_kernel, '+inline': side_copies False) [what: decode,encode]"""
import json, statistics, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "."); sys.path.insert(0, "benchmarks")
from attn_bench import environment
from card_power import CardMeter, describe
from oasis import WanVAE

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
kernels = sys.argv[3].split(",") if len(sys.argv) > 3 else ["cudnn", "auto", "cuda"]
what = sys.argv[4].split(",") if len(sys.argv) > 4 else ["decode", "encode"]
dev = torch.device("cuda")
torch.manual_seed(0)
vae = WanVAE().to(dev, torch.bfloat16).eval().requires_grad_(False).channels_last()
vae.autotune = True
z = torch.randn(1, 16, 9, 90, 160, device=dev, dtype=torch.bfloat16)
video = torch.rand(1, 3, 33, 720, 1280, device=dev, dtype=torch.bfloat16) * 2 - 1
calls = {"decode": lambda: vae.decode(z, 1, piece_frames=2), "encode": lambda: vae.encode(video, 1)}
res = {"env": environment(dev), "rounds": {}, "cards": {}, "diff": {}}
md = [f"# VAE A/B by conv_kernel, {res['env'].get('gpu')}, {res['env'].get('commit')}", "",
      "| call | conv_kernel | s (median of all) | min | J a call (rounds) | max abs diff vs the first |", "|---|---|---|---|---|---|"]
for w in what:
  run = calls[w]
  res["rounds"][w], res["cards"][w], res["diff"][w] = {k: [] for k in kernels}, {k: [] for k in kernels}, {}
  R, C, D = res["rounds"][w], res["cards"][w], res["diff"][w]
  with torch.no_grad():
      ref = None
      for k in kernels:
          vae.conv_kernel, vae.side_copies = k.split("+")[0], not k.endswith("+inline")
          y = run(); torch.cuda.synchronize()
          if ref is None:
              ref = y
          else:
              D[k] = (y.float() - ref.float()).abs().max().item()
          del y
      for r in range(rounds):
          for k in kernels:
              vae.conv_kernel, vae.side_copies = k.split("+")[0], not k.endswith("+inline")
              run(); torch.cuda.synchronize()
              with CardMeter(dev) as m:
                  for _ in range(5):
                      t0 = time.perf_counter(); run(); torch.cuda.synchronize()
                      R[k].append(time.perf_counter() - t0)
              C[k].append(m.summary(calls=5))
              print(w, r, k, [round(x, 4) for x in R[k][-5:]], describe(C[k][-1]), flush=True)
  for k in kernels:
    v = R[k]
    js = ", ".join(f"{c['J_per_call']:.0f}" for c in C[k])
    md.append(f"| {w} | {k} | {statistics.median(v):.4f} | {min(v):.4f} | {js} | {D.get(k, 0):.4g} |")
  del run
(out / "ab.json").write_text(json.dumps(res, indent=1, default=str)); (out / "ab.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
