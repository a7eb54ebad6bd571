"""Host time per call of each piece of a routed S forward/backward (device diagnostic).

Each piece runs 200 times back to back with no synchronisation inside the loop; the GPU work of
every piece here is shorter than its host time, so the loop time is the host cost.
"""
import sys
import torch
sys.path.insert(0, "benchmarks")
from host_profile import host_time  # noqa: E402
import oasis_kernels as ok
from oasis_kernels import call as call_module
ops = call_module
from oasis_kernels.kernels import local_attention as la
from oasis_kernels.kernels.tile_configs import FWD_CONFIGS
from oasis_kernels.backends.triton_local import HeadTable
from oasis_kernels.plan import Mode

def host_us(fn, n=200):
    enqueue, wall = host_time(fn, n, warmup=5)
    return enqueue * 1e3, wall * 1e3

grid = (5, 20, 40)
plan = ok.RoutingPlan.from_counts(grid, 5, 4, 3, (3, 5, 5))
N = plan.num_tokens
q, k, v = (torch.randn(1, N, 12, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
do = torch.randn_like(q)
qd, kd, vd = q.detach(), k.detach(), v.detach()
scale = 128 ** -0.5
out = torch.empty_like(qd); lse = torch.empty(1, 12, N, device="cuda")
g5 = [x[:, :, 0:5] for x in (qd, kd, vd)]
from oasis_kernels.backends import BACKENDS
cud = BACKENDS["sdpa_cudnn"]
o5, l5 = cud._fwd(*g5, scale)
contig = [x[:, :, 0:5].transpose(1, 2).contiguous() for x in (qd, kd, vd)]
groups_local = [(Mode.INTRA, (5, 6, 7, 8)), (Mode.WINDOW, (9, 10, 11))]
heads = HeadTable.of(plan, groups_local, q.device)
table, nw, rad = heads.on(q.device), heads.n_window, heads.radii
dq, dk, dv = (torch.empty_like(x) for x in (qd, kd, vd))
args = plan.as_op_args()
call_auto = ok.prepare(qd, plan)
call_triton = ok.prepare(qd, plan, backend="triton")
parts = {
    "torch.empty [1,N,12,128]": lambda: torch.empty(1, N, 12, 128, device="cuda", dtype=torch.bfloat16),
    "copy_ into 5-head slice": lambda: out[:, :, 0:5].copy_(o5),
    "aten cudnn fwd, contiguous BHSD 5 heads": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(*contig, None, True, 0.0, False, False, scale=scale),
    "aten cudnn fwd, 5-head slice view (ours)": lambda: cud._fwd(*g5, scale),
    "aten flash fwd, 5-head slice view": lambda: BACKENDS["sdpa_flash"]._fwd(*g5, scale),
    "DenseBackend.forward global 5 (cudnn+copies)": lambda: cud.forward(qd, kd, vd, out, lse, plan, [(Mode.GLOBAL, (0, 1, 2, 3, 4))], scale),
    "DenseBackend.backward global 5": lambda: cud.backward(do, qd, kd, vd, out, lse, dq, dk, dv, plan, [(Mode.GLOBAL, (0, 1, 2, 3, 4))], scale, True),
    "triton fwd launch (autotuned)": lambda: la.local_attention_forward(qd, kd, vd, out, lse, table, nw, grid, rad, scale),
    "triton fwd launch (fixed config)": lambda: la.local_attention_forward(qd, kd, vd, out, lse, table, nw, grid, rad, scale, config=FWD_CONFIGS[0]),
    "triton bwd launches (delta, dQ + dK/dV)": lambda: la.local_attention_backward(do, qd, kd, vd, out, lse, dq, dk, dv, table, nw, grid, rad, scale),
    "RoutedCall.forward auto (Python path)": lambda: call_auto.forward(qd, kd, vd),
    "RoutedCall.forward triton (Python path)": lambda: call_triton.forward(qd, kd, vd),
    "custom op fwd (no grad) auto": lambda: ops.routed_attention_fwd(qd, kd, vd, *args, scale, "auto", False, ok.settings().as_key()),
    "routed_attention no_grad auto": lambda: ok.routed_attention(qd, kd, vd, plan),
    "RoutedCall.backward auto (Python path)": lambda: call_auto.backward(do, qd, kd, vd, out, lse),
    "RoutedCall.backward triton (Python path)": lambda: call_triton.backward(do, qd, kd, vd, out, lse),
    "custom op bwd auto": lambda: ops.routed_attention_bwd(do, qd, kd, vd, out, lse, *args, scale, "auto", False, ok.settings().as_key()),
}
s_side = torch.cuda.Stream()
def _fork_join():
    cur = torch.cuda.current_stream(); s_side.wait_stream(cur)
    with torch.cuda.stream(s_side):
        pass
    cur.wait_stream(s_side)
parts["stream fork+join (no work)"] = _fork_join
parts["call lookup (signature + LRU)"] = lambda: call_module.lookup(qd, kd, vd, tuple(map(tuple, args)), scale, "auto", False)
parts["ok.routed_attention arg prep (check_inputs)"] = lambda: ok.api._prepare(qd, kd, vd, plan, None)
def _sdpa_step():
    qq, kk, vv = (x.detach()[:, :, 0:5].transpose(1, 2).requires_grad_() for x in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv)
    torch.autograd.grad(o, (qq, kk, vv), do[:, :, 0:5].transpose(1, 2))
parts["SDPA 5 heads fwd+bwd (F.sdpa + autograd.grad)"] = _sdpa_step
def _grad_fwd():
    return ok.routed_attention(q, k, v, plan)
parts["routed_attention with grad (fwd only)"] = _grad_fwd
def _step():
    o = ok.routed_attention(q, k, v, plan); torch.autograd.grad(o, (q, k, v), do)
parts["routed_attention fwd+bwd auto"] = _step
def _step_t():
    o = ok.routed_attention(q, k, v, plan, backend="triton"); torch.autograd.grad(o, (q, k, v), do)
parts["routed_attention fwd+bwd triton"] = _step_t
_o = ok.routed_attention(q, k, v, plan)
parts["autograd.grad only (retain_graph)"] = lambda: torch.autograd.grad(_o, (q, k, v), do, retain_graph=True)
for name, fn in list(parts.items()):
    with torch.no_grad() if "grad" not in name and "fwd+bwd" not in name else torch.enable_grad():
        e, w = host_us(fn)
    print(f"{name:<48} host {e:8.1f} us   wall {w:8.1f} us", flush=True)

from torch.profiler import profile, ProfilerActivity
for label, fn in (("auto", _step), ("triton", _step_t)):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10): fn()
        torch.cuda.synchronize()
    print(f"== GPU kernels of routed_attention fwd+bwd {label}, per call")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:14]:
        if e.self_device_time_total > 0:
            print(f"{e.self_device_time_total / 10:8.1f} us  x{e.count // 10:<3} {e.key[:90]}")
