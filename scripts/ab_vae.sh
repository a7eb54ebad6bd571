#!/usr/bin/env bash
# On the GPU machine: benchmarks/vae_bench.py for this checkout's oasis/ and for each carried variant,
# in turns within one call: main, then every .variants/NAME/oasis (a branch or older copy of oasis/,
# made here with `mkdir -p .variants/NAME && git archive REV oasis csrc | tar -x -C .variants/NAME`: without
# csrc/ beside it, a variant's oasis.vae_cuda cannot build its CUDA convolutions and its output convolution
# falls back to cuDNN, ~11 ms slower on an H200, 16 on an H100: 2026-12-05_h100_4aefadf/README.md), REPEAT
# rounds, so the machine's drift falls on all of them alike. One choices file for all (XDG_CACHE_HOME
# a fresh folder unless set): the first run of each geometry times cuDNN's engines, later runs build
# the recorded one, so a variant's first call shows its own new geometries only. Needs diffusers on
# PYTHONPATH (carry its wheel in the ignored .whl/: see its README). Carry .variants with the call.
# Results under $OUT/NAME_ROUND/ (vae_bench.json / .md, commit field = NAME); each run's output in
# $OUT/NAME_ROUND.log.
#   REPS=3 REPEAT=2 ARGS='--decode "ours, chunk 1, pieces 2" --encode "ours, chunk 1"' bash scripts/ab_vae.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XDG_CACHE_HOME=${XDG_CACHE_HOME:-$(mktemp -d)}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
. scripts/oasis_variants.sh
run_one() {
    eval "extra=(${ARGS:-})"
    PYTHONPATH=$path${PYTHONPATH:+:$PYTHONPATH} OASIS_COMMIT=$name python3 benchmarks/vae_bench.py \
        --reps "${REPS:-3}" --long 0 "${extra[@]}" --out "$OUT/${name}_$round" 2>&1 \
        | tee "$OUT/${name}_$round.log" | grep -E "^\| (ours|diffusers)|^\| \`|^\| call|Traceback|Error"
}
each_variant run_one
