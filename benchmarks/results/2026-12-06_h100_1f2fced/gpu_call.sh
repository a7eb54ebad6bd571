#!/usr/bin/env bash
# GPU call: where the decode's wall time beyond its kernels goes (vae_timeline with GPU spans and clocks),
# then OasisVSR's whole call (model_bench --vsr, regions, grid A).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 OASIS_TRITON_AUTOTUNE=0 OASIS_COMMIT=$(cat .whl/commit)
export XDG_CACHE_HOME=/tmp/xdg_oasis; mkdir -p $XDG_CACHE_HOME
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/card.txt"
MAX_JOBS=16 python3 -c "from oasis import vae_cuda; print('vae_cuda', vae_cuda.library())" > "$OUT/build.log" 2>&1; tail -1 "$OUT/build.log"
echo "built at $(( $(date +%s) - t0 )) s"
timeout 200 python3 scripts/vae_timeline.py --out "$OUT/timeline" > "$OUT/timeline.log" 2>&1  # (timeline/vae_timeline.json and .md were extracted from this log: the call returned too many files)
grep -v "^decode {\|^encode {\|Warning\|_warn_once" "$OUT/timeline.log" | tail -22
echo "timeline done at $(( $(date +%s) - t0 )) s"
# clockprobe.py is beside this file
timeout 120 python3 .whl/clockprobe.py > "$OUT/clockprobe.log" 2>&1; tail -17 "$OUT/clockprobe.log"
echo "probe done at $(( $(date +%s) - t0 )) s"
timeout $(( 450 - ($(date +%s) - t0) )) python3 benchmarks/model_bench.py --modes regions --grids A --vsr --reps 3 --out "$OUT/model" > "$OUT/model.log" 2>&1
grep -v Warning "$OUT/model.log" | grep -v '^ \|^{\|^}' | tail -12
echo "all at $(( $(date +%s) - t0 )) s"
