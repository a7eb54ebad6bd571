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
# torch 2.13.0: the CPU wheel on CI machines (a CUDA build elsewhere); triton pinned to the GPU machine's
python -m pip install -q "torch==2.13.0" "triton==3.6.0"
python -m pip install -q -e ".[test,vsr]"
python -m pytest -q "$@"
