"""Compile the Triton kernels for a GPU target without a GPU, and read what the compiler made.

Triton compiles for ``sm_90`` on any machine (its wheel bundles ``ptxas`` and ``cuobjdump``), so
CPU CI checks that every kernel variant the autotuner may pick compiles for Hopper (the
interpreter runs kernels but never compiles them: a pipeliner failure shows only here), and
``python -m oasis_kernels.kernels.aot`` prints registers, spills and the instruction mix of each
kernel's loops (docs/PERF.md, entry 4, used it to find the per-score integer work).

Strides are declared divisible by 16 and pointers 16-byte aligned, as Triton specializes them at
run time for contiguous bf16 tensors; without that the loads come out scalar.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

__all__ = ["compile_for", "resources", "loop_mix", "KERNELS", "variants"]

_POINTER_TYPES = {"LSE": "*fp32", "DELTA": "*fp32", "LSE_G": "*fp32", "LSE_L": "*fp32", "OUT": "*fp32",
                  "HEADS": "*i32"}
_TENSOR_ARGS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FLOAT_ARGS = {"qk_scale", "sm_scale", "e_scale", "one_m_eps", "eps_n"}


def compile_for(kernel, constexprs: dict, *, dtype: str = "bf16", num_warps: int = 4, num_stages: int = 2,
                capability: int = 90):
    """``triton.compile`` of a ``@triton.jit`` kernel of this package for ``sm_<capability>``."""
    params = kernel.arg_names
    signature, attrs = {}, {}
    for i, name in enumerate(params):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in _FLOAT_ARGS:
            signature[name] = "fp32"
        elif name in _POINTER_TYPES:
            signature[name] = _POINTER_TYPES[name]
        elif name in _TENSOR_ARGS:
            signature[name] = f"*{dtype}"
        else:
            signature[name] = "i32"
        if signature[name].startswith("*") or name.startswith("s"):  # pointers and strides
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                    constexprs={(params.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", capability, 128),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuobjdump(compiled, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([_tool("cuobjdump"), flag, f.name], capture_output=True, text=True, check=True).stdout


def resources(compiled) -> dict:
    """``{"REG": registers, "STACK": stack bytes (spills), "SHARED": static shared bytes, ...}``
    from ``cuobjdump -res-usage``, plus ``dynamic_shared`` from Triton's metadata."""
    out = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", _cuobjdump(compiled, "-res-usage"))}
    out["dynamic_shared"] = compiled.metadata.shared
    return out


def loop_mix(compiled, top: int = 3) -> list[tuple[int, collections.Counter]]:
    """Instruction count and opcode mix of the ``top`` largest loops (backward branches) in the SASS."""
    instrs = []
    for line in _cuobjdump(compiled, "-sass").splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?);", line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, text in instrs:
        if "BRA" not in text:
            continue
        target = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1])
        if target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            body = [t for a, t in instrs if lo <= a <= addr]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            loops.append((len(body), ops))
    return sorted(loops, key=lambda x: -x[0])[:top]


def _kernels():
    from . import local_attention as la
    from . import routing_stats as rs
    from .tile_configs import BWD_CONFIGS, FWD_CONFIGS, WIDE_ROWS, fits

    common = dict(BLOCK_D=128, EVEN_D=True, DOT_PREC="tf32", UPCAST=False)
    # mixed launches (window radii of (3,5,5)), and launches of intra heads only
    window = dict(RT=1, RH=2, RW=2)
    mixed = dict(**window, INTRA_ONLY=False)
    intra = dict(RT=0, RH=0, RW=0, INTRA_ONLY=True)
    # the configs an intra-only launch at S = (5, 20, 40) may pick
    s_intra = dict(T=5, H=20, W=40, RT=0, RH=0, RW=0, n_window=0, BLOCK_D=128, DOT_PREC="tf32")

    def intra_configs(configs):
        return [c for c in configs if fits(c, s_intra)]

    def bf16_configs(configs):  # WIDE_ROWS serves fp32 rows over 128 elements only ("*_wide")
        return [c for c in configs if c != WIDE_ROWS]

    wide = dict(BLOCK_D=256, EVEN_D=True, DOT_PREC="ieee", UPCAST=False, **mixed)

    return {
        "fwd": (la._fwd_kernel, {**common, **mixed, "POS_SCALE": True}, bf16_configs(FWD_CONFIGS)),
        "fwd_wide": (la._fwd_kernel, {**wide, "POS_SCALE": True}, [WIDE_ROWS]),
        "fwd_intra": (la._fwd_kernel, {**common, **intra, "POS_SCALE": True}, intra_configs(FWD_CONFIGS)),
        # the backward: dQ and dK/dV programs in one kernel, after the delta kernel
        "bwd": (la._bwd_kernel, {**common, **mixed}, bf16_configs(BWD_CONFIGS)),
        "bwd_intra": (la._bwd_kernel, {**common, **intra}, intra_configs(BWD_CONFIGS)),
        "bwd_wide": (la._bwd_kernel, wide, [WIDE_ROWS]),
        "bwd_delta": (la._bwd_delta_kernel, {"BLOCK_D": 128, "EVEN_D": True}, la._delta.configs),
        "stats_global": (rs._stats_global_kernel, {**common, "POS_SCALE": True},
                         [triton.Config({k: v for k, v in rs.CONFIG.items() if k.isupper()},
                                        num_warps=rs.CONFIG["num_warps"], num_stages=rs.CONFIG["num_stages"])]),
        "stats_local": (rs._stats_local_kernel, {**common, **window, "FAST_LOG": True},
                        [triton.Config({**{k: v for k, v in rs.LOCAL_CONFIG.items() if k.isupper()}, "SLICED": True},
                                       num_warps=rs.LOCAL_CONFIG["num_warps"],
                                       num_stages=rs.LOCAL_CONFIG["num_stages"])]),
    }


KERNELS = ("fwd", "fwd_intra", "fwd_wide", "bwd", "bwd_intra", "bwd_wide", "bwd_delta", "stats_global", "stats_local")


def dtype_of(name: str) -> str:
    """The input dtype a variant is compiled for: fp32 for ``*_wide`` (fp32 rows of 256)."""
    return "fp32" if name.endswith("_wide") else "bf16"


def variants(names=KERNELS):
    """``(name, kernel, constexprs, config)`` for every config of each kernel: bf16, D = 128 at the
    paper's (3,5,5) window (mixed launches) or with no window (``*_intra``, intra heads only);
    ``*_wide``: fp32, D = 256, mixed (compile with ``dtype=dtype_of(name)``). Needs
    TRITON_INTERPRET unset (the interpreter replaces the kernels with Python functions that
    cannot be compiled)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("aot compiles kernels: run it with TRITON_INTERPRET unset")
    table = _kernels()
    for name in names:
        kernel, constexprs, configs = table[name]
        for cfg in configs:
            yield name, kernel, {**constexprs, **cfg.kwargs}, cfg


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or KERNELS
    for name, kernel, constexprs, cfg in variants(names):
        compiled = compile_for(kernel, constexprs, dtype=dtype_of(name), num_warps=cfg.num_warps,
                               num_stages=cfg.num_stages)
        res = resources(compiled)
        label = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f" w{cfg.num_warps} s{cfg.num_stages}"
        print(f"{name} [{label}]: {res.get('REG')} registers, {res.get('STACK')} B stack, "
              f"{res['dynamic_shared']} B shared")
        for n, ops in loop_mix(compiled, top=1):
            print(f"    loop: {n} instructions: " + ", ".join(f"{o} {c}" for o, c in ops.most_common(12)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
