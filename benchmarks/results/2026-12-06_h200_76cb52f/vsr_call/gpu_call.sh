#!/usr/bin/env bash
# GPU call, same warm H200: OasisVSR's whole call (model_bench --vsr, regions, grid A).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 OASIS_TRITON_AUTOTUNE=0 OASIS_COMMIT=$(cat .whl/commit)
export XDG_CACHE_HOME=/tmp/xdg_oasis; mkdir -p $XDG_CACHE_HOME
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/card.txt"
MAX_JOBS=16 python3 -c "from oasis import vae_cuda; print('vae_cuda', vae_cuda.library())" > "$OUT/build.log" 2>&1; tail -1 "$OUT/build.log"
echo "built at $(( $(date +%s) - t0 )) s"
timeout $(( 400 - ($(date +%s) - t0) )) python3 benchmarks/model_bench.py --modes regions --grids A --vsr --reps 3 --out "$OUT/model" > "$OUT/model.log" 2>&1
grep -v Warning "$OUT/model.log" | grep -v '^ \|^{\|^}' | tail -12
echo "all done at $(( $(date +%s) - t0 )) s"
