"""oasis/dit_kernels.py: the DiT block's fused row passes (Triton; under the interpreter on the CPU)
against the torch expressions they replace, and in the model."""

import os

import pytest
import torch

from oasis import dit_kernels as dk

pytestmark = pytest.mark.skipif(dk.triton is None, reason="needs triton")


def _interpreted_or_cuda():
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors reach Triton only under the interpreter (conftest sets it without CUDA)")
    return "cpu"


def _close(got, want, dtype):
    """Within a unit in the last place of the values (and of 1, for values near 0 after a cancellation):
    the same roundings in another summation order. The interpreter truncates its bfloat16 conversions
    (a GPU rounds to nearest), and a truncated rounding feeds the next: four units there."""
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    if dtype == torch.bfloat16 and not got.is_cuda:
        ulp *= 4
    err = (got.float() - want.float()).abs()
    bound = ulp * (want.float().abs() + 1)
    assert torch.isfinite(got.float()).all() and (err <= bound).all(), err.max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["modulated", "gated_affine", "plain_modulated"])
def test_row_norm_is_the_torch_expression(dtype, kind):
    device = _interpreted_or_cuda()
    g = torch.Generator().manual_seed(3)
    b, n, c = 2, 7, 96  # C not a power of two: the masked tail of the row
    x = torch.randn(b, n, c, generator=g) * 3 + 1
    x[0, 0] = 0.25 + 1e-3 * torch.randn(c, generator=g)  # a row whose spread is near eps: eps matters
    x = x.to(device, dtype)
    r = torch.randn(b, n, c, generator=g).to(device, dtype)
    per_batch = [torch.randn(b, 1, c, generator=g).to(device) for _ in range(3)]
    w, bias = torch.randn(c, generator=g).to(device), torch.randn(c, generator=g).to(device)
    kw = {"modulated": dict(shift=per_batch[0], scale=per_batch[1] * 0.1),
          "gated_affine": dict(residual=r, gate=per_batch[2], residual_kind=dk.GATED, weight=w, bias=bias),
          "plain_modulated": dict(residual=r, residual_kind=dk.PLAIN, shift=per_batch[0], scale=per_batch[1])}[kind]
    want = dk.row_norm_reference(x, 1e-5, **kw)
    got = dk.row_norm(x, 1e-5, **kw)
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.dtype == dtype
        _close(a, e, dtype)
    if kind == "modulated":  # the modulation is applied (a check that could fail)
        plain = dk.row_norm_reference(x, 1e-5)[1]
        assert (plain.float() - got[1].float()).abs().max() > 0.1
        other_eps = dk.row_norm_reference(x, 1e-3, **kw)[1]  # and eps where the model adds it
        assert (other_eps.float() - got[1].float()).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 24])  # 24: half a head (12) not a power of two
