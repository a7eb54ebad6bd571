#!/usr/bin/env bash
# On the GPU machine: the model-level benchmarks in one call (results to $OUT/r): the Wan VAE against
# diffusers (needs diffusers: carry its wheel in the ignored .whl/ and `pip install --target /tmp/site`), the
# DiT and the whole OasisVSR call, the DiT's training step (eager and compiled regions), the training-data
# throughput (degradations in the workers, and on the GPU). PyAV travels as a wheel in .whl/ too.
# BENCHES picks some of: vae model train train_step_graph train_graphs degrade (default:
# vae model train degrade). Each case's output is also in $OUT/r/<case>.log where it says so.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT/r"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for bench in ${BENCHES:-vae model train degrade}; do
    case $bench in
        vae) python3 benchmarks/vae_bench.py --reps 2 --out "$OUT/r" 2>&1 | grep -A100 "^Decode:" | head -40 ;;
        model) python3 benchmarks/model_bench.py --modes regions --grids A --vsr --reps 3 --out "$OUT/r" 2>&1 | tail -14 ;;
        # eager (the baseline of the compiled default); compiled with both AdamWs, checkpointing on
        # every block and on none, one step profiled; then the larger batches up to the first that
        # does not fit
        train) python3 benchmarks/train_bench.py --batches 1 4 --steps 3 --out "$OUT/r/train_eager" 2>&1 | tee "$OUT/r/train_eager.log" | tail -8
               python3 benchmarks/train_bench.py --batches 1 4 --steps 3 --compile --adamw foreach fused \
                   --checkpoint-blocks 30 0 --profile --out "$OUT/r/train_compiled" 2>&1 | tee "$OUT/r/train_compiled.log" | tail -34
               python3 benchmarks/train_bench.py --batches 16 32 64 --steps 2 --compile \
                   --out "$OUT/r/train_large" 2>&1 | tee "$OUT/r/train_large.log" | tail -10 ;;
        # each step replayed as one CUDA graph over the compiled regions, routed and all-global (the
        # host out of the comparison), every block checkpointed and none; then, without graphs (an
        # out-of-memory inside a capture is not one to recover from), the largest batches without
        # checkpointing (batch 4: 57.5 GiB at 426bad8)
        train_step_graph) python3 benchmarks/train_bench.py --batches 1 4 --steps 5 --compile --step-graph \
                   --checkpoint-blocks 30 0 --out "$OUT/r/train_step_graph" 2>&1 | tee "$OUT/r/train_step_graph.log" | tail -12
               python3 benchmarks/train_bench.py --batches 6 8 --steps 3 --compile --checkpoint-blocks 0 --modes routed \
                   --out "$OUT/r/train_no_checkpointing" 2>&1 | tee "$OUT/r/train_no_checkpointing.log" | tail -6 ;;
        # the whole DiT compiled and replayed as CUDA graphs: batch 1, routed (compiles the whole DiT's
        # forward and backward, minutes: a call of its own)
        train_graphs) python3 benchmarks/train_bench.py --batches 1 --steps 5 --compile graphs --modes routed \
                   --out "$OUT/r/train_graphs" 2>&1 | tee "$OUT/r/train_graphs.log" | tail -6 ;;
        # the trainer's default on CUDA: degradations on the GPU in the main process (JPEG by oasis.jpeg),
        # 8 and 16 workers decoding HQ crops from 8 libx264 videos written first (120 frames 540x960); the
        # degradation side alone from clips in memory, and the source alone. Twice over the same videos:
        # the host-bound rates varied by ~30% between calls (docs/OASIS.md)
        degrade) videos=$(mktemp -d)/videos
                 for round in 1 2; do
                     make=(); [ $round = 1 ] && make=(--make-videos 8)
                     python3 benchmarks/degrade_bench.py --videos "$videos" "${make[@]}" --workers 8 16 --threads 4 8 \
                         --clips 48 --device cuda --jpeg torch --out "$OUT/r/degrade_videos_$round" 2>&1 | tail -22
                 done ;;
        *) echo "unknown bench $bench"; exit 2 ;;
    esac
done
