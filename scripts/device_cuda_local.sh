#!/usr/bin/env bash
# On the GPU machine: the CUDA local-attention kernels (csrc/local_attention/), JIT-built the way
# an install without the setup.py build gets them; their GPU tests, compute-sanitizer memcheck
# and racecheck on a small case, and the public op with the triton and cuda backends at S, A, B
# (local heads only, benchmarks/local_bench.py). Logs and JSON go to $OUT.
# RUN_NCU=1: Nsight Compute on each mode's forward, dQ and dK/dV at B as well (ncu_window.txt, ncu_intra.txt;
# NCU_HEADS heads, default 12).
#   SHAPES=S,A,B RUN_SANITIZER=1 RUN_NCU=0 bash scripts/device_cuda_local.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-} OASIS_EXPECT_EXTENSION=1 MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
start=$SECONDS
python3 -c "from oasis_kernels.kernels import cuda_local; print(cuda_local.library())" 2>&1 | tail -30
echo "load or build: $((SECONDS - start)) s"
status=0
python3 -m pytest -q -rs -p no:cacheprovider --durations=5 tests/test_cuda_local.py > "$OUT/tests_cuda_local.log" 2>&1 || status=1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_cuda_local.log" | tail -25
if [ "${RUN_SANITIZER:-1}" = 1 ]; then
    for tool in memcheck racecheck; do
        timeout 200 compute-sanitizer --tool $tool python3 scripts/sanitize_cuda_local.py > "$OUT/sanitizer_$tool.log" 2>&1
        echo "$tool: $(tail -3 "$OUT/sanitizer_$tool.log" | tr '\n' ' ')"
    done
fi
if [ "${RUN_NCU:-0}" = 1 ]; then  # each mode's forward, dQ and dK/dV at B: speed of light, pipes, instruction mix, stalls
    for mode in window intra; do
        timeout 300 ncu -k regex:"forward_(tma|wgmma)|dq_wgmma|dkdv_wgmma" --launch-skip 3 -c 3 \
            --section SpeedOfLight --section ComputeWorkloadAnalysis --section InstructionStats \
            --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section Occupancy \
            --section LaunchStats --print-details all python3 scripts/ncu_cuda_local.py --modes $mode --heads "${NCU_HEADS:-12}" \
            --backward > "$OUT/ncu_$mode.txt" 2>&1
        grep -E "_kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Achieved Occupancy" \
            "$OUT/ncu_$mode.txt" | head -20
    done
fi
for mode in window intra; do
    timeout 240 python3 benchmarks/local_bench.py --shapes "${SHAPES:-S,A,B}" --mode $mode --backends triton,cuda \
        --api-only --out "$OUT" 2>&1 | grep -v "^$" | tail -14
done
exit $status
