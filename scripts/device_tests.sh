#!/usr/bin/env bash
# On the GPU machine: the whole test suite, its tests dealt round-robin to SHARDS parallel pytest
# processes (Triton compiles are CPU-bound and the slow tests sit together in a few files, so
# whole files per process left one process running long after the others), then
# compute-sanitizer on a small routed case and on the VAE's CUDA kernels, and a host-vs-GPU profile of a
# routed step.
# Logs go to $OUT. Where the checkout carries the cuDNN frontend wheel in .whl/, the extension
# is built with the direct cuDNN path.
# The whole suite no longer fits one 10-minute call (0e02262 on the H200: 461 of 588 tests in 440 s
# per shard, docs/PERF.md entry 20): PART=0/2 and then PART=1/2 run every other test each, in two
# calls on the warm machine (the second finds the first's build and Triton cache; run from the
# checkout itself, not a carried copy, so both survive between calls).
#   SHARDS=10 TEST_TIMEOUT=420 RUN_SANITIZER=1 RUN_PROFILE=1 TESTS=tests PART=0/1 bash scripts/device_tests.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OASIS_TRITON_AUTOTUNE=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
# the C++ extension (csrc/), so the eager replay runs in the tests below
# Every wheel carried in .whl/ goes to /tmp/site: the cuDNN frontend for the build, diffusers, its
# importlib_metadata and av for the model tests (without them tests/test_oasis_*.py skip whole:
# 476 of 607 tests were collected at 1c7b31f, when only the frontend's presence installed them)
build_path=.
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
        && build_path=/tmp/site
fi
# (setup.py's build is incremental: a second call on the same machine finds it done)
PYTHONPATH=$build_path MAX_JOBS=16 python3 setup.py build_ext --inplace > "$OUT/build_ext.log" 2>&1 || tail -20 "$OUT/build_ext.log"
export PYTHONPATH=.:$build_path${PYTHONPATH:+:$PYTHONPATH}  # the wheels above, and the caller's
python3 -c "from oasis_kernels import fastpath; print('C++ extension:', fastpath._C is not None, fastpath.UNAVAILABLE)"
python3 -c "from oasis_kernels.kernels import cudnn_direct; print('direct cuDNN path:', cudnn_direct.available())"
export OASIS_EXPECT_EXTENSION=1  # tests/test_fastpath.py fails if it is not there
shards=${SHARDS:-10}
# torch's CPU threads per shard: by default each process takes every core, so 12 shards on 16
# cores ran 12 x 16 threads and the CPU-bound tests (float64 references, loader workers, the VAE
# against diffusers) took up to 260 s each (0e02262, docs/PERF.md entry 20)
cores=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / shards > 0 ? cores / shards : 1 ))}
# tests/test_sm90_compile.py needs no GPU and runs in CPU CI (26 s alone); beside the shards'
# compiles on the device its fixture took ~290 s per shard that held one of its tests (H100, 958762b).
# --runslow: the tests marked slow (slow on a CPU) run here too
python3 -m pytest --collect-only -q -p no:cacheprovider --runslow ${TESTS:-tests --ignore=tests/test_sm90_compile.py} > "$OUT/collect.log" 2>&1
collect_rc=$?
# test ids only (a traceback line with "::" in it would stop a whole shard)
# PART=i/n: every n-th test from the i-th
part=${PART:-0/1}
grep -E '^[^[:space:]]+\.py::' "$OUT/collect.log" | awk -v i="${part%/*}" -v n="${part#*/}" '(NR - 1) % n == i' \
    > "$OUT/test_ids.txt"
echo "collected $(grep -cE '^[^[:space:]]+\.py::' "$OUT/collect.log") tests, part $part: $(wc -l < "$OUT/test_ids.txt") in $shards shards"
if [ "$collect_rc" != 0 ]; then  # a file that fails to import would otherwise just be missing
    echo "collection failed (rc=$collect_rc):"; grep -E "^(ERROR|E )" "$OUT/collect.log" | head -10
fi
rm -f "$OUT"/tests_*.log
pids=()
for ((i = 0; i < shards; i++)); do
    # one id per line: parametrize ids may hold spaces
    awk -v n="$shards" -v i="$i" '(NR - 1) % n == i' "$OUT/test_ids.txt" > "$OUT/shard_$i.txt"
    mapfile -t ids < "$OUT/shard_$i.txt"
    [ "${#ids[@]}" -gt 0 ] || continue
    # SIGINT, so a shard cut by the timeout still prints pytest's summary of what failed; KILL
    # 30 s later for one stuck where SIGINT is not handled (native code)
    timeout -s INT -k 30 "${TEST_TIMEOUT:-420}" python3 -m pytest -q -rs -p no:cacheprovider --runslow --durations=3 "${ids[@]}" \
        > "$OUT/tests_$i.log" 2>&1 &
    pids+=($!)
done
status=$collect_rc
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for ((i = 0; i < shards; i++)); do
    [ -f "$OUT/tests_$i.log" ] || continue
    echo "== shard $i: $(tail -1 "$OUT/tests_$i.log")"
    grep -E "^(FAILED|ERROR)|KeyboardInterrupt" "$OUT/tests_$i.log" | head -5
done
rm -f "$OUT"/shard_*.txt
if [ "${RUN_SANITIZER:-1}" = 1 ]; then
    timeout 150 compute-sanitizer --tool memcheck python3 scripts/sanitize_case.py 2>&1 | tee "$OUT/sanitizer.log" | tail -8
    # the VAE's CUDA kernels: memcheck without the caching allocator (a read past a tensor's end is reported, not
    # absorbed by its pooled neighbour), racecheck on the kernels' own calls (scripts/sanitize_vae.py; 12 and 30 s
    # on an H100 once the extension is built, benchmarks/results/2026-12-06_h100_be10c21/); a report fails the run
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 scripts/sanitize_vae.py 2>&1 | tee "$OUT/sanitizer_vae.log" | tail -3 || status=1
    timeout 120 compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/sanitize_vae.py --kernels-only \
        2>&1 | tee "$OUT/racecheck_vae.log" | tail -2 || status=1
fi
if [ "${RUN_PROFILE:-1}" = 1 ]; then
    OASIS_TRITON_AUTOTUNE=1 python3 benchmarks/host_profile.py --shapes S --out "$OUT" 2>&1 | head -40
fi
exit "$status"
