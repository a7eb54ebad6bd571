# Device diagnostic, run on an H100 (2026-12-05) from the tree 06ac536 + vae-combined 4dfd600; output in attention_products_error.log
# Device diagnostic (run from the combined tree): errors of attention_by_products, grouped and one frame at a time,
# against float64, beside SDPA in the input dtype and the same math in plain PyTorch in the input dtype.
import sys, torch, torch.nn.functional as F
from oasis import vae_kernels as vk
ATTN = [(2, 37, 384), (1, 70, 64), (1, 20, 208), (3, 5, 16), (1, 130, 256), (2, 4096, 384), (1, 14400, 384)]
print("torch", torch.__version__, "bf16 reduced reduction", torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
worst = {}
for case, (n, L, d) in enumerate(ATTN):
    for seed in range(4 if L < 5000 else 1):
        gen = torch.Generator().manual_seed(90 + case + 1000 * seed)
        for dtype in (torch.bfloat16, torch.float16):
            qkv = (torch.randn(n, L, 3 * d, generator=gen) * 2).to("cuda", dtype)
            q, k, v = qkv.chunk(3, dim=-1)
            want = F.scaled_dot_product_attention(*(t.double()[:, None] for t in (q, k, v)))[:, 0]
            e = lambda x: (x.double() - want).abs().max().item()
            got = vk.attention_by_products(q, k, v)
            one = vk.attention_by_products(q, k, v, scores_bytes=1)
            sdpa = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
            naive = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * d ** -0.5, dim=-1) @ v
            s32 = torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
            p = torch.softmax(s32 * d ** -0.5, dim=-1).to(dtype)
            pv32 = torch.bmm(p, v, out_dtype=torch.float32).to(dtype)
            pv16 = torch.bmm(p, v)
            r = dict(got=e(got), one=e(one), sdpa=e(sdpa), naive=e(naive), torch_p_pv16=e(pv16), torch_p_pv32=e(pv32),
                     same_bits=bool(torch.equal(got, one)))
            print(case, (n, L, d), seed, str(dtype)[6:], " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
