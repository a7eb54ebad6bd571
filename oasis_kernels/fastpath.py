"""The C++ replay of a prepared call's eager runs (``oasis_kernels._C``, csrc/eager_routed.cpp).

At small layers an eager routed call is host-bound: on the H200 at S (5,20,40) the Python path
of a forward+backward (views, copies, three Triton launches, stream fork and join) took ~1.1-1.4
ms of host time for ~0.5 ms of GPU work (docs/PERF.md, entry 11). The replay removes the Python
from the repeat calls of a prepared call (:class:`oasis_kernels.call.RoutedCall`):

1. The first eager forward (backward) of a call runs its Python path while
   :func:`kernels.launching.recording` collects each Triton launch it makes (compiled kernel,
   grid, arguments).
2. When the call's heads went to cuDNN (global) and the Triton kernels (local), that record
   becomes a ``RoutedForward`` / ``RoutedBackward`` of the extension, kept by the call: the global
   head runs, and each launch as the kernel's function handle, grid and parameters, tensors named
   by role (``Q``, ``OUT``, ``DELTA`` ...).
3. Later runs of the call go straight to C++, which makes the same calls as the Python path in
   the same order, on the streams the call's policy says (``RoutedCall.forks``).

Where the extension is not built, the setting ``eager_replay`` is off, the heads went to other
backends, or a run cannot be replayed (CUDA-graph capture, an unaligned pointer, a Triton launch
hook), the Python path runs; the two give the same results (``tests/test_fastpath.py``).
"""

from __future__ import annotations

import importlib.util

import torch

from . import streams
from .plan import Mode, head_runs

__all__ = ["forward", "backward", "UNAVAILABLE"]


def _load_extension():
    """``(the extension or None, why it is None)``. A missing extension is told apart from one
    that fails to load: ``from . import _C`` alone reports a missing one as a circular import
    (the package is still initializing when this module is imported)."""
    if importlib.util.find_spec(f"{__package__}._C") is None:  # a CPU-only install, or built without csrc/
        return None, ("oasis_kernels._C is not built (setup.py builds it only where torch has CUDA and nvcc is "
                      "found; OASIS_BUILD_CUDA=1 makes a failed build loud)")
    try:
        from . import _C
    except ImportError as exc:  # built, but for another torch or missing a library
        return None, f"oasis_kernels._C is built but does not load: {exc}"
    return _C, ""


_C, UNAVAILABLE = _load_extension()

#: the extension's roles (``Role`` in csrc/eager_routed.cpp, exported as ``_C.ROLES``), and the
#: role of each tensor argument name of the Triton kernels
ROLE_NAMES = ("Q", "K", "V", "OUT", "LSE", "HEADS", "DOUT", "DQ", "DK", "DV", "DELTA")
_ROLES = {arg: ROLE_NAMES.index({"O": "OUT", "DO": "DOUT"}.get(arg, arg))
          for arg in ("Q", "K", "V", "O", "LSE", "HEADS", "DO", "DQ", "DK", "DV", "DELTA")}
#: the bindings' version this module calls (``ABI`` in csrc/eager_routed.cpp)
ABI = 2
if _C is not None and (tuple(_C.ROLES) != ROLE_NAMES or getattr(_C, "ABI", 1) != ABI):  # built from other sources
    UNAVAILABLE = (f"oasis_kernels._C has roles {tuple(_C.ROLES)} and bindings version {getattr(_C, 'ABI', 1)}, this "
                   f"package expects {ROLE_NAMES} and {ABI}; rebuild it")
    _C = None
_SCALAR_KINDS = {"i32": 1, "i64": 2, "fp32": 3, "f32": 3, "i1": 4, "i8": 4}


_LAUNCHING = []


def _launching():
    """The Triton launch module, or None where Triton cannot be imported (then nothing is
    replayed: the Python path reports why). Imported on first use: ``import oasis_kernels``
    must not need Triton."""
    if not _LAUNCHING:
        from .backends.triton_local import _kernels
        if _kernels()[0] is None:
            _LAUNCHING.append(None)
        else:
            from .kernels import launching
            _LAUNCHING.append(launching)
    return _LAUNCHING[0]


def _why_not(call) -> str:
    """Why ``call`` cannot be replayed (empty when it can)."""
    launching = _launching()
    if launching is None or not launching.DIRECT_LAUNCH:
        return "direct Triton launches are unavailable" + (f": {launching.DIRECT_UNAVAILABLE}" if launching else "")
    elt = call.dtype.itemsize
    for strides in call.strides:
        # the strides are the call's; the data pointer's alignment is checked per run
        if strides[-1] != 1 or any((st * elt) % 16 for st, n in zip(strides[:-1], call.shape[:-1]) if n > 1):
            return f"needs rows of 16-byte aligned strides and a unit stride on D, got {strides}"
    for d in call.dispatch.decisions:
        want = "sdpa_cudnn" if d.mode == Mode.GLOBAL else "triton"
        if d.backend != want:
            return f"{d.mode.name.lower()} heads go to {d.backend}, not {want}"
    return ""


def _serves(call) -> bool:
    return (_C is not None and call.settings.eager_replay and call.device.type == "cuda"
            and _launching() is not None)


def _transient(q, *tensors) -> bool:
    """Conditions of this run only: record nothing now, try again on the next run."""
    # the compiled kernels' function handles belong to the current device's context
    return (q.device.index != torch.cuda.current_device() or torch.cuda.is_current_stream_capturing()
            or not _launching().no_launch_hooks() or any(x.data_ptr() % 16 for x in (q, *tensors)))


