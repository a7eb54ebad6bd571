"""Backend selection: capability predicates select and explain."""

import pytest
import torch

import oasis_kernels as ok
from conftest import DEVICE
from oasis_kernels.backends import BACKENDS, PRIORITY, SMALL_INTRA_FLOPS, priority
from oasis_kernels.call import lookup

PLAN = ok.RoutingPlan((2, 3, 5), ["g", "w", "i", "g"], (3, 3, 3))


def test_every_mode_gets_a_backend_and_reasons_are_reported():
    q = torch.randn(1, 30, 4, 64, device=DEVICE)
    d = ok.decide(q, PLAN)
    assert [g.mode for g in d.decisions] == [ok.Mode.GLOBAL, ok.Mode.INTRA, ok.Mode.WINDOW]
    assert d.decisions[0].heads == (0, 3)
    for g in d.decisions:
        assert g.backend in BACKENDS
        order, _ = priority(g.mode, q, PLAN)
        chosen_at = order.index(g.backend)
        # every backend ahead of the chosen one declined, each with at least one reason
        assert [n for n, _ in g.declined] == list(order[:chosen_at])
        assert all(reasons for _, reasons in g.declined)
    text = ok.explain(q, PLAN)
    assert "global heads [0, 3] ->" in text and "declined:" in text


def test_small_intra_layers_try_triton_first_on_cuda():
    # a tiny layer: 4 * 30 tokens * 5 per frame * 64 * 1 intra head, far below the threshold
    assert 4 * 30 * 5 * 64 < SMALL_INTRA_FLOPS
    cpu_order, cpu_note = priority(ok.Mode.INTRA, torch.empty(1, 30, 4, 64), PLAN)
    assert (cpu_order, cpu_note) == (PRIORITY[ok.Mode.INTRA], "")
    # the rule reads shapes and the device type only, so a CUDA-typed meta stand-in is enough
    cuda_like = type("Q", (), {"shape": (1, 30, 4, 64), "device": torch.device("cuda")})()
    order, note = priority(ok.Mode.INTRA, cuda_like, PLAN)
    assert order[0] == "triton" and order[1:] == PRIORITY[ok.Mode.INTRA] and "small intra layer" in note
    # the paper's A shape with 4 intra heads keeps cuDNN first
    grid_a = (9, 45, 80)
    plan_a = ok.RoutingPlan.from_counts(grid_a, 5, 4, 3)
    big = type("Q", (), {"shape": (1, 9 * 45 * 80, 12, 128), "device": torch.device("cuda")})()
    assert priority(ok.Mode.INTRA, big, plan_a) == (PRIORITY[ok.Mode.INTRA], "")
    assert priority(ok.Mode.GLOBAL, cuda_like, PLAN) == (PRIORITY[ok.Mode.GLOBAL], "")


def test_cuda_kernels_go_before_triton_only_where_listed(monkeypatch):
    from oasis_kernels import backends

    cuda_like = type("Q", (), {"shape": (1, 30, 4, 64), "device": torch.device("cuda")})()
    assert "cuda" not in priority(ok.Mode.WINDOW, cuda_like, PLAN)[0]  # nothing measured faster yet
    monkeypatch.setitem(backends.CUDA_BEFORE_TRITON, ok.Mode.WINDOW, frozenset({64}))
    order, note = priority(ok.Mode.WINDOW, cuda_like, PLAN)
    assert order == ("cuda", "triton", "reference") and "CUDA_BEFORE_TRITON" in note
    wider = type("Q", (), {"shape": (1, 30, 4, 128), "device": torch.device("cuda")})()
    assert priority(ok.Mode.WINDOW, wider, PLAN)[0] == PRIORITY[ok.Mode.WINDOW]  # another head dim
    assert priority(ok.Mode.WINDOW, torch.empty(1, 30, 4, 64), PLAN)[0] == PRIORITY[ok.Mode.WINDOW]  # CPU
    monkeypatch.setitem(backends.CUDA_BEFORE_TRITON, ok.Mode.INTRA, frozenset({64}))
    order, note = priority(ok.Mode.INTRA, cuda_like, PLAN)  # with the small-layer rule: both notes
    assert order[:2] == ("cuda", "triton") and "small intra layer" in note and "CUDA_BEFORE_TRITON" in note


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU dispatch")
def test_cpu_auto_choices():
    q = torch.randn(1, 30, 4, 64)
    d = ok.decide(q, PLAN)
    assert d.backend_for("global") == "sdpa_cpu"
    assert d.backend_for("intra") == "sdpa_cpu"
    # the interpreter is never picked by auto, even when it is switched on
    assert d.backend_for("window") == "reference"
    reasons = dict(d.decisions[2].declined)["triton"]
    assert any("interpreter" in r or "CUDA" in r for r in reasons)
    fp64 = ok.decide(q.double(), PLAN)
    assert fp64.backend_for("window") == "reference"


