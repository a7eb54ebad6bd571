#!/usr/bin/env bash
# GPU call: the VAE's CUDA kernels under compute-sanitizer (scripts/sanitize_vae.py: memcheck without the caching
# allocator, racecheck on the kernels' own calls): the script as revised at ca14547.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 OASIS_TRITON_AUTOTUNE=0 OASIS_COMMIT=$(cat .whl/commit)
export XDG_CACHE_HOME=/tmp/xdg_oasis; mkdir -p $XDG_CACHE_HOME
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/card.txt"
compute-sanitizer --version | tail -1 | tee -a "$OUT/card.txt"
MAX_JOBS=16 python3 -c "from oasis import vae_cuda; print('vae_cuda', vae_cuda.library())" > "$OUT/build.log" 2>&1; tail -1 "$OUT/build.log"
echo "built at $(( $(date +%s) - t0 )) s"
timeout 60 python3 scripts/sanitize_vae.py 2>&1 | tee "$OUT/plain.log" | tail -8
echo "plain done at $(( $(date +%s) - t0 )) s"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitize_vae.py > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?"; tail -6 "$OUT/memcheck.log"
echo "memcheck done at $(( $(date +%s) - t0 )) s"
timeout $(( 300 - ($(date +%s) - t0) )) compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/sanitize_vae.py --kernels-only > "$OUT/racecheck.log" 2>&1
echo "racecheck rc=$?"; tail -6 "$OUT/racecheck.log"
echo "racecheck done at $(( $(date +%s) - t0 )) s"
echo "all done at $(( $(date +%s) - t0 )) s"
