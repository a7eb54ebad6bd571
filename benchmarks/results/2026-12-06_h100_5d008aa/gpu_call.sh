#!/usr/bin/env bash
# GPU call: build vae_cuda; decode A/B by conv_kernel (cudnn / cuda / cuda-192) in interleaved rounds;
# conv_power with our kernel's rows; vae_bench's decode variants.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 OASIS_TRITON_AUTOTUNE=0 OASIS_COMMIT=$(cat .whl/commit)
export XDG_CACHE_HOME=/tmp/xdg_oasis; mkdir -p $XDG_CACHE_HOME
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/card.txt"
MAX_JOBS=16 python3 -c "from oasis import vae_cuda; print('vae_cuda', vae_cuda.library())" > "$OUT/build.log" 2>&1; tail -1 "$OUT/build.log"
echo "built at $(( $(date +%s) - t0 )) s"
timeout 150 python3 .whl/ab.py "$OUT/ab" 3 > "$OUT/ab.log" 2>&1; tail -8 "$OUT/ab.log"
echo "ab done at $(( $(date +%s) - t0 )) s"
timeout 150 python3 scripts/conv_power.py --keep 4 --rounds 1 --out "$OUT/conv_power" > "$OUT/conv_power.log" 2>&1
grep -E "^\|" "$OUT/conv_power.log" | grep -E "tuned|CUDA|cuda|choice|sustained \|" ; tail -3 "$OUT/conv_power.log"
echo "conv_power done at $(( $(date +%s) - t0 )) s"
timeout $(( 560 - ($(date +%s) - t0) )) python3 benchmarks/vae_bench.py --reps 7 --long 0 --decode "ours, chunk 1, pieces 2" \
  "ours, chunk 1, pieces 2, CUDA convolutions" "ours, chunk 1, pieces 2, CUDA convolutions at 192" \
  --encode "ours, chunk 1" --profile-encode "ours, chunk 1" --out "$OUT/vae_bench" > "$OUT/vae_bench.log" 2>&1
grep -E "^\| (ours|diffusers)|Traceback|Error" "$OUT/vae_bench.log"
echo "all done at $(( $(date +%s) - t0 )) s"