def test_forced_backend_serves_only_its_modes():
    q = torch.randn(1, 30, 4, 64, device=DEVICE)
    d = ok.decide(q, PLAN, "reference")
    assert {g.backend for g in d.decisions} == {"reference"}
    d = ok.decide(q, PLAN, {"window": "reference"})
    assert d.backend_for("window") == "reference"
    assert d.backend_for("global") != "reference"


def test_forced_local_backend_leaves_global_heads_to_auto():
    q = torch.randn(1, 30, 4, 64, device=DEVICE)
    try:
        d = ok.decide(q, PLAN, "triton")
    except ok.BackendError as exc:
        pytest.skip(f"triton cannot run here: {exc}")
    assert d.backend_for("window") == "triton" and d.backend_for("intra") == "triton"
    g = d.decisions[0]
    assert g.backend != "triton" and "does not serve global" in g.note


def test_triton_takes_both_local_modes_in_one_call():
    q = torch.randn(1, 30, 4, 64, device=DEVICE)
    try:
        d = ok.decide(q, PLAN, {"intra": "triton", "window": "triton"})
    except ok.BackendError as exc:
        pytest.skip(f"triton cannot run here: {exc}")
    calls = dict(d.calls())
    assert calls["triton"] == [(ok.Mode.INTRA, (2,)), (ok.Mode.WINDOW, (1,))]


@pytest.mark.skipif(DEVICE != "cuda", reason="the SDPA backends decline CPU tensors before reading the switch")
def test_sdpa_switches_are_honoured():
    q = torch.randn(1, 30, 4, 64, device=DEVICE, dtype=torch.bfloat16)
    prev = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        reasons = BACKENDS["sdpa_cudnn"].why_not(ok.Mode.GLOBAL, q, PLAN)
        cached = _prepared(q).dispatch
    finally:
        torch.backends.cuda.enable_cudnn_sdp(prev)
    assert any("disabled" in r for r in reasons)
    assert cached.backend_for("global") != "sdpa_cudnn"


def _prepared(q, plan=PLAN):
    grid, modes, window = plan.as_op_args()
    return lookup(q, q, q, (tuple(grid), tuple(modes), tuple(window)), 0.125, "auto", False)


def test_call_cache_keys_on_global_switches_and_settings():
    q = torch.randn(1, 30, 4, 64, device=DEVICE)
    a = _prepared(q)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(not prev)
    try:
        b = _prepared(q)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert a is not b and a is _prepared(q)
    with ok.use_settings(overlap=False):
        c = _prepared(q)
    assert c is not a and not c.settings.overlap and a.settings.overlap


def test_call_cache_is_bounded(monkeypatch):
    from oasis_kernels import call as call_module

    monkeypatch.setattr(call_module, "MAX_CALLS", 3)
    q = torch.randn(1, 30, 4, 64, device=DEVICE)
    first = _prepared(q)
    for n in range(4):  # four other signatures: the first is dropped, least recently used first
        _prepared(torch.randn(1, 30, 4, 16 * (n + 1), device=DEVICE))
    assert len(call_module._CALLS) <= 3 and _prepared(q) is not first


def test_bad_backend_requests():
    with pytest.raises(ValueError, match="'mode=name' pairs"):
        ok.decide(torch.randn(1, 30, 4, 64), PLAN, "intra=triton,bogus")
    with pytest.raises(ValueError, match="does not serve global heads"):
        ok.decide(torch.randn(1, 30, 4, 64), PLAN, {"global": "triton"})
    with pytest.raises(ValueError, match="names global heads twice"):
        ok.decide(torch.randn(1, 30, 4, 64), PLAN, {"global": "sdpa", "g": "reference"})


class _FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


def _schedule(monkeypatch, shape, fail_in=None, capturing=False, replayed=False):
    """What RoutedCall._run does for a 5g/4i/3w layer of ``shape``, on fake CUDA streams
    (``capturing``: as inside CUDA-graph capture; ``replayed``: what the C++ replay is told)."""
    import contextlib

    from oasis_kernels import streams

    log, current = [], ["caller"]
    caller, side = _FakeStream("caller", log), _FakeStream("side", log)

    @contextlib.contextmanager
    def on(stream):
        previous, current[0] = current[0], stream.name
        try:
            yield
        finally:
            current[0] = previous

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setattr(streams, "side_stream", lambda device: side)
    monkeypatch.setattr(streams, "capturing", lambda device: capturing)
    plan = ok.RoutingPlan.from_counts((5, 20, 40), 5, 4, 3)
    call = object.__new__(ok.RoutedCall)  # a call on a CUDA device, without one: its decisions set here
    call.device, call.settings = torch.device("cuda"), ok.settings()
    call.calls = [("sdpa_cudnn", [(ok.Mode.GLOBAL, plan.heads_of("global"))]),
                  ("triton", [(ok.Mode.INTRA, plan.heads_of("intra")), (ok.Mode.WINDOW, plan.heads_of("window"))])]
    call.global_calls, call.local_calls = call.calls[:1], call.calls[1:]
    call.global_flops = 4.0 * shape[0] * shape[1] ** 2 * shape[3] * 5

    def work(name, groups):
        log.append(f"{name} {[m.name for m, _ in groups]} on {current[0]}")
        if name == fail_in:
            raise RuntimeError("backend failed")

    if replayed:
        return call.forks(replayed=True)
    call._run(work)
    return log


