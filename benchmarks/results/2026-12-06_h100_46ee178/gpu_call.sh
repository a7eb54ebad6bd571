#!/usr/bin/env bash
# GPU call (asked for an H200): on an H200 first the VAE's confirming measurement (gpu27.sh: vae_bench with the
# 105-frame decode, vae_ab's decode rounds); then on either card scripts/sanitize_case.py whole under memcheck.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  OUT=$OUT/vae bash .whl/gpu27.sh
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 OASIS_TRITON_AUTOTUNE=0 XDG_CACHE_HOME=/tmp/xdg_oasis
PYTHONPATH=/tmp/site MAX_JOBS=16 python3 setup.py build_ext --inplace > "$OUT/build_ext.log" 2>&1 || tail -5 "$OUT/build_ext.log"
python3 -c "from oasis_kernels import fastpath; print('C++ extension:', fastpath._C is not None)"
echo "built at $(( $(date +%s) - t0 )) s"
timeout $(( 585 - ($(date +%s) - t0) )) compute-sanitizer --tool memcheck python3 scripts/sanitize_case.py > "$OUT/sanitize_case.log" 2>&1
echo "memcheck rc=$?"; grep -v "^=========  \|^=========     " "$OUT/sanitize_case.log" | tail -16
echo "all done at $(( $(date +%s) - t0 )) s"
