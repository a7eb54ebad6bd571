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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    return f"oasis-kernels: device={DEVICE}, TRITON_INTERPRET={interp}, OASIS_TEST_SEED={RUN_SEED}"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # a different draw per test and per run, replayable from the run seed and the test id
    torch.manual_seed(RUN_SEED ^ zlib.crc32(request.node.nodeid.encode()))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if terminalreporter.stats.get("failed"):
        terminalreporter.write_line(f"replay these inputs with OASIS_TEST_SEED={RUN_SEED}")
