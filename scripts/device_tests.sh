#!/usr/bin/env bash
# On the GPU machine: the whole test suite in five parallel pytest processes (Triton compiles
# are CPU-bound; the GPU has room), compute-sanitizer memcheck on a small case, then a
# host-vs-GPU profile of a routed step. Logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=. OASIS_TRITON_AUTOTUNE=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
# the C++ extension (csrc/), so the eager replay runs in the tests below
python3 setup.py build_ext --inplace > "$OUT/build_ext.log" 2>&1 || tail -20 "$OUT/build_ext.log"
python3 -c "from oasis_kernels import fastpath; print('C++ extension:', fastpath._C is not None, fastpath.UNAVAILABLE)"
export OASIS_EXPECT_EXTENSION=1  # tests/test_fastpath.py fails if it is not there
# the kernels' seeded sweeps compile many variants: a group of their own
sweeps="tests/test_triton_kernels.py::test_random_sweep tests/test_triton_kernels.py::test_intra_only_launches"
groups=("tests/test_triton_kernels.py $(printf -- '--deselect %s ' $sweeps)" "$sweeps"
        "tests/test_routing.py tests/test_compile.py tests/test_fastpath.py"
        "tests/test_routed_attention.py" "tests/test_dispatch.py tests/test_errors.py tests/test_flash_adapters.py tests/test_plan_masks.py tests/test_reference.py tests/test_tolerance.py tests/test_sm90_compile.py")
pids=()
for i in "${!groups[@]}"; do
    timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider ${groups[$i]} --durations=5 > "$OUT/tests_$i.log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for i in "${!groups[@]}"; do echo "== ${groups[$i]}"; grep -E "passed|failed|error|FAILED|Timeout" "$OUT/tests_$i.log" | tail -4; done
if [ "${RUN_SANITIZER:-1}" = 1 ]; then
    timeout 150 compute-sanitizer --tool memcheck python3 scripts/sanitize_case.py 2>&1 | tee "$OUT/sanitizer.log" | tail -8
fi
if [ "${RUN_PROFILE:-1}" = 1 ]; then
    OASIS_TRITON_AUTOTUNE=1 python3 benchmarks/host_profile.py --shapes S --out "$OUT" 2>&1 | head -40
fi
