# Device diagnostic, run on an H100 (2026-12-05); output in p_split_error.log
# Device diagnostic: is rounding P to 16 bits the products' extra error? P split into hi + lo (both 16-bit), one
# product of K = 2L; against float64, beside SDPA in the input dtype.
import torch, torch.nn.functional as F
for (n, L, d) in [(2, 37, 384), (1, 4096, 384), (1, 14400, 384)]:
    for seed in range(2):
        gen = torch.Generator().manual_seed(7 + seed)
        for dtype in (torch.bfloat16, torch.float16):
            q, k, v = (torch.randn(n, L, 3 * d, generator=gen) * 2).to("cuda", dtype).chunk(3, dim=-1)
            want = F.scaled_dot_product_attention(*(t.double()[:, None] for t in (q, k, v)))[:, 0]
            e = lambda x: (x.double() - want).abs().max().item()
            sdpa = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
            p32 = torch.softmax(torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32) * d ** -0.5, dim=-1)
            hi = p32.to(dtype); lo = (p32 - hi.float()).to(dtype)
            one = torch.bmm(hi, v)
            split = torch.bmm(torch.cat([hi, lo], -1), torch.cat([v, v], 1))
            split32 = torch.bmm(torch.cat([hi, lo], -1), torch.cat([v, v], 1), out_dtype=torch.float32).to(dtype)
            exact_p = torch.bmm(p32.double(), v.double()).to(dtype)
            print((n, L, d), seed, str(dtype)[6:], f"sdpa={e(sdpa):.4g} p16={e(one):.4g} split={e(split):.4g} "
                  f"split_f32out={e(split32):.4g} p_exact={e(exact_p):.4g}", flush=True)
