"""Checks on a GPU that torch._addmm_activation(use_gelu=True) computes the tanh GELU, which
WanBlock.feed_forward relies on: in float32 (where the tanh and erf forms are far apart compared
to rounding) it must match tanh and not erf; in bf16 it must be as close to float64 as plain
PyTorch's matmul then tanh GELU."""
import torch
import torch.nn.functional as F

torch.manual_seed(0)
torch.backends.cuda.matmul.allow_tf32 = False
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(4096, 1536, device="cuda", dtype=dtype)
    w = torch.randn(8960, 1536, device="cuda", dtype=dtype) / 40
    b = torch.randn(8960, device="cuda", dtype=dtype)
    got = torch._addmm_activation(b, x, w.t(), use_gelu=True).double()
    pre = torch.addmm(b.double(), x.double(), w.double().t())
    tanh, erf = F.gelu(pre, approximate="tanh"), F.gelu(pre)
    plain = F.gelu(torch.addmm(b, x, w.t()), approximate="tanh").double()
    e_t, e_e, e_p = (got - tanh).abs().max().item(), (got - erf).abs().max().item(), (plain - tanh).abs().max().item()
    print(f"{dtype}: vs tanh {e_t:.2e}, vs erf {e_e:.2e}, plain matmul+tanh GELU vs tanh {e_p:.2e}")
    if dtype == torch.float32:
        assert e_t < e_e / 10, "the epilogue is not the tanh GELU"
    assert e_t <= 2 * e_p + 1e-6, "the epilogue is less accurate than matmul then GELU"
print("gelu epilogue: ok")
