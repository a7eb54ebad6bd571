#!/usr/bin/env bash
# On the GPU machine: GPU tests of the Triton kernels, then the local-kernel tile sweep and the
# routing-statistics bench; with .baseline/ (an older oasis_kernels copy, carried) also that
# version's public op in the same run. Logs and JSON go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "${RUN_TESTS:-1}" = 1 ]; then
    OASIS_TRITON_AUTOTUNE=0 PYTHONPATH=. python3 -m pytest -q -x --runslow ${TEST_FILES:-tests/test_triton_kernels.py tests/test_routing.py} 2>&1 | tee "$OUT/tests.log" | tail -4
fi
for shape in ${SHAPES:-B}; do
    if [ -d .baseline ]; then
        PYTHONPATH=.baseline python3 benchmarks/local_bench.py --shapes "$shape" --mode "${MODE:-window}" --api-only --tag base --out "$OUT" 2>&1 | tail -3
    fi
    PYTHONPATH=. python3 benchmarks/local_bench.py --shapes "$shape" --mode "${MODE:-window}" ${SWEEP_ARGS:-} --tag new --out "$OUT" 2>&1 | grep -v "^$" | tail -40
done
if [ "${RUN_ROUTING:-1}" = 1 ]; then
    PYTHONPATH=. python3 benchmarks/routing_bench.py --grid 9,45,80 --out "$OUT" 2>&1 | tail -20
fi
