"""Every Triton kernel variant the autotuner may pick compiles for Hopper (sm_90), without a GPU.

The interpreter (the CPU tests' way of running the kernels) never compiles them, so compiler
failures (e.g. Triton's pipeliner rejecting a loop) would otherwise show only on the device.
The compile runs in a subprocess with TRITON_INTERPRET unset; see oasis_kernels/kernels/aot.py.
"""

import pytest
from compile_script import run_compile_script

pytestmark = pytest.mark.slow  # the fixture compiles every variant: ~40 s warm, more with a cold Triton cache

_SCRIPT = r"""
import json
from oasis_kernels.kernels import aot
rows = []
for name, kernel, constexprs, cfg in aot.variants():
    compiled = aot.compile_for(kernel, constexprs, dtype=aot.dtype_of(name), num_warps=cfg.num_warps,
                               num_stages=cfg.num_stages)
    res = aot.resources(compiled)
    loops = aot.loop_mix(compiled, top=2)
    mma = [sum(ops[o] for o in ("HGMMA", "HMMA")) for _, ops in loops]
    rows.append(dict(name=name, config=str(cfg), stack=res.get("STACK", 0), regs=res.get("REG"),
                     shared=res["dynamic_shared"], loops=[n for n, _ in loops], mma=mma))
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def compiled():
    return run_compile_script(_SCRIPT)


def test_every_variant_compiles_for_sm90(compiled):
    names = {r["name"] for r in compiled}
    assert names == {"fwd", "fwd_intra", "fwd_wide", "bwd", "bwd_intra", "bwd_wide", "bwd_delta", "stats_global",
                     "stats_local"}, names
    for r in compiled:
        assert r["shared"] <= 232448, f"{r['name']} {r['config']}: {r['shared']} B of shared memory (sm_90 has 227 KB)"
        if r["name"].endswith("_wide"):
            continue  # fp32 with "ieee" dots: FMA units, no matrix instructions (correctness path)
        if r["name"] == "bwd_delta":
            continue  # a row reduction: no loop, no matrix instructions
        assert r["loops"] and r["mma"][0] > 0, f"{r['name']} {r['config']}: no loop with matrix instructions"
        if r["name"] == "fwd":  # a mixed launch: the halo and the frame loop
            assert len(r["loops"]) == 2 and min(r["mma"]) > 0, \
                f"{r['name']} {r['config']}: loops {r['loops']} with {r['mma']} matrix instructions"
        if r["name"] == "bwd":  # dQ's and dK/dV's halo and frame loops
            assert len(r["loops"]) >= 2 and min(r["mma"]) > 0, \
                f"{r['name']} {r['config']}: loops {r['loops']} with {r['mma']} matrix instructions"


def test_spills_stay_within_their_budgets(compiled):
    # The backward's kernel (dQ and dK/dV programs) holds dK/dV's two 64 x 128 float32
    # accumulators and spills at 4 warps, 16-288 B since the mode branch (docs/PERF.md, entry 13):
    # bounded at 320 B so growth shows. The fp32 D=256 variants ("ieee" dots on FMA units) spill
    # by design: a correctness path. Nothing else may spill.
    for r in compiled:
        if r["name"].endswith("_wide"):
            continue
        limit = 320 if r["name"] in ("bwd", "bwd_intra") else 0
        assert r["stack"] <= limit, f"{r['name']} {r['config']}: {r['stack']} B of stack (register spills)"
