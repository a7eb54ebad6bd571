#!/usr/bin/env bash
# On the GPU machine: attn_bench for .baseline/ (an older checkout's oasis_kernels, carried;
# make it with `git archive REV oasis_kernels | tar -x -C .baseline`) and for this tree, one
# after the other on the same machine, so the two can be compared (docs/PERF.md's method).
# Builds the C++ extension once and gives the baseline a copy, or, where the baseline carries its
# own csrc/ and setup.py and they differ from this tree's, builds both at once.
#   SHAPES=S BENCH_GROUPS=routed,floor BACKENDS=ours,sdpa REPEAT=1 bash scripts/ab_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
build() {  # DIR JOBS LOG
    (cd "$1" && MAX_JOBS=$2 python3 setup.py -q build_ext --inplace > "$3" 2>&1) || { tail -20 "$3"; return 1; }
}
own_base=0
if [ -d .baseline/oasis_kernels ] && [ -f .baseline/setup.py ] && ! diff -rq csrc .baseline/csrc > /dev/null 2>&1; then
    own_base=1
    build . 8 /tmp/build.log & new_pid=$!
    build .baseline 8 /tmp/build_base.log & base_pid=$!
    wait $new_pid || exit 1
    wait $base_pid || exit 1
else
    build . 16 /tmp/build.log || exit 1
fi
args=(--shapes "${SHAPES:-S}" --groups "${BENCH_GROUPS:-routed,floor}" --backends "${BACKENDS:-ours,sdpa}" --graphs "${GRAPHS:-S}")
if [ -d .baseline/oasis_kernels ]; then
    [ $own_base = 1 ] || cp oasis_kernels/_C*.so .baseline/oasis_kernels/
    PYTHONPATH=.baseline OASIS_COMMIT=${BASE_COMMIT:-baseline} python3 benchmarks/attn_bench.py "${args[@]}" \
        --out "$OUT/base" 2>&1 | grep -v "^$" | tail -25
fi
PYTHONPATH=. python3 benchmarks/attn_bench.py "${args[@]}" --out "$OUT/new" 2>&1 | grep -v "^$" | tail -25
# REPEAT=n: n-1 more runs of this tree (new_2, new_3, ...), to see the spread between runs
for ((r = 2; r <= ${REPEAT:-1}; r++)); do
    PYTHONPATH=. python3 benchmarks/attn_bench.py "${args[@]}" --out "$OUT/new_$r" 2>&1 | grep -v "^$" | tail -8
done
if [ -n "${NEW_ENV:-}" ]; then  # the tree again with extra settings, e.g. NEW_ENV=OASIS_OVERLAP=0
    env $NEW_ENV PYTHONPATH=. python3 benchmarks/attn_bench.py "${args[@]}" --out "$OUT/new_env" 2>&1 | grep -v "^$" | tail -25
fi