def _launch_spec(launch, checks) -> tuple | None:
    """The ``_C`` launch tuple of a recorded :class:`~kernels.launching.Launch`, or None where it
    cannot be replayed. ``checks``: role name -> the tensor the run passed there."""
    if launch is None:
        return None
    compiled = launch.compiled
    run = compiled.run
    if getattr(run, "global_scratch_size", 0) or getattr(run, "profile_scratch_size", 0):
        return None  # kernels that need scratch memory from Triton's allocator
    params = []
    for name, ty, value in launch.parameters():
        if ty.startswith("*"):
            if name not in _ROLES:
                return None
            if name in checks and value.data_ptr() != checks[name].data_ptr():
                return None  # the Python path passed a copy (e.g. an aligned one)
            params.append((0, _ROLES[name], 0.0))
        elif ty in _SCALAR_KINDS:
            kind = _SCALAR_KINDS[ty]
            params.append((kind, 0, float(value)) if kind == 3 else (kind, int(value), 0.0))
        else:
            return None
    meta = compiled.metadata
    if getattr(meta, "num_ctas", 1) != 1:
        return None  # clusters: Triton's launcher sets scheduling attributes this replay does not
    return (compiled.function, tuple(launch.grid), 32 * meta.num_warps, meta.shared, getattr(meta, "num_ctas", 1),
            bool(getattr(meta, "launch_cooperative_grid", False)), bool(getattr(meta, "launch_pdl", False)), params)


def _heads(call, device):
    """(global head runs as (start, stop, step), the local heads' table as a device tensor of its
    own, kept by the replay, which reads it on any stream: written before this returns)."""
    runs = [(r.start, r.stop, r.step) for d in call.dispatch.decisions if d.mode == Mode.GLOBAL
            for r in head_runs(d.heads)]
    state = call.states.get("triton")
    if state is None:
        return runs, torch.empty(0, dtype=torch.int32, device=device), False
    table = state.on(device).clone()
    torch.cuda.current_stream(device).synchronize()
    return runs, table, True


def _side(call) -> int:
    return streams.side_stream(call.device).cuda_stream if call.forks(replayed=True) else 0


def forward(call, q, k, v, autograd: bool = False):
    """``(out, lse)`` from ``call``'s replay, or None where it does not serve this run.

    ``autograd``: return outputs with a C++ autograd node (its backward replays the prepared
    backward); such runs only replay: before the call has a replay this returns None, and the
    caller's ``torch.autograd.Function`` runs the Python path, which records it."""
    if not _serves(call):
        return None
    prepared = call.replay_forward
    if prepared is None:
        return None if autograd else _prepare_forward(call, q, k, v)
    if prepared is False or not _launching().no_launch_hooks():
        return None
    side = _side(call)
    res = prepared.run_autograd(q, k, v, side) if autograd else prepared.run(q, k, v, side)
    return (res[0], res[1]) if res else None


def backward(call, dout, q, k, v, out, lse):
    """``(dq, dk, dv)`` from ``call``'s replay, or None. ``dout`` is contiguous."""
    if not _serves(call):
        return None
    prepared = call.replay_backward
    if prepared is None:
        return _prepare_backward(call, dout, q, k, v, out, lse)
    if prepared is False or not _launching().no_launch_hooks():
        return None
    res = prepared.run(dout, q, k, v, out, lse, _side(call))
    return (res[0], res[1], res[2]) if res else None


#: replays made; the extension keeps each forward for the process's lifetime (autograd nodes refer to
#: them by index), so this bounds their memory: later calls take the Python path
MAX_REPLAYS = 1024
_made = [0]


def _prepare_forward(call, q, k, v):
    if _made[0] >= MAX_REPLAYS:
        return None
    if _why_not(call):
        call.replay_forward = False
        return None
    if _transient(q, k, v):
        return None
    with _launching().recording() as launches:
        out, lse = call.forward(q, k, v)
    runs, table, has_local = _heads(call, q.device)
    checks = {"Q": q, "K": k, "V": v, "O": out, "LSE": lse}
    specs = [_launch_spec(launch, checks) for launch in launches]
    if len(specs) != int(has_local) or None in specs:
        call.replay_forward = False
    else:
        call.replay_forward = _make_forward(call, runs, table, specs[0] if specs else None)
        _made[0] += 1
    return out, lse


def _make_forward(call, runs, table, spec):
    """A replayed forward whose autograd node calls back here until the call has a replayed backward."""
    made = []

    def backward_fallback(dout, q, k, v, out, lse):
        grads = backward(call, dout, q, k, v, out, lse)
        if call.replay_backward:
            made[0].set_backward(call.replay_backward)
        if grads is None:
            grads = call.backward(dout, q, k, v, out, lse)
        return tuple(grads)

    made.append(_C.make_forward(runs, call.scale, table, spec, backward_fallback, call.settings.cudnn_direct))
    return made[0]


def _prepare_backward(call, dout, q, k, v, out, lse):
    if _why_not(call):
        call.replay_backward = False
        return None
    if _transient(q, k, v, dout, out):
        return None
    with _launching().recording() as launches:
        grads = call.backward(dout, q, k, v, out, lse)
    runs, table, has_local = _heads(call, q.device)
    checks = {"Q": q, "K": k, "V": v, "O": out, "LSE": lse, "DO": dout, "DQ": grads[0], "DK": grads[1],
              "DV": grads[2]}
    specs = [_launch_spec(launch, checks) for launch in launches]
    if len(specs) != 2 * int(has_local) or None in specs:
        call.replay_backward = False
    else:
        call.replay_backward = _C.RoutedBackward(runs, call.scale, table, *(specs or (None, None)),
                                                 call.settings.cudnn_direct)
    return grads
