"""Host cost of the autograd engine around a Python backward on CUDA (device diagnostic)."""
import sys
import threading
import time
import torch
sys.path.insert(0, "benchmarks")
from host_profile import host_time  # noqa: E402
import oasis_kernels as ok
from oasis_kernels import call as ops

def host_us(fn, n=200):
    return host_time(fn, n, warmup=5)[0] * 1e3

class Ident(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()
    @staticmethod
    def backward(ctx, g):
        return g

x = torch.randn(1000, device="cuda", requires_grad=True)
g = torch.randn(1000, device="cuda")
print(f"trivial Function fwd+grad           {host_us(lambda: torch.autograd.grad(Ident.apply(x), x, g)):8.1f} us")
print(f"x.clone()*2 fwd+grad (C++ nodes)    {host_us(lambda: torch.autograd.grad(x * 2, x, g)):8.1f} us")

plan = ok.RoutingPlan.from_counts((5, 20, 40), 5, 4, 3, (3, 5, 5))
q, k, v = (torch.randn(1, 4000, 12, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
do = torch.randn_like(q)
inner = []
orig = ops._RoutedAttention.backward
def timed_backward(ctx, dout, dlse):
    t = time.perf_counter()
    r = orig(ctx, dout, dlse)
    inner.append((time.perf_counter() - t, threading.current_thread().name))
    return r
ops._RoutedAttention.backward = staticmethod(timed_backward)
for backend in ("auto", "triton"):
    o = ok.routed_attention(q, k, v, plan, backend=backend)
    inner.clear()
    total = host_us(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
    body = sum(t for t, _ in inner[5:]) / len(inner[5:]) * 1e6
    print(f"{backend}: autograd.grad {total:8.1f} us, backward body {body:8.1f} us on thread {inner[-1][1]}")
    # the body alone, called on the main thread
    ctx = o.grad_fn
    print(f"{backend}: body on main thread  {host_us(lambda: orig(ctx, do, None)):8.1f} us")

# where the host time of the backward body and the forward goes: cProfile runs in the thread
# that enables it, so the backward's profile is enabled inside the backward (autograd's worker
# thread on CUDA); sorted by own time
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402

prof_bwd, prof_fwd = cProfile.Profile(), cProfile.Profile()
def profiled_backward(ctx, dout, dlse):
    prof_bwd.enable()
    try:
        return orig(ctx, dout, dlse)
    finally:
        prof_bwd.disable()
ops._RoutedAttention.backward = staticmethod(profiled_backward)
for i in range(205):
    if i >= 5:
        prof_fwd.enable()
    o = ok.routed_attention(q, k, v, plan)
    if i >= 5:
        prof_fwd.disable()
    torch.autograd.grad(o, (q, k, v), do)
torch.cuda.synchronize()
for label, prof in (("backward body (worker thread)", prof_bwd), ("forward with grad (main thread)", prof_fwd)):
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
    print(f"== cProfile of 200 (+5 warm-up in the backward's) calls: {label}")
    print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:6000])
