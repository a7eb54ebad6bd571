import time, statistics, sys, json
import torch
from oasis import vae_conv
from oasis.vae_conv import conv, _ConvPlan, _frontend
cudnn = _frontend()
dev = "cuda"
out = {}
def geom(cin, cout, t, h, w):
    x = torch.randn(1, cin, t + 2, h, w, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    wt = (torch.randn(cout, cin, 3, 3, 3, device=dev, dtype=torch.bfloat16) * 0.02).contiguous(memory_format=torch.channels_last_3d)
    b = torch.randn(cout, device=dev)
    return x, wt, b
for name, g in (("96ch 720p 2f", (96, 96, 2, 720, 1280)), ("384ch 90x160 1f", (384, 384, 1, 90, 160)), ("192ch 360p 2f", (192, 192, 2, 360, 640))):
    x, w, b = geom(*g)
    r = {}
    key = (0, torch.bfloat16, tuple(x.shape), tuple(w.shape), (1, 1, 1), (0, 1, 1), True, False)
    t0 = time.perf_counter()
    p = _ConvPlan(key, x, w, True, False, (1, 1, 1), (0, 1, 1))
    r["graph_s"] = time.perf_counter() - t0
    y = torch.empty(p.out_shape, device=dev, dtype=torch.bfloat16, memory_format=torch.channels_last_3d)
    feeds = p._feeds(x, w, b, None, y)
    ws = torch.empty(64 << 20, dtype=torch.uint8, device=dev)
    per = []
    for i in p.candidates:
        try:
            t0 = time.perf_counter(); p.graph.build_plan_at_index(i); tb = time.perf_counter() - t0
            t0 = time.perf_counter(); p._execute(i, feeds, ws); torch.cuda.synchronize(); t1 = time.perf_counter() - t0
            a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); p._execute(i, feeds, ws); e.record(); e.synchronize()
            per.append({"i": i, "name": p.graph.get_plan_name_at_index(i), "build_s": tb, "first_exec_s": t1, "ms": a.elapsed_time(e)})
        except Exception as ex:
            per.append({"i": i, "error": str(ex)[:100]})
    r["candidates"] = per
    ok = [c for c in per if "ms" in c]
    best = min(ok, key=lambda c: c["ms"])
    r["best_index"] = best["i"]; r["best_ms"] = best["ms"]; r["first_ms"] = ok[0]["ms"]
    r["sum_build_s"] = sum(c["build_s"] for c in ok); r["sum_first_exec_s"] = sum(c["first_exec_s"] for c in ok)
    # per-call CPU overhead: dict path vs ordered path vs F.conv3d
    bi = best["i"]
    torch.cuda.synchronize()
    def cpu_per_call(fn, n=100):
        fn(); torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n): fn()
        t = (time.perf_counter() - t0) / n
        torch.cuda.synchronize()
        return t
    r["dict_exec_us"] = cpu_per_call(lambda: p.graph.execute_plan_at_index(feeds, ws, index=bi, handle=p.handle)) * 1e6
    r["dict_exec_with_set_stream_us"] = cpu_per_call(lambda: p._execute(bi, feeds, ws)) * 1e6
    uids = [T.get_uid() for T in p.order]
    bufs = list(feeds.values())
    try:
        r["ordered_exec_us"] = cpu_per_call(lambda: p.graph.execute_plan_at_index(bufs, ws, index=bi, handle=p.handle, tensor_uids=uids)) * 1e6
    except Exception as ex:
        r["ordered_error"] = str(ex)[:300]
    try:
        p.graph.select_plan(bi)
        r["select_execute_ordered_us"] = cpu_per_call(lambda: p.graph.execute(bufs, ws, handle=p.handle, tensor_uids=uids)) * 1e6
        r["select_execute_dict_us"] = cpu_per_call(lambda: p.graph.execute(feeds, ws, handle=p.handle)) * 1e6
    except Exception as ex:
        r["select_error"] = str(ex)[:300]
    r["feeds_us"] = cpu_per_call(lambda: p._feeds(x, w, b, None, y)) * 1e6
    r["torch_conv_us"] = cpu_per_call(lambda: torch.nn.functional.conv3d(x, w, None, 1, (0, 1, 1))) * 1e6
    r["set_stream_us"] = cpu_per_call(lambda: cudnn.set_stream(handle=p.handle, stream=torch.cuda.current_stream().cuda_stream)) * 1e6
    print(name, json.dumps({k: v for k, v in r.items() if k != "candidates"}), flush=True)
    print("  order:", [(c["i"], round(c.get("ms", -1), 2), round(c.get("first_exec_s", -1), 3)) for c in per], flush=True)
    out[name] = r
json.dump(out, open(sys.argv[1], "w"), indent=1)
