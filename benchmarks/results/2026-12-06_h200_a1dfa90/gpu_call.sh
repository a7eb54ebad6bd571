#!/usr/bin/env bash
# GPU call: a1dfa90 on the card: GPU tests of the norm pass after its review, vae_bench (ours + diffusers,
# decode chunk 1 pieces 2, encode chunk 1), scripts/vae_timeline.py (idle time by cause, per chunk; graph floor).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 OASIS_TRITON_AUTOTUNE=0 OASIS_COMMIT=$(cat .whl/commit)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.backends.cudnn.version())" | tee -a "$OUT/card.txt"
MAX_JOBS=16 python3 -c "from oasis import vae_cuda; print('vae_cuda', vae_cuda.library())" > "$OUT/build.log" 2>&1; tail -1 "$OUT/build.log"
echo "built at $(( $(date +%s) - t0 )) s"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_vae_norm_cuda.py tests/test_oasis_vae.py -k "norm or triton or first_frame" > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
echo "tests done at $(( $(date +%s) - t0 )) s"
export XDG_CACHE_HOME=$(mktemp -d)
timeout 170 python3 benchmarks/vae_bench.py --reps 5 --long 0 --decode "ours, chunk 1, pieces 2" \
  --encode "ours, chunk 1" --profile-encode "ours, chunk 1" --out "$OUT/vae_bench" > "$OUT/vae_bench.log" 2>&1
grep -E "^\| (ours|diffusers)|^\| call|\(decode\) \||\(encode\) \||Traceback|Error" "$OUT/vae_bench.log"
echo "bench done at $(( $(date +%s) - t0 )) s"
timeout $(( 420 - ($(date +%s) - t0) )) python3 scripts/vae_timeline.py --out "$OUT/timeline" > "$OUT/timeline.log" 2>&1
tail -25 "$OUT/timeline.log"
echo "all done at $(( $(date +%s) - t0 )) s"
