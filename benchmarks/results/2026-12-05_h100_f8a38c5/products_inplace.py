# Run on an H100 (2026-12-05), once per tree; output in products_inplace.jsonl
# Device check (run once per tree, PYTHONPATH selects it): attention_by_products on the VAE's middle attention,
# 9 frames of 14,400 tokens, D = 384, bf16: GPU time (median of 5 after a warm-up, CUDA events), the peak
# memory above the inputs and output, and the error of one frame against float64 beside SDPA's.
import json, statistics, sys, torch, torch.nn.functional as F
from oasis import vae_kernels as vk
name = sys.argv[1]
torch.manual_seed(0)
n, L, d = 9, 14400, 384
q, k, v = (torch.randn(n, L, 3 * d, device="cuda") * 2).to(torch.bfloat16).chunk(3, dim=-1)
q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
vk.attention_by_products(q, k, v)
times = []
for _ in range(5):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(); a.record(); out = vk.attention_by_products(q, k, v); b.record(); torch.cuda.synchronize()
    times.append(a.elapsed_time(b))
del out
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
out = vk.attention_by_products(q, k, v); torch.cuda.synchronize()
peak = (torch.cuda.max_memory_allocated() - base) / 2**30
want = F.scaled_dot_product_attention(*(t[:1].double()[:, None] for t in (q, k, v)))[:, 0]
sdpa = F.scaled_dot_product_attention(q[:1, None], k[:1, None], v[:1, None])[:, 0]
err = lambda x: (x.double() - want).abs().max().item()
r = dict(tree=name, gpu=torch.cuda.get_device_name(), ms=statistics.median(times), ms_all=times,
         peak_GiB_above_inputs=peak, err=err(out[:1]), err_sdpa=err(sdpa))
print(json.dumps(r))
