"""Checks on a GPU that torch._addmm_activation(use_gelu=True) is the tanh GELU (what WanBlock.feed_forward
relies on), against float64, and that it is not the erf GELU."""
import torch
import torch.nn.functional as F

torch.manual_seed(0)
x = torch.randn(4096, 1536, device="cuda", dtype=torch.bfloat16)
w = torch.randn(8960, 1536, device="cuda", dtype=torch.bfloat16) / 40
b = torch.randn(8960, device="cuda", dtype=torch.bfloat16)
got = torch._addmm_activation(b, x, w.t(), use_gelu=True).double()
pre = torch.addmm(b.double(), x.double(), w.double().t())
tanh, erf = F.gelu(pre, approximate="tanh"), F.gelu(pre)
plain = F.gelu(torch.addmm(b, x, w.t()), approximate="tanh").double()
e_t, e_e, e_p = [(got - r).abs().max().item() for r in (tanh, erf)] + [(plain - tanh).abs().max().item()]
print(f"vs tanh {e_t:.3e}  vs erf {e_e:.3e}  plain bf16 vs tanh {e_p:.3e}  max|tanh-erf| {(tanh - erf).abs().max():.3e}")
assert e_t <= 2 * e_p, "epilogue is not the tanh GELU within bf16 rounding"
