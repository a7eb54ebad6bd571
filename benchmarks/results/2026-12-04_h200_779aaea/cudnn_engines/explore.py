"""Exploration (not committed): cuDNN engines for the VAE's convolutions, and the mid-block attention."""
import json, sys, time, os, statistics, traceback
import torch, torch.nn.functional as F

dev = torch.device("cuda")
out_dir = sys.argv[1]
res = {"convs": [], "attn": []}

def ev_time(fn, reps=5, warm=1):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)

try:
    import cudnn
    print("cudnn frontend", cudnn.__version__, "backend", cudnn.backend_version(), flush=True)
    handle = cudnn.create_handle()
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
except Exception as e:
    traceback.print_exc(); cudnn = None

BF = None if cudnn is None else cudnn.data_type.BFLOAT16

def engines(x, w, y, bias=None, budget=25.0, pad=(0, 1, 1)):
    rows = []
    t0 = time.time()
    g = cudnn.pygraph(io_data_type=BF, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    X = g.tensor(name="X", dim=list(x.shape), stride=list(x.stride()), data_type=BF)
    W = g.tensor(name="W", dim=list(w.shape), stride=list(w.stride()), data_type=BF)
    nd = x.dim() - 2
    Y = g.conv_fprop(image=X, weight=W, pre_padding=list(pad[-nd:]), post_padding=list(pad[-nd:]),
                     stride=[1] * nd, dilation=[1] * nd)
    feeds = {X: x, W: w}
    if bias is not None:
        B = g.tensor(name="B", dim=list(bias.shape), stride=list(bias.stride()), data_type=BF)
        Y = g.bias(name="bias", input=Y, bias=B)
        feeds[B] = bias
    Y.set_output(True).set_data_type(BF).set_dim(list(y.shape)).set_stride(list(y.stride()))
    feeds[Y] = y
    g.validate(); g.build_operation_graph()
    modes = [cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK]
    for m in modes:
        try:
            g.create_execution_plans([m])
        except Exception as e:
            print("  heur", m, "failed:", str(e)[:120])
    try:
        g.check_support()
    except Exception as e:
        print("  check_support:", str(e)[:200])
    n = g.get_execution_plan_count()
    print(f"  {n} plans", flush=True)
    seen = set()
    for i in range(n):
        if time.time() - t0 > budget:
            rows.append({"note": f"budget reached at plan {i} of {n}"}); break
        try:
            name = g.get_plan_name_at_index(i)
            if name in seen:
                continue
            seen.add(name)
            tb = time.time()
            g.build_plan_at_index(i)
            build = time.time() - tb
            ws = torch.empty(max(1, g.get_workspace_size_plan_at_index(i)), device=dev, dtype=torch.uint8)
            ms = ev_time(lambda: g.execute_plan_at_index(feeds, ws, index=i, handle=handle), reps=3)
            rows.append({"plan": name, "ms": ms, "build_s": build, "ws_MB": ws.numel() / 1e6})
        except Exception as e:
            rows.append({"plan_index": i, "error": str(e)[:160]})
    return rows

SH = [  # name, cin, cout, out frames, H, W, 3d?
    ("up3 96->96 720p", 96, 96, 2, 720, 1280, True),
    ("up2 192->192 360p", 192, 192, 2, 360, 640, True),
    ("up1 384->384 180p", 384, 384, 2, 180, 320, True),
    ("conv_out 96->3 720p", 96, 3, 2, 720, 1280, True),
    ("up2 upsample 192->96 2d 720p", 192, 96, 2, 720, 1280, False),
    ("up1 upsample 384->192 2d 360p", 384, 192, 2, 360, 640, False),
]
for name, cin, cout, t, h, w_, three in SH:
    torch.manual_seed(0)
    if three:
        x = torch.randn(1, cin, t + 2, h, w_, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
        w = (torch.randn(cout, cin, 3, 3, 3, device=dev, dtype=torch.bfloat16) * 0.02).contiguous(memory_format=torch.channels_last_3d)
        ref = lambda: F.conv3d(x, w, None, 1, (0, 1, 1))
        bias = torch.randn(1, cout, 1, 1, 1, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    else:
        x = torch.randn(t, cin, h, w_, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(cout, cin, 3, 3, device=dev, dtype=torch.bfloat16) * 0.02).contiguous(memory_format=torch.channels_last)
        ref = lambda: F.conv2d(x, w, None, 1, 1)
        bias = torch.randn(1, cout, 1, 1, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y_ref = ref()
    flops = 2 * cin * cout * (27 if three else 9) * t * h * w_
    row = {"conv": name, "TFLOP": flops / 1e12}
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        row[f"torch_ms_bench{int(bench)}"] = ev_time(ref)
    torch.backends.cudnn.benchmark = False
    print(name, row, flush=True)
    if cudnn is not None:
        for b in (None, bias):
            y = torch.empty_like(y_ref)
            try:
                rows = engines(x, w, y, b)
            except Exception as e:
                traceback.print_exc(); rows = [{"error": str(e)[:300]}]
            ok = [r for r in rows if "ms" in r]
            ok.sort(key=lambda r: r["ms"])
            key = "engines_bias" if b is not None else "engines"
            row[key] = ok + [r for r in rows if "ms" not in r]
            if ok and b is None:
                # correctness of the best plan vs torch
                pass
            for r in ok[:6]:
                print(f"  {key} {r['ms']:.3f} ms {flops / r['ms'] / 1e9:.0f} TFLOP/s {r['plan']}", flush=True)
            bad = [r for r in rows if "ms" not in r]
            if bad:
                print("  not run:", bad[:3], flush=True)
    res["convs"].append(row)
    del x, w, y_ref
    torch.cuda.empty_cache()

# mid-block attention: one frame of 90x160 tokens, 384 channels, one head
for hw in (14400,):
    c = 384
    qkv = torch.randn(1, hw, 3 * c, device=dev, dtype=torch.bfloat16)
    q, k, v = qkv[:, None].chunk(3, dim=-1)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v)
    def manual():
        s = torch.bmm(q[:, 0], k[:, 0].transpose(1, 2), out_dtype=torch.float32)
        p = torch.softmax(s.mul_(c ** -0.5), dim=-1).to(torch.bfloat16)
        return torch.bmm(p, v[:, 0])
    o1 = sdpa(); o2 = manual()
    q64, k64, v64 = (t.double() for t in (q, k, v))
    o64 = torch.softmax(q64[:, 0] @ k64[:, 0].transpose(1, 2) * c ** -0.5, -1) @ v64[:, 0]
    r = {"hw": hw, "sdpa_ms": ev_time(sdpa), "manual_ms": ev_time(manual),
         "sdpa_err": (o1[:, 0].double() - o64).abs().max().item(), "manual_err": (o2.double() - o64).abs().max().item()}
    torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated(); manual(); r["manual_extra_GB"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    print("attn", r, flush=True)
    res["attn"].append(r)

os.makedirs(out_dir, exist_ok=True)
json.dump(res, open(os.path.join(out_dir, "explore.json"), "w"), indent=1)
