#!/usr/bin/env bash
# GPU call: OasisVSR's whole call at main (model_bench --vsr, regions, grid A), the file part skipped (no PyAV here).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 OASIS_TRITON_AUTOTUNE=0 OASIS_COMMIT=$(cat .whl/commit)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
timeout $(( 190 - ($(date +%s) - t0) )) python3 benchmarks/model_bench.py --modes regions --grids A --vsr --reps 3 --out "$OUT/model" > "$OUT/model.log" 2>&1
grep -v Warning "$OUT/model.log" | grep -v '^ \|^{\|^}' | tail -12
grep -A3 '"call_s"' "$OUT/model.log"
echo "all at $(( $(date +%s) - t0 )) s"
