#!/usr/bin/env bash
# GPU call: 0b6a807 (vae-norm-cuda: the CUDA norm pass on e2b9e55's first-frame taps) against 64d97c1
# (.variants/base): GPU tests, the pass bench, ab_vae one round.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 OASIS_TRITON_AUTOTUNE=0 OASIS_COMMIT=0b6a807
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.backends.cudnn.version())" | tee -a "$OUT/card.txt"
MAX_JOBS=16 python3 -c "from oasis import vae_cuda; print('vae_cuda', vae_cuda.library())" > "$OUT/build.log" 2>&1; tail -1 "$OUT/build.log"
echo "built at $(( $(date +%s) - t0 )) s"
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_vae_norm_cuda.py tests/test_oasis_vae.py -k "norm or triton or first_frame" > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
timeout 30 python3 scripts/vae_pass_configs.py --default-tile --reps 20 --out "$OUT/vae_pass_configs.json" > "$OUT/vae_pass_configs.log" 2>&1
grep -v Warning "$OUT/vae_pass_configs.log"
echo "tests, passes done at $(( $(date +%s) - t0 )) s"
export XDG_CACHE_HOME=$(mktemp -d)
REPS=5 REPEAT=1 ARGS='--decode "ours, chunk 1, pieces 2" --encode "ours, chunk 1"' \
  timeout $(( 330 - ($(date +%s) - t0) )) bash scripts/ab_vae.sh
grep -h "norm_silu_kernel\|Memcpy\|FillFunctor\|^| call\|(decode) |\|(encode) |" "$OUT"/main_1.log "$OUT"/base_1.log
echo "all done at $(( $(date +%s) - t0 )) s"
