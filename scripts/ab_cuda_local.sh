#!/usr/bin/env bash
# On the GPU machine: the CUDA local kernels of several source trees, one after the other in one
# call: for each folder of .variants/ (a copy of csrc/local_attention/ from a branch or commit, made
# here with `mkdir -p .variants/NAME && git archive REV csrc/local_attention | tar -x -C .variants/NAME`
# and carried), the kernels are put in place, JIT-built, checked against the float64 reference
# (tests/test_cuda_local.py) and timed against Triton at B (benchmarks/local_bench.py); the
# checkout's own kernels first, as "main". Logs and JSON under $OUT/NAME/.
# A variant folder may hold its branch's tests/test_cuda_local.py too, which then replaces this
# checkout's for its run; either way a variant runs the GPU tests only (the CPU checks, the compile
# and geometry tests, belong to its own branch's CI). SANITIZE=memcheck,racecheck runs
# compute-sanitizer over scripts/sanitize_cuda_local.py on each variant's build after its timings
# (not on this checkout's own kernels, which ran it when they landed); SANITIZE_VARIANTS=a,b limits
# it to those variants. Variants run in the order of their folders' names; VARIANTS=a,b runs those alone.
# Carry .variants (an ignored folder) with the call.
#   SHAPES=B MODES=window,intra SANITIZE=memcheck,racecheck SANITIZE_VARIANTS=NAME bash scripts/ab_cuda_local.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-} OASIS_EXPECT_EXTENSION=1 MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
keep=$(mktemp -d)  # this checkout's kernels, put back at the end
cp -r csrc/local_attention tests/test_cuda_local.py "$keep/"
run_variant() {  # NAME [pytest -k expression [compute-sanitizer tools, comma-separated]]
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
    local tools=${3:-}
    for tool in ${tools//,/ }; do
        timeout 150 compute-sanitizer --tool "$tool" python3 scripts/sanitize_cuda_local.py > "$out/sanitizer_$tool.log" 2>&1
        echo "== $1 $tool (exit $?): $(tail -1 "$out/sanitizer_$tool.log")"
    done
}
run_variant main
for dir in .variants/*/; do
    [ -d "$dir/csrc/local_attention" ] || continue
    name=$(basename "$dir")
    [ -n "${VARIANTS:-}" ] && [[ ",$VARIANTS," != *",$name,"* ]] && continue
    rm -rf csrc/local_attention && cp -r "$dir/csrc/local_attention" csrc/local_attention
    cp "$keep/test_cuda_local.py" tests/test_cuda_local.py
    [ -f "$dir/tests/test_cuda_local.py" ] && cp "$dir/tests/test_cuda_local.py" tests/test_cuda_local.py
    tools=${SANITIZE:-}
    [ -n "${SANITIZE_VARIANTS:-}" ] && [[ ",$SANITIZE_VARIANTS," != *",$name,"* ]] && tools=
    run_variant "$name" "not compiles_for_sm90a and not register_spills and not tile_geometry" "$tools"
done
rm -rf csrc/local_attention && cp -r "$keep/local_attention" csrc/local_attention
cp "$keep/test_cuda_local.py" tests/test_cuda_local.py && rm -rf "$keep"
