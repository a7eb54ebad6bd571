#!/usr/bin/env bash
# GPU call: the VAE's CUDA kernels under compute-sanitizer (scripts/sanitize_vae.py: memcheck without the caching
# allocator, racecheck on the kernels' own calls); the decode's peak for 33 and 105 frames of 720p.
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
timeout 60 python3 scripts/sanitize_vae.py 2>&1 | tee "$OUT/plain.log" | tail -4
echo "plain done at $(( $(date +%s) - t0 )) s"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 compute-sanitizer --tool memcheck python3 scripts/sanitize_vae.py > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?"; tail -6 "$OUT/memcheck.log"
echo "memcheck done at $(( $(date +%s) - t0 )) s"
timeout $(( 500 - ($(date +%s) - t0) )) compute-sanitizer --tool racecheck python3 scripts/sanitize_vae.py --kernels-only > "$OUT/racecheck.log" 2>&1
echo "racecheck rc=$?"; tail -6 "$OUT/racecheck.log"
echo "racecheck done at $(( $(date +%s) - t0 )) s"
timeout $(( 570 - ($(date +%s) - t0) )) python3 - <<'PY' 2>&1 | tee "$OUT/peak.log"
import torch
from oasis import WanVAE, WanVAEConfig
vae = WanVAE(WanVAEConfig()).to("cuda").eval().requires_grad_(False).to(torch.bfloat16).channels_last(True)
vae.autotune = True
with torch.no_grad():
    for t in (9, 27):
        z = torch.randn(1, 16, t, 90, 160, device="cuda", dtype=torch.bfloat16)
        vae.decode(z, chunk=1, piece_frames=2); torch.cuda.synchronize()
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = vae.decode(z, chunk=1, piece_frames=2); torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        print(f"decode {4 * t - 3} frames 720x1280: peak {peak / 2**30:.3f} GiB, {(peak - base) / 2**30:.3f} above the "
              f"weights and latents ({base / 2**30:.3f}); output {out.numel() * out.element_size() / 2**30:.3f} GiB")
        del out, z
PY
echo "all done at $(( $(date +%s) - t0 )) s"
