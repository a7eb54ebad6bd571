#!/usr/bin/env bash
# On the GPU machine: benchmarks/model_bench.py for this checkout's oasis/ and for each carried
# variant, in turns within one call: main, then every .variants/NAME/oasis (an older or branch
# copy of oasis/, made here with `mkdir -p .variants/NAME && git archive REV oasis csrc | tar -x -C
# .variants/NAME`: the VAE's CUDA convolutions build from the csrc/ beside it), REPEAT rounds, so the machine's drift falls on all of them alike. The variants
# import this checkout's oasis_kernels. Carry .variants (an ignored folder) with the call.
# Results under $OUT/NAME_ROUND/ (model_bench.json / .md, commit field = NAME).
# ARGS: more model_bench.py options for every run (e.g. --vsr, the whole OasisVSR call by stage);
# INDUCTOR: a JSON of Inductor options for the compiled regions, passed as one argument. Each run's
# whole output is in $OUT/NAME_ROUND.log; the lines shown are its results and any error.
#   GRIDS="A B" MODES=regions REPS=5 REPEAT=2 ARGS=--vsr INDUCTOR='{"triton.multi_kernel": 1}' bash scripts/ab_model.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
. scripts/oasis_variants.sh
inductor=()
[ -n "${INDUCTOR:-}" ] && inductor=(--inductor-options "$INDUCTOR")
run_one() {
    PYTHONPATH=$path${PYTHONPATH:+:$PYTHONPATH} OASIS_COMMIT=$name python3 benchmarks/model_bench.py \
        --grids ${GRIDS:-A B} --modes ${MODES:-regions} --reps "${REPS:-5}" ${ARGS:-} "${inductor[@]}" \
        --out "$OUT/${name}_$round" 2>&1 | tee "$OUT/${name}_$round.log" \
        | grep -E "^(regions|eager) .*(ms|speedup)|\"call_s\"|\"s\": |Traceback|Error|error:"
}
each_variant run_one
