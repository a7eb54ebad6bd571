#!/usr/bin/env bash
# On the GPU machine: the CUDA local kernels of several source trees, one after the other in one
# call: for each folder of .variants/ (a copy of csrc/local_attention/ from a branch or commit, made
# here with `mkdir -p .variants/NAME && git archive REV csrc/local_attention | tar -x -C .variants/NAME`
# and carried), the kernels are put in place, JIT-built, checked against the float64 reference
# (tests/test_cuda_local.py) and timed against Triton at B (benchmarks/local_bench.py); the
# checkout's own kernels first, as "main". Logs and JSON under $OUT/NAME/.
# The variants run this checkout's GPU tests only (their CPU checks, the compile and geometry
# tests, belong to their own branch's CI). Carry .variants (an ignored folder) with the call.
#   SHAPES=B MODES=window,intra bash scripts/ab_cuda_local.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-} OASIS_EXPECT_EXTENSION=1 MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
keep=$(mktemp -d)  # this checkout's kernels, put back at the end
cp -r csrc/local_attention "$keep/"
run_variant() {  # NAME [pytest -k expression]
    local out="$OUT/$1"; mkdir -p "$out"
    local start=$SECONDS
    python3 -c "from oasis_kernels.kernels import cuda_local; print(cuda_local.library())" > "$out/build.log" 2>&1
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda_local.py -k "${2:-}" > "$out/tests.log" 2>&1
    echo "== $1: build+tests $((SECONDS - start)) s: $(tail -1 "$out/tests.log")"
    grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -3
    local modes=${MODES:-window,intra}
    for mode in ${modes//,/ }; do
        timeout 120 python3 benchmarks/local_bench.py --shapes "${SHAPES:-B}" --mode "$mode" \
            --backends triton,cuda --api-only --tag "$1" --out "$out" 2>&1 | grep -E "api (fwd|fwd\+bwd) "
    done
}
run_variant main
for dir in .variants/*/; do
    [ -d "$dir/csrc/local_attention" ] || continue
    name=$(basename "$dir")
    rm -rf csrc/local_attention && cp -r "$dir/csrc/local_attention" csrc/local_attention
    run_variant "$name" "not compiles_for_sm90a and not register_spills and not tile_geometry"
done
rm -rf csrc/local_attention && cp -r "$keep/local_attention" csrc/local_attention && rm -rf "$keep"
