#!/usr/bin/env bash
# GPU call: the side stream's cache copies: GPU tests, then the decode and encode A/B (auto with side copies
# against auto with copies in line, and cuDNN everywhere) in interleaved rounds; vae_bench's default with its profile.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 OASIS_TRITON_AUTOTUNE=0 OASIS_COMMIT=$(cat .whl/commit)
export XDG_CACHE_HOME=/tmp/xdg_oasis; mkdir -p $XDG_CACHE_HOME
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/card.txt"
MAX_JOBS=16 python3 -c "from oasis import vae_cuda; print('vae_cuda', vae_cuda.library())" > "$OUT/build.log" 2>&1; tail -1 "$OUT/build.log"
echo "built at $(( $(date +%s) - t0 )) s"
timeout 100 python3 -m pytest -q -x tests/test_oasis_vae.py tests/test_vae_cuda.py -k "side_copies or matches_float64 or pieces" -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
echo "tests done at $(( $(date +%s) - t0 )) s"
timeout 200 python3 .whl/ab.py "$OUT/ab" 3 auto,auto+inline,cudnn+inline > "$OUT/ab.log" 2>&1; tail -9 "$OUT/ab.log"
echo "ab done at $(( $(date +%s) - t0 )) s"
timeout $(( 560 - ($(date +%s) - t0) )) python3 benchmarks/vae_bench.py --reps 7 --long 0 --decode "ours, chunk 1, pieces 2" \
  --encode "ours, chunk 1" --profile-encode "ours, chunk 1" --out "$OUT/vae_bench" > "$OUT/vae_bench.log" 2>&1
grep -E "^\| (ours|diffusers)|^- |Traceback|Error|Memcpy" "$OUT/vae_bench.log"
echo "all done at $(( $(date +%s) - t0 )) s"
