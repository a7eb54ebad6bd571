#!/usr/bin/env bash
# Install what the tests need into .venv and run them (the README's test command; CI runs this).
# Without CUDA the Triton kernels run under TRITON_INTERPRET=1 on small shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    python3 -m venv .venv
    . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
# the same pins as scripts/bench.sh (scripts/constraints.txt), whichever runs first
python -m pip install -q -c scripts/constraints.txt torch "triton; platform_system == 'Linux'" numpy setuptools wheel
python -m pip install -q -c scripts/constraints.txt -e ".[test,vsr]"
python -m pytest -q "$@"
