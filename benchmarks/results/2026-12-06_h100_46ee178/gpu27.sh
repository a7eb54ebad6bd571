#!/usr/bin/env bash
# GPU call (asked for an H200; a second, confirming call): on an H200, vae_bench's default ("auto") and cuDNN's path, decode and encode,
# diffusers beside, median of 7; the 105-frame decode; vae_ab's decode rounds.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 OASIS_TRITON_AUTOTUNE=0 OASIS_COMMIT=$(cat .whl/commit)
export XDG_CACHE_HOME=/tmp/xdg_oasis; mkdir -p $XDG_CACHE_HOME
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/card.txt"
grep -q H200 "$OUT/card.txt" || { echo "not an H200: nothing run"; exit 0; }
MAX_JOBS=16 python3 -c "from oasis import vae_cuda; print('vae_cuda', vae_cuda.library())" > "$OUT/build.log" 2>&1; tail -1 "$OUT/build.log"
echo "built at $(( $(date +%s) - t0 )) s"
  timeout 300 python3 benchmarks/vae_bench.py --reps 7 --long 27 --decode "ours, chunk 1, pieces 2" \
    "ours, chunk 1, pieces 2, cuDNN convolutions" --encode "ours, chunk 1" \
    --profile-encode "ours, chunk 1" --out "$OUT/vae_bench" > "$OUT/vae_bench.log" 2>&1
  grep -E "^\| (ours|diffusers)|^- |Traceback|Error" "$OUT/vae_bench.log"
  echo "bench done at $(( $(date +%s) - t0 )) s"
timeout $(( 560 - ($(date +%s) - t0) )) python3 benchmarks/vae_ab.py --kernels cudnn auto --what decode --rounds 3 --calls 5 \
  --out "$OUT/ab" > "$OUT/ab.log" 2>&1
grep -E "^\||Traceback|Error" "$OUT/ab.log" | head -20
echo "all done at $(( $(date +%s) - t0 )) s"
