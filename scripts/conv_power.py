"""The VAE's heaviest cuDNN convolutions under the card's power cap: each engine configuration's time in a short
burst (what ``WanVAE.autotune`` times) against its time and energy when run back to back, and the decode with
each geometry on its best sustained configuration against the tuner's choice.

    python scripts/conv_power.py --out DIR [--seconds 0.8] [--keep 8] [--rounds 2]

A 720p decode draws the card's whole power limit (700 W on the H100 and H200) and runs with the SM clock held
~20% under its maximum (docs/PERF.md entry 18z), while the tuner times each configuration for a few
milliseconds, at full clock. Under the cap a configuration's time follows its energy per call, so the fastest
in a burst need not be the fastest in the decode. For each geometry (shapes of a 2-frame piece with its 2
cached frames, channels-last bf16, random data):
- every configuration cuDNN lists (heuristics A and B) timed in a burst (median of 3 after one untimed run);
- the ``--keep`` fastest of them, each after 0.4 s idle, run back to back for ``--seconds``: the median time of
  a call over the second half, the energy per call there (NVML's energy counter) and the median SM clock;
- where :func:`oasis.vae_cuda.why_not` takes the geometry, our CUDA kernel (``conv_kernel="cuda"``: exact 96- or
  192-wide output tiles, the 2 cached frames read from their own tensor) the same two ways, as row ``cuda``;
- the decode (latents [9, 90, 160], chunk 1, 2-frame pieces, median of 5; ``conv_kernel="cudnn"``, every
  convolution on cuDNN) with the tuner's choices and with
  these geometries on their best sustained configuration, in turns (``--rounds``), the card's energy, power
  and SM clock measured meanwhile (``benchmarks/card_power.py``).
Writes ``conv_power.json`` and ``conv_power.md`` under ``--out``. Needs a CUDA device and the cuDNN frontend.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from attn_bench import environment  # noqa: E402
from card_power import CardMeter, describe  # noqa: E402

#: (name, input [C, T, H, W] with the 2 cached frames, output channels): the decode's 3x3x3 convolutions with
#: the most time (docs/PERF.md 18m's count: 96 calls at 96 channels, 720p; 96 at 192, 360p; 40 at 384, 180p; 90
#: at 384 on groups of 3 latent frames)
GEOMETRIES = [
    ("96 -> 96, 720p", (96, 4, 720, 1280), 96),
    ("192 -> 192, 360p", (192, 4, 360, 640), 192),
    ("384 -> 384, 180p", (384, 4, 180, 320), 384),
    ("384 -> 384, 90p, group of 3", (384, 5, 90, 160), 384),
]
STRIDE, PADDING = (1, 1, 1), (0, 1, 1)


def timed_ms(call) -> float:
    """One call's GPU time by CUDA events."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    call()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def burst_ms(call) -> float:
    """As the tuner times a configuration: one untimed call, then the median of 3."""
    call()
    return statistics.median(timed_ms(call) for _ in range(3))


def sustained(call, seconds) -> dict:
    """``call`` run back to back for ``seconds`` after 0.4 s idle: over its second half (the card at its cap by
    then) the median ms a call, the mJ a call and the median SM clock (:class:`card_power.CardMeter`)."""
    torch.cuda.synchronize()
    time.sleep(0.4)

    def run(span):
        times, start = [], time.perf_counter()
        while time.perf_counter() - start < span:
            times.append(timed_ms(call))
        return times

    first = run(seconds / 2)
    with CardMeter() as meter:
        second = run(seconds / 2)
    card = meter.summary(calls=len(second))
    return {"ms": statistics.median(second), "mJ_per_call": card["J_per_call"] * 1e3, "sm_MHz": card["sm_MHz"][1],
            "calls": len(second), "first_ms": statistics.median(first[:3])}


