#!/usr/bin/env bash
# Install the package with the benchmark's extras into .venv and run the main job:
# benchmarks/attn_bench.py (S, A, B presets, fwd and fwd+bwd). Without CUDA it checks and
# times the rows the CPU can run on scaled-down presets (GPU figures need CUDA). Extra
# arguments go to the benchmark (python benchmarks/attn_bench.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    python3 -m venv .venv
    . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
# the same pins as scripts/test.sh (scripts/constraints.txt), whichever runs first
python -m pip install -q -c scripts/constraints.txt torch "triton; platform_system == 'Linux'" numpy setuptools wheel
# without build isolation, so setup.py sees this torch and builds the C++ extension (csrc/)
# where torch has CUDA and nvcc is found
python -m pip install -q -c scripts/constraints.txt --no-build-isolation -e ".[bench]"
python benchmarks/attn_bench.py "$@"