def test_qk_norm_rope_is_the_torch_expression(dtype, d):
    device = _interpreted_or_cuda()
    g = torch.Generator().manual_seed(5)
    b, n, heads = 2, 6, 3
    q = torch.randn(b, n, heads * d, generator=g).to(device, dtype)
    k = (torch.randn(b, n, heads * d, generator=g) * 4).to(device, dtype)
    wq, wk = torch.randn(heads * d, generator=g).to(device), torch.randn(heads * d, generator=g).to(device)
    angle = torch.rand(n, d // 2, generator=g) * 6
    cos, sin = angle.cos().to(device), angle.sin().to(device)
    want = dk.qk_norm_rope_reference(q, k, wq, wk, cos, sin, heads, 1e-6)
    got = dk.qk_norm_rope(q, k, wq, wk, cos, sin, heads, 1e-6)
    for a, e in zip(got, want):
        assert a.shape == (b, n, heads, d) and a.dtype == dtype
        _close(a, e, dtype)
    swapped = dk.qk_norm_rope_reference(q, k, wq, wk, sin, cos, heads, 1e-6)[0]  # the RoPE matters here
    assert (swapped.float() - got[0].float()).abs().max() > 0.1
    with pytest.raises(ValueError, match="cos and sin"):
        dk.qk_norm_rope(q, k, wq, wk, cos[:-1], sin[:-1], heads, 1e-6)


def test_the_fused_passes_inside_the_dit(monkeypatch):
    """A tiny float16 DiT under no_grad with the fused passes forced on (the interpreter on the CPU):
    the same output as its torch expressions; with gradients the torch path runs."""
    device = _interpreted_or_cuda()
    from oasis import dit
    from oasis.config import WanConfig

    cfg = WanConfig(dim=48, ffn_dim=96, num_heads=3, num_layers=2, text_dim=32, text_len=8, freq_dim=32)
    torch.manual_seed(0)
    model = dit.WanDiT(cfg).init_weights().to(device)
    model.set_context(torch.randn(cfg.text_len, cfg.text_dim, device=device) * 0.1)
    model = model.cast(torch.float16)  # the modulations and norms stay float32, as in use
    latents = torch.randn(1, cfg.in_channels, 3, 8, 12, device=device, dtype=torch.float16)
    t = torch.full((1,), 500.0, device=device)
    with torch.no_grad():
        monkeypatch.setattr(dit, "fused_rows_apply", lambda x: False)
        want = model(latents, t)
        calls = []

        def counted(real):
            def call(*a, **k):
                calls.append(real.__name__)
                return real(*a, **k)
            return call

        monkeypatch.setattr(dit, "fused_rows_apply", lambda x: not torch.is_grad_enabled())
        monkeypatch.setattr(dit, "row_norm", counted(dit.row_norm))
        monkeypatch.setattr(dit, "qk_norm_rope", counted(dit.qk_norm_rope))
        got = model(latents, t)
    # norm1, norm3, norm2 and q/k of every block
    assert calls.count("row_norm") == 3 * cfg.num_layers and calls.count("qk_norm_rope") == cfg.num_layers
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dynamic", [False, None])
def test_the_fused_passes_compile_in_the_regions(dynamic):
    """On CUDA the regions compile with the fused passes inside (fullgraph: no graph break) and give
    the eager torch path's numbers, for two grids and a batch of 2."""
    from oasis import dit
    from oasis.config import WanConfig

    cfg = WanConfig(dim=96, ffn_dim=192, num_heads=3, num_layers=2, text_dim=32, text_len=8, freq_dim=32)
    torch.manual_seed(0)
    model = dit.WanDiT(cfg).init_weights().cuda()
    model.set_context(torch.randn(cfg.text_len, cfg.text_dim, device="cuda") * 0.1)
    model = model.cast(torch.bfloat16)
    t = torch.full((2,), 500.0, device="cuda")
    for shape in ((3, 8, 12), (5, 6, 10)):
        latents = torch.randn(2, cfg.in_channels, *shape, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            model.compile_regions(False)
            with torch.enable_grad():  # the torch path (the fused one needs no autograd)
                want = model(latents, t).detach()
            model.compile_regions(fullgraph=True, dynamic=dynamic)
            got = model(latents, t)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


_SM90 = r"""
import json, os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from oasis import dit_kernels as dk

def compile_sm90(kernel, types, constexprs, num_warps):
    names = kernel.arg_names
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if signature[n].startswith("*")}
    src = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 128), options=dict(num_warps=num_warps))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"]); f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", out)}

row = {n: "*bf16" for n in ("X", "R", "XOut", "Y")}
row.update({n: "*fp32" for n in ("G", "W", "Bias", "Shift", "Scale")}, N="i32", C="i32", eps="fp32")
qk = {n: "*bf16" for n in ("Q", "K", "WQ", "WK", "QOut", "KOut")}
qk.update(Cos="*fp32", Sin="*fp32", N="i32", C="i32", eps="fp32")
rows = []
for kind, affine, mod in ((0, False, True), (1, True, False), (2, False, True)):
    res = compile_sm90(dk._row_norm_kernel, row, dict(RESIDUAL=kind, AFFINE=affine, MODULATE=mod, BLOCK=2048), 4)
    rows.append(dict(name=f"row_norm {kind}", **res))
res = compile_sm90(dk._qk_norm_rope_kernel, qk, dict(HEADS=12, HALF=64, HP=16, HALFP=64), 4)
rows.append(dict(name="qk_norm_rope", **res))
print(json.dumps(rows))
"""


@pytest.mark.slow
def test_the_kernels_compile_for_sm90_without_spills():
    """The Wan 1.3B shapes (C = 1536, 12 heads of 128) compile for Hopper with Triton's own ptxas, no
    GPU needed (the interpreter compiles nothing), with no spilled registers."""
    from compile_script import run_compile_script

    rows = run_compile_script(_SM90, timeout=600)
    assert len(rows) == 4
    for r in rows:
        assert r.get("STACK", 0) == 0 and r["REG"] <= 255, r