def test_side_stream_schedule(monkeypatch):
    # GPU-bound layer (A): global heads first, on the (high-priority) side stream forked after
    # the caller's pending work, local heads in one call on the caller's stream, which joins it
    big = (1, 9 * 45 * 80, 12, 128)
    assert _schedule(monkeypatch, big) == [
        "side waits caller", "sdpa_cudnn ['GLOBAL'] on side", "triton ['INTRA', 'WINDOW'] on caller",
        "caller waits side"]
    # host-bound layer (S): one stream, one call per backend
    small = (1, 5 * 20 * 40, 12, 128)
    assert _schedule(monkeypatch, small) == ["sdpa_cudnn ['GLOBAL'] on caller", "triton ['INTRA', 'WINDOW'] on caller"]
    # ... unless captured in a CUDA graph, whose replays cost no host time, or replayed from C++
    assert _schedule(monkeypatch, small, capturing=True) == _schedule(monkeypatch, big)
    assert _schedule(monkeypatch, small, replayed=True)
    with ok.single_stream():
        assert "side waits caller" not in _schedule(monkeypatch, big)
        assert not _schedule(monkeypatch, small, replayed=True)
    assert ok.settings().overlap  # restored on exit
    with ok.use_settings(overlap_min_flops=0):
        assert "side waits caller" in _schedule(monkeypatch, small)


def test_side_stream_joins_after_a_failure(monkeypatch):
    # a failing backend: the caller still joins the side stream (kernels launched there write
    # the caller's tensors) before the error propagates
    seen = []
    real = _FakeStream.wait_stream
    monkeypatch.setattr(_FakeStream, "wait_stream", lambda self, other: seen.append((self.name, other.name))
                        or real(self, other))
    for failing in ("sdpa_cudnn", "triton"):  # the side stream's backend, the caller's
        seen.clear()
        with pytest.raises(RuntimeError, match="backend failed"):
            _schedule(monkeypatch, (1, 9 * 45 * 80, 12, 128), fail_in=failing)
        assert seen == [("side", "caller"), ("caller", "side")], failing
    call = ok.prepare(torch.randn(1, 4000, 12, 16), ok.RoutingPlan.from_counts((5, 20, 40), 5, 4, 3))
    assert call.global_flops == 4.0 * 4000**2 * 16 * 5


def test_side_streams_are_per_thread_and_high_priority(monkeypatch):
    # a thread capturing a CUDA graph forks onto its own side stream, never one that another
    # thread's eager calls use; the side stream has the highest priority
    import threading

    from oasis_kernels import streams

    made = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device, priority=0: made.append((device, priority)) or object())
    monkeypatch.setattr(streams, "_SIDE_STREAMS", threading.local())
    device = torch.device("cuda", 0)
    mine = streams.side_stream(device)
    assert streams.side_stream(device) is mine  # cached
    other = []
    thread = threading.Thread(target=lambda: other.append(streams.side_stream(device)))
    thread.start()
    thread.join()
    assert other[0] is not mine
    assert made == [(device, -1000), (device, -1000)]


def test_deterministic_has_one_meaning_in_every_backend():
    """deterministic=True: only backends whose backward repeats bit for bit; the default lets the
    fastest serve. Each backend states it, and explain shows the declines."""
    from oasis_kernels.backends import BACKENDS

    assert BACKENDS["triton"].deterministic_backward and BACKENDS["reference"].deterministic_backward
    assert BACKENDS["sdpa_cpu"].deterministic_backward
    assert not BACKENDS["sdpa_cudnn"].deterministic_backward and not BACKENDS["sdpa_efficient"].deterministic_backward
    assert BACKENDS["sdpa_flash"].deterministic_backward == torch.are_deterministic_algorithms_enabled()
    q = torch.randn(1, 30, 4, 64, device=DEVICE)
    with pytest.raises(ok.BackendError, match="backward is not deterministic"):
        ok.decide(q, PLAN, {"global": "sdpa_efficient"}, deterministic=True)
    assert "backward is not deterministic" in ok.explain(q, PLAN, deterministic=True) or DEVICE == "cpu"
    for d in ok.decide(q, PLAN, deterministic=True).decisions:
        assert BACKENDS[d.backend].deterministic_backward, d
    # the flag is part of a call's signature
    grid, modes, window = PLAN.as_op_args()
    args = (q, q, q, (tuple(grid), tuple(modes), tuple(window)), 0.125, "auto")
    assert lookup(*args, True) is not lookup(*args, False) and lookup(*args, True).deterministic
