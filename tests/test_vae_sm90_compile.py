"""The VAE's Triton kernels compile for Hopper (sm_90) without a GPU, at the launches the VAE makes, with
matrix instructions and without register spills (the interpreter, the CPU tests' way of running them,
never compiles them). Compiled in a subprocess with TRITON_INTERPRET unset."""

import pytest
from compile_script import run_compile_script

pytestmark = pytest.mark.slow  # ~20 s

_SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from oasis import vae_kernels as vk
from oasis_kernels.kernels import aot

def compile_for(kernel, types, cfg):
    cfg = dict(cfg)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages", 2)
    params = kernel.arg_names
    signature, attrs = {}, {}
    for i, name in enumerate(params):
        if name in cfg:
            signature[name] = "constexpr"
            continue
        signature[name] = types.get(name, "i32")
        if signature[name].startswith("*") or (name.startswith("s") and signature[name] == "i32"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                    constexprs={(params.index(k),): v for k, v in cfg.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 128), options=dict(num_warps=warps, num_stages=stages))

rows = []
cases = [
    ("attention_wide D=384", vk._attention_wide_kernel, {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16",
     "scale": "fp32"}, {**vk.attention_wide_config(384), "IEEE": False}),
    ("conv3d_few_in 3->96", vk._conv_few_in_kernel, {"X": "*bf16", "Wp": "*bf16", "Bias": "*fp32", "Y": "*bf16"},
     {**vk.conv_few_in_config(96, 1280), "KT": 3, "KH": 3, "KW": 3, "IEEE": False}),
    ("softmax_rows 14400", vk._softmax_rows_kernel, {"S": "*fp32", "P": "*i32", "scale_log2": "fp32"},
     {"SPLIT": True, "BF16": True, "BLOCK": 4096, "num_warps": 8}),
]
for name, kernel, types, cfg in cases:
    compiled = compile_for(kernel, types, cfg)
    res = aot.resources(compiled)
    sass = aot._cuobjdump(compiled, "-sass")
    rows.append(dict(name=name, regs=res.get("REG"), stack=res.get("STACK", 0), shared=res["dynamic_shared"],
                     mma=sass.count("HGMMA") + sass.count("HMMA")))
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def compiled():
    return run_compile_script(_SCRIPT)


def test_the_vae_kernels_compile_with_matrix_instructions_and_no_spills(compiled):
    assert [r["name"] for r in compiled] == ["attention_wide D=384", "conv3d_few_in 3->96", "softmax_rows 14400"]
    for r in compiled:
        if not r["name"].startswith("softmax_rows"):  # the row pass has no products
            assert r["mma"] > 0, f"{r['name']}: no matrix instructions"
        assert r["stack"] == 0, f"{r['name']}: {r['stack']} B of stack (register spills)"
        assert r["shared"] <= 232448, f"{r['name']}: {r['shared']} B of shared memory (sm_90 has 227 KB)"
