#!/usr/bin/env bash
# Install the package with the benchmark's extras into .venv and run the main job:
# benchmarks/attn_bench.py (S, A, B presets, fwd and fwd+bwd). Without CUDA it checks a
# small CPU shape and says that GPU figures need CUDA. Extra arguments go to the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    python3 -m venv .venv
    . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# without build isolation, so setup.py sees this torch and builds the C++ extension (csrc/)
# where torch has CUDA and nvcc is found
python -m pip install -q setuptools wheel
python -m pip install -q --no-build-isolation -e ".[bench]"
python benchmarks/attn_bench.py "$@"