def cuda_row(vae_cuda, x, wt, seconds) -> dict:
    """Our CUDA kernel on the geometry ``x`` (its first 2 frames the cache, read from their own tensor) and ``wt``,
    a bias added as in the decode: burst and sustained as a cuDNN configuration's, or why it does not take it."""
    prev, new = x[:, :, :2].contiguous(memory_format=torch.channels_last_3d), x[:, :, 2:].contiguous(
        memory_format=torch.channels_last_3d)
    why = vae_cuda.why_not(new, wt, prev=prev)
    if why is None and not vae_cuda.library()[0]:
        why = vae_cuda.library()[1]
    if why is not None:
        return {"error": why}
    bias = torch.zeros(wt.shape[0], device=x.device, dtype=torch.float32)
    out = torch.empty((x.shape[0], wt.shape[0], *new.shape[2:]), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last_3d)

    def call():
        vae_cuda.conv3d_k3(new, wt, bias, prev=prev, out=out)

    return {"name": "cuda (oasis_vae.conv3d_k3)", "burst_ms": burst_ms(call), "sustained": sustained(call, seconds)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=0.8)
    p.add_argument("--keep", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("conv_power.py: needs a CUDA device")
    from oasis import WanVAE, vae_conv, vae_cuda

    if vae_conv.frontend_missing():
        sys.exit(f"conv_power.py: {vae_conv.frontend_missing()}")
    dev = torch.device("cuda")
    if (missing := CardMeter(dev).error) is not None:  # the energy and clocks are what this script measures
        sys.exit(f"conv_power.py: {missing}")
    torch.manual_seed(0)
    vae = WanVAE().to(dev, torch.bfloat16).eval().requires_grad_(False).channels_last()
    # every 3x3x3 geometry on cuDNN, so that each is tuned and its configurations can be listed ("auto", the
    # default, runs the 192-wide ones on our kernel: their rows here are its row against cuDNN's)
    vae.autotune, vae.conv_kernel = True, "cudnn"
    z = torch.randn(1, 16, 9, 90, 160, device=dev, dtype=torch.bfloat16)
    res = {"env": environment(dev), "seconds": args.seconds, "geometries": {}}
    args.out.mkdir(parents=True, exist_ok=True)

    def decode():
        return vae.decode(z, 1, piece_frames=2)

    cl = torch.channels_last_3d
    with torch.no_grad():
        decode()
        decode()  # every geometry tuned (or its recorded choice built)
        overrides = {}
        for name, (ci, t, h, w), co in GEOMETRIES:
            x = torch.randn(1, ci, t, h, w, device=dev).bfloat16().contiguous(memory_format=cl)
            wt = (torch.randn(co, ci, 3, 3, 3, device=dev) * (27 * ci) ** -0.5).bfloat16().contiguous(memory_format=cl)
            with vae_conv.tuning():
                plan = vae_conv._plan(x, wt, STRIDE, PADDING, PADDING)
            if plan is None or plan.best is None:
                res["geometries"][name] = {"error": "no tuned plan for this geometry in the decode"}
                continue
            out = torch.empty(plan.out_shape, dtype=x.dtype, device=dev, memory_format=cl)
            feeds = plan._feeds(x, wt, out)
            rows = {}
            for i in plan.candidates:
                try:
                    plan.graph.build_plan_at_index(i)
                    size = plan.graph.get_workspace_size_plan_at_index(i)
                    if size > vae_conv.WORKSPACE_LIMIT:
                        continue
                    ws = torch.empty(max(size, 1), dtype=torch.uint8, device=dev)
                    rows[i] = {"name": plan.graph.get_plan_name_at_index(i),
                               "burst_ms": burst_ms(lambda: plan._execute(i, feeds, ws)), "workspace": size}
                except Exception as e:  # a configuration that does not build or run here
                    rows[i] = {"error": str(e).splitlines()[0][:120]}
            ran = sorted((i for i in rows if "burst_ms" in rows[i]), key=lambda i: rows[i]["burst_ms"])
            for i in ran[:args.keep]:
                ws = torch.empty(max(rows[i]["workspace"], 1), dtype=torch.uint8, device=dev)
                rows[i]["sustained"] = sustained(lambda: plan._execute(i, feeds, ws), args.seconds)
            best = min(ran[:args.keep], key=lambda i: rows[i]["sustained"]["ms"])
            res["geometries"][name] = {"tuned": plan.best, "sustained_best": best,
                                       "rows": {str(i): r for i, r in rows.items()}}
            res["geometries"][name]["cuda"] = cuda_row(vae_cuda, x, wt, args.seconds)
            if best != plan.best:
                overrides[plan.key] = (plan, best, plan.graph.get_workspace_size_plan_at_index(best))
            print(name, json.dumps(res["geometries"][name]["rows"].get(str(plan.best))),
                  json.dumps(res["geometries"][name]["rows"][str(best)]), flush=True)
            del x, wt, out, feeds

        tuned = {key: (plan.best, plan.workspace_size) for key, (plan, _, _) in overrides.items()}

        def use(choice):
            for key, (plan, best, size) in overrides.items():
                plan.best, plan.workspace_size = (best, size) if choice == "sustained" else tuned[key]
                plan.graph.build_plan_at_index(plan.best)

        walls = {"tuned": [], "sustained": []}
        cards = {"tuned": [], "sustained": []}
        for _ in range(args.rounds):
            for choice in ("tuned", "sustained"):
                use(choice)
                decode()
                torch.cuda.synchronize()
                with CardMeter(dev) as meter:
                    for _ in range(5):
                        t0 = time.perf_counter()
                        decode()
                        torch.cuda.synchronize()
                        walls[choice].append(time.perf_counter() - t0)
                cards[choice].append(meter.summary(calls=5))
        use("tuned")
        res["decode"] = {c: {"s": statistics.median(v), "all_s": v, "card": cards[c]} for c, v in walls.items()}
        res["overridden"] = len(overrides)
    (args.out / "conv_power.json").write_text(json.dumps(res, indent=1, default=str))
    md = [f"# The VAE's convolutions under the power cap, {res['env'].get('gpu')}, {res['env'].get('commit')}", "",
          "| geometry | configuration | burst ms | sustained ms | mJ a call | SM MHz | |", "|---|---|---|---|---|---|---|"]
    for name, g in res["geometries"].items():
        if "rows" not in g:
            md.append(f"| {name} | {g['error']} | | | | | |")
            continue
        for i, r in g["rows"].items():
            s = r.get("sustained")
            if s is None:
                continue
            mark = ", ".join(m for m, hit in (("tuned", int(i) == g["tuned"]), ("best sustained", int(i) == g["sustained_best"])) if hit)
            md.append(f"| {name} | {i} `{r['name'][:60]}` | {r['burst_ms']:.3f} | {s['ms']:.3f} | {s['mJ_per_call']:.0f} | "
                      f"{s['sm_MHz'] or 0:.0f} | {mark} |")
        c = g["cuda"]
        if "error" in c:
            md.append(f"| {name} | our CUDA kernel: {c['error'][:80]} | | | | | |")
        else:
            s = c["sustained"]
            md.append(f"| {name} | our CUDA kernel | {c['burst_ms']:.3f} | {s['ms']:.3f} | {s['mJ_per_call']:.0f} | "
                      f"{s['sm_MHz'] or 0:.0f} | |")
    md += ["", f"Decode (latents [9, 90, 160], chunk 1, 2-frame pieces), {res['overridden']} geometries overridden:", "",
           "| choice | s (median) | the card in each round |", "|---|---|---|"]
    for c, d in res["decode"].items():
        md.append(f"| {c} | {d['s']:.4f} | {'; '.join(describe(x) for x in d['card'])} |")
    (args.out / "conv_power.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
