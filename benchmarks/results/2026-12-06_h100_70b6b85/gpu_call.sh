#!/usr/bin/env bash
# GPU call: vae_bench with the card meter (decode chunk 1 pieces 2, encode chunk 1; diffusers beside),
# then vae_timeline with the meter (no graphs).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 OASIS_TRITON_AUTOTUNE=0 OASIS_COMMIT=$(cat .whl/commit)
export XDG_CACHE_HOME=/tmp/xdg_oasis; mkdir -p $XDG_CACHE_HOME
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/card.txt"
MAX_JOBS=16 python3 -c "from oasis import vae_cuda; print('vae_cuda', vae_cuda.library())" > "$OUT/build.log" 2>&1; tail -1 "$OUT/build.log"
echo "built at $(( $(date +%s) - t0 )) s"
timeout 170 python3 benchmarks/vae_bench.py --reps 5 --long 0 --decode "ours, chunk 1, pieces 2" \
  --encode "ours, chunk 1" --profile-encode "ours, chunk 1" --out "$OUT/vae_bench" > "$OUT/vae_bench.log" 2>&1
grep -E "^\| (ours|diffusers)|^- |^\| call|\(decode\) \||\(encode\) \||Traceback|Error" "$OUT/vae_bench.log"
echo "bench done at $(( $(date +%s) - t0 )) s"
timeout $(( 330 - ($(date +%s) - t0) )) python3 scripts/vae_timeline.py --no-graph --out "$OUT/timeline" > "$OUT/timeline.log" 2>&1
grep -v "^decode {\|^encode {\|Warning\|_warn_once" "$OUT/timeline.log" | head -12
echo "all done at $(( $(date +%s) - t0 )) s"
