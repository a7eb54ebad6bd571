# An exploration as it ran (3592bc6, H200): every configuration of cuDNN heuristics A+FALLBACK and B
# for five of the VAE decoder's convolutions on a 2-frame piece, then engine knobs varied one at a time.
# exploration: does any engine configuration outside cuDNN's heuristic list run the VAE convolutions faster?
import itertools, json, os, statistics, sys, time, torch
import cudnn
from oasis.vae_conv import _channels_last_strides
dev = torch.device("cuda")
h = cudnn.create_handle()
cudnn.set_stream(handle=h, stream=torch.cuda.current_stream().cuda_stream)
GEOMS = [("96->96 720p", 96, 96, 720, 1280), ("192->192 360p", 192, 192, 360, 640),
         ("384->384 180p", 384, 384, 180, 320), ("384->384 90p", 384, 384, 90, 160), ("96->3 720p", 96, 3, 720, 1280)]
out = {}
def build(x, w, y_shape, modes):
    io = cudnn.data_type.BFLOAT16; f32 = cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=h)
    X = g.tensor(name="x", dim=list(x.shape), stride=_channels_last_strides(x.shape), data_type=io)
    W = g.tensor(name="w", dim=list(w.shape), stride=_channels_last_strides(w.shape), data_type=io)
    Y = g.conv_fprop(image=X, weight=W, pre_padding=[0, 1, 1], post_padding=[0, 1, 1], stride=[1, 1, 1], dilation=[1, 1, 1], compute_data_type=f32)
    Y.set_output(True).set_data_type(io).set_dim(y_shape).set_stride(_channels_last_strides(y_shape))
    g.validate(); g.build_operation_graph(); g.create_execution_plans(modes); g.check_support()
    return g, (X, W, Y)
def timed(g, i, feeds, reps=3):
    g.build_plan_at_index(i)
    ws = torch.empty(max(g.get_workspace_size_plan_at_index(i), 1), dtype=torch.uint8, device=dev)
    g.execute_plan_at_index(feeds, ws, index=i, handle=h); torch.cuda.synchronize()
    r = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.execute_plan_at_index(feeds, ws, index=i, handle=h); b.record(); b.synchronize(); r.append(a.elapsed_time(b))
    return statistics.median(r)
for name, ci, co, H, W_ in GEOMS:
    x = torch.randn(1, ci, 4, H, W_, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(co, ci, 3, 3, 3, device=dev, dtype=torch.bfloat16) * 0.02).contiguous(memory_format=torch.channels_last_3d)
    ys = [1, co, 2, H, W_]
    y = torch.empty(ys, device=dev, dtype=torch.bfloat16, memory_format=torch.channels_last_3d)
    flop = 2 * co * ci * 27 * 2 * H * W_
    rec = {"listed": [], "explored": []}
    for modes, label in (([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK], "A+FALLBACK"), ([cudnn.heur_mode.B], "B")):
        try:
            g, (X, Wt, Y) = build(x, w, ys, modes)
            feeds = {X: x, Wt: w, Y: y}
            n = g.get_execution_plan_count()
            names = []
            for i in range(n):
                try:
                    names.append((g.get_plan_name_at_index(i), timed(g, i, feeds)))
                except Exception as e:
                    names.append((g.get_plan_name_at_index(i), str(e)[:80]))
            rec["listed"].append({"modes": label, "plans": names})
            print(name, label, n, "plans; best", min((t for _, t in names if isinstance(t, float)), default=None), flush=True)
        except Exception as e:
            print(name, label, "failed", str(e)[:200], flush=True)
    # knob space of the listed engines, around the fastest listed configuration of each engine
    g, (X, Wt, Y) = build(x, w, ys, [cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    feeds = {X: x, Wt: w, Y: y}
    seeds = {}
    for i in range(g.get_execution_plan_count()):
        try:
            eng, knobs = g.get_engine_and_knobs_at_index(i)
        except Exception as e:
            print("engine/knobs query failed", e); break
        if eng not in seeds:
            seeds[eng] = (knobs, timed(g, i, feeds))
    for eng, (knobs, t0) in seeds.items():
        try:
            info = g.get_knobs_for_engine(eng)
        except Exception as e:
            print("get_knobs_for_engine failed", eng, e); continue
        if name.startswith("96->96"):
            print("engine", eng, "knobs", repr(info)[:600], "seed", knobs, flush=True)
        ranges = {}
        for k in (info if isinstance(info, (list, tuple)) else getattr(info, "values", lambda: info)()):
            d = {a: getattr(k, a) for a in dir(k) if not a.startswith("_") and not callable(getattr(k, a))}
            kt = d.get("type", d.get("knob_type"))
            lo, hi, st = d.get("min_value", d.get("minValue")), d.get("max_value", d.get("maxValue")), d.get("stride", 1)
            if kt is None or lo is None or hi is None:
                print("knob fields", d); continue
            ranges[kt] = list(range(lo, hi + 1, max(st, 1)))[:48]
        base, best = dict(knobs), t0
        start = time.perf_counter()
        for rnd in range(2):
            for kt, vals in ranges.items():
                for v in vals:
                    if time.perf_counter() - start > 60: break
                    trial = dict(base); trial[kt] = v
                    if trial == base: continue
                    try:
                        g.create_execution_plan(eng, trial)
                        i = g.get_execution_plan_count() - 1
                        t = timed(g, i, feeds)
                        rec["explored"].append({"engine": eng, "knobs": {str(a): b for a, b in trial.items()}, "name": g.get_plan_name_at_index(i), "ms": t})
                        if t < best:
                            best, base = t, trial
                    except Exception:
                        pass
        print(name, "engine", eng, "listed best", round(t0, 3), "explored best", round(best, 3), {str(a): b for a, b in base.items()}, "TFLOP/s", round(flop / best / 1e9), flush=True)
    out[name] = rec
    json.dump(out, open(os.environ["OUT"] + "/knobs.json", "w"), default=str)
