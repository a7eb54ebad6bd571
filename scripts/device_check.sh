#!/usr/bin/env bash
# On the GPU machine: install over the image's torch, run the GPU tests, compute-sanitizer on a
# small case, then the benchmark with any arguments given. Logs go to $OUT (or ./out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
if [ "${RUN_TESTS:-1}" = 1 ]; then
    OASIS_TRITON_AUTOTUNE=0 python3 -m pytest -q tests ${TEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -${TEST_TAIL:-8}
fi
if [ "${RUN_SANITIZER:-1}" = 1 ]; then
    compute-sanitizer --tool memcheck python3 scripts/sanitize_case.py 2>&1 | tee "$OUT/sanitizer.log" | tail -6
fi
if [ "$#" -gt 0 ]; then
    python3 benchmarks/attn_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
