"""Shared test set-up.

Without CUDA the Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before ``triton.jit`` decorates them, i.e. before ``oasis_kernels.kernels`` is imported.
"""

import os
import random
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: fresh inputs every run; OASIS_TEST_SEED=<n> replays a run (pytest prints the seed)
RUN_SEED = int(os.environ.get("OASIS_TEST_SEED", random.randrange(2**31)))

_SLOW_LEFT_OUT = pytest.StashKey[int]()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (minutes on a CPU; CI runs them)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line(
        "markers", "slow: minutes on a CPU (Triton interpreter on larger cases, sm_90 and nvcc compiles); "
                   "left out unless --runslow or a -m expression is given")


def _named_on_command_line(config, item) -> bool:
    """``pytest tests/test_x.py::test_y`` runs test_y even when it is slow."""
    for arg in config.args:
        path, sep, rest = str(arg).partition("::")
        if not sep:
            continue
        rel = os.path.relpath(os.path.abspath(path), str(config.rootpath)).replace(os.sep, "/")
        if item.nodeid == f"{rel}::{rest}" or item.nodeid.startswith(f"{rel}::{rest}["):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    # slow tests are deselected (not skipped) unless asked for: --runslow, or -m, which then decides
    if config.getoption("--runslow") or config.getoption("markexpr"):
        return
    keep, slow = [], []
    for item in items:
        (slow if item.get_closest_marker("slow") and not _named_on_command_line(config, item) else keep).append(item)
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = keep
        config.stash[_SLOW_LEFT_OUT] = len(slow)


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    slow = "all" if config.getoption("--runslow") else "deselected (--runslow runs them)"
    return (f"oasis-kernels: device={DEVICE}, TRITON_INTERPRET={interp}, OASIS_TEST_SEED={RUN_SEED}, "
            f"slow tests: {slow}")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # a different draw per test and per run, replayable from the run seed and the test id
    torch.manual_seed(RUN_SEED ^ zlib.crc32(request.node.nodeid.encode()))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n_slow = config.stash.get(_SLOW_LEFT_OUT, 0)
    if n_slow:
        terminalreporter.write_line(f"{n_slow} slow tests deselected; --runslow runs them (CI does)")
    if terminalreporter.stats.get("failed"):
        terminalreporter.write_line(f"replay these inputs with OASIS_TEST_SEED={RUN_SEED}")
