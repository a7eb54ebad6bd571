"""The eager host path: prepared launch sequences, replayed by the C++ extension.

At small layers an eager routed call is host-bound: on the H200 at S (5,20,40) the Python
dispatch of a forward+backward (views, copies, three Triton launches, stream fork and join)
took ~1.1-1.4 ms of host time for ~0.5 ms of GPU work (docs/PERF.md). This module removes the
Python from the repeat calls:

1. The first eager call of a *signature* (plan, backend request, shapes, strides, dtype,
   device, scale, PyTorch's SDPA switches) runs the Python path, :func:`dispatch.run_forward`
   or :func:`dispatch.run_backward`, while :func:`kernels.local_attention.recording` collects
   each Triton launch it makes (compiled kernel, grid, arguments).
2. When the call's heads went to cuDNN (global) and the Triton kernels (local), that record
   becomes a ``RoutedForward`` / ``RoutedBackward`` of the ``oasis_kernels._C`` extension
   (``csrc/eager_routed.cpp``): the global head runs, and each launch as the kernel's function
   handle, grid and parameters, tensors named by role (``Q``, ``OUT``, ``DELTA`` ...).
3. Later calls of the signature go straight to C++, which makes the same calls as the Python
   path in the same order and on the same streams.

Where the extension is not built, the heads went to other backends, or a call cannot be replayed
(CUDA-graph capture, an unaligned pointer, a Triton launch hook), the Python path runs; the two
give the same results (``tests/test_fastpath.py``). ``OASIS_CPP_EAGER=0`` turns this off.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import dispatch
from .plan import Mode, head_runs

__all__ = ["forward", "backward", "UNAVAILABLE", "ENABLED"]


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

#: OASIS_CPP_EAGER=0 keeps every eager call on the Python path
ENABLED = os.environ.get("OASIS_CPP_EAGER", "1") != "0"

#: signature -> a prepared object, or False where the signature is not served (decided once)
_FORWARD: dict = {}
_BACKWARD: dict = {}
#: the extension's roles (``Role`` in csrc/eager_routed.cpp, exported as ``_C.ROLES``), and the
#: role of each tensor argument name of the Triton kernels
ROLE_NAMES = ("Q", "K", "V", "OUT", "LSE", "HEADS", "DOUT", "DQ", "DK", "DV", "DELTA")
_ROLES = {arg: ROLE_NAMES.index({"O": "OUT", "DO": "DOUT"}.get(arg, arg))
          for arg in ("Q", "K", "V", "O", "LSE", "HEADS", "DO", "DQ", "DK", "DV", "DELTA")}
if _C is not None and tuple(_C.ROLES) != ROLE_NAMES:  # an extension built from other sources
    UNAVAILABLE = f"oasis_kernels._C has roles {tuple(_C.ROLES)}, this package expects {ROLE_NAMES}; rebuild it"
    _C = None
_SCALAR_KINDS = {"i32": 1, "i64": 2, "fp32": 3, "f32": 3, "i1": 4, "i8": 4}


_LOCAL_ATTENTION = None


def _kernels():
    """The Triton kernels' module, or None where Triton cannot be imported (then nothing is
    replayed: the Python path reports why). Imported on first use: ``import oasis_kernels``
    must not need Triton."""
    global _LOCAL_ATTENTION
    if _LOCAL_ATTENTION is None:
        from .backends.triton_local import _kernels as import_kernels
        _LOCAL_ATTENTION = import_kernels()[0] or False
    return _LOCAL_ATTENTION or None


def _key(q, k, v, plan, scale, request, extra=()) -> tuple:
    la = _kernels()
    # the kernels' tuning state too: a config list or autotuner swapped (tests, local_bench.py)
    # must not replay a launch recorded under another
    return (plan, request, tuple(q.shape), tuple(k.shape), q.stride(), k.stride(), v.stride(), q.dtype, k.dtype,
            v.dtype, q.device, q.requires_grad,
            scale, dispatch._global_switches(), la.knobs.runtime.debug, la.knobs.compilation.instrumentation_mode,
            la.tuning_state(), *extra)


def _side_stream(device) -> int:
    return dispatch._side_stream(device).cuda_stream if dispatch.OVERLAP else 0


def _why_not(q, k, v, plan, request) -> str:
    """Why calls of this signature cannot be prepared (empty when they can)."""
    la = _kernels()
    if not la.DIRECT_LAUNCH:
        return "direct Triton launches are off"
    elt = q.element_size()
    for x in (q, k, v):
        # the strides are in the key; the data pointer's alignment is checked per call
        if x.stride(-1) != 1 or any((st * elt) % 16 for st, n in zip(x.stride()[:-1], x.shape[:-1]) if n > 1):
            return f"needs rows of 16-byte aligned strides and a unit stride on D, got {x.stride()=}"
    for d in dispatch._decide_cached(q, plan, request, k, v).decisions:
        want = "sdpa_cudnn" if d.mode == Mode.GLOBAL else "triton"
        if d.backend != want:
            return f"{d.mode.name.lower()} heads go to {d.backend}, not {want}"
    return ""


def _transient(q, *tensors) -> bool:
    """Conditions of this call only: record nothing now, try again on the next call."""
    la = _kernels()
    # the compiled kernels' function handles belong to the current device's context
    return (q.device.index != torch.cuda.current_device() or torch.cuda.is_current_stream_capturing()
            or not la._no_launch_hooks() or any(x.data_ptr() % 16 for x in (q, *tensors)))


def _launch_spec(launch, checks) -> tuple | None:
    """The ``_C`` launch tuple of a recorded :class:`~kernels.local_attention.Launch`, or None
    where it cannot be replayed. ``checks``: role name -> the tensor the call passed there."""
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


def _local_heads(q, k, v, plan, request):
    """(global head runs as (start, stop, step), the local heads' table tensor)."""
    decisions = dispatch._decide_cached(q, plan, request, k, v).decisions
    runs = [(r.start, r.stop, r.step) for d in decisions if d.mode == Mode.GLOBAL for r in head_runs(d.heads)]
    local = [(d.mode, d.heads) for d in decisions if d.mode != Mode.GLOBAL]
    if local:
        from .backends.triton_local import _head_table
        table = _head_table(local, q.device)[0].clone()  # its own copy, kept with the prepared object
        # replays read it on any stream: it must be written before this returns
        torch.cuda.current_stream(q.device).synchronize()
    else:
        table = torch.empty(0, dtype=torch.int32, device=q.device)
    return runs, table, bool(local)


def forward(q, k, v, plan, scale: float, request: str, deterministic: bool, autograd: bool = False):
    """``(out, lse)`` from the prepared path, or None where it does not serve this call.

    ``autograd``: return outputs with a C++ autograd node (its backward replays the prepared
    backward); such calls only replay: the first call of a signature returns None, and the
    caller's ``torch.autograd.Function`` prepares the signature with a plain call."""
    if _C is None or not ENABLED or q.device.type != "cuda" or _kernels() is None:
        return None
    key = _key(q, k, v, plan, scale, request, (deterministic,))
    prepared = _FORWARD.get(key)
    if prepared is None:
        return None if autograd else _prepare_forward(key, q, k, v, plan, scale, request, deterministic)
    if prepared is False or not _kernels()._no_launch_hooks():
        return None
    side = _side_stream(q.device)
    res = prepared.run_autograd(q, k, v, side) if autograd else prepared.run(q, k, v, side)
    return (res[0], res[1]) if res else None


def backward(dout, q, k, v, out, lse, plan, scale: float, request: str, deterministic: bool):
    """``(dq, dk, dv)`` from the prepared path, or None. ``dout`` is contiguous."""
    if _C is None or not ENABLED or q.device.type != "cuda" or _kernels() is None:
        return None
    key = _key(q, k, v, plan, scale, request, (deterministic,))
    prepared = _BACKWARD.get(key)
    if prepared is None:
        return _prepare_backward(key, dout, q, k, v, out, lse, plan, scale, request, deterministic)
    if prepared is False or not _kernels()._no_launch_hooks():
        return None
    res = prepared.run(dout, q, k, v, out, lse, _side_stream(q.device))
    return (res[0], res[1], res[2]) if res else None


#: prepared signatures per pass; later new signatures take the Python path. Prepared objects
#: are never freed (kernels in flight on any stream may read their tensors, and autograd nodes
#: refer to them), so this bounds their memory
MAX_PREPARED = 1024


def _remember(table: dict, key, value) -> None:
    if len(table) < MAX_PREPARED:
        table[key] = value


def _prepare_forward(key, q, k, v, plan, scale, request, deterministic):
    if len(_FORWARD) >= MAX_PREPARED:
        return None
    if _why_not(q, k, v, plan, request):
        _remember(_FORWARD, key, False)
        return None
    if _transient(q, k, v):
        return None
    with _kernels().recording() as launches:
        out, lse = dispatch.run_forward(q, k, v, plan, scale, request)
    runs, table, has_local = _local_heads(q, k, v, plan, request)
    checks = {"Q": q, "K": k, "V": v, "O": out, "LSE": lse}
    specs = [_launch_spec(launch, checks) for launch in launches]
    if len(specs) != int(has_local) or None in specs:
        _remember(_FORWARD, key, False)
    else:
        _remember(_FORWARD, key, _make_forward(runs, table, specs[0] if specs else None, plan, scale, request,
                                               deterministic))
    return out, lse


def _make_forward(runs, table, spec, plan, scale, request, deterministic):
    """A prepared forward whose autograd node calls back here until it has a prepared backward."""
    made = []

    def backward_fallback(dout, q, k, v, out, lse):
        grads = backward(dout, q, k, v, out, lse, plan, scale, request, deterministic)
        prepared = _BACKWARD.get(_key(q, k, v, plan, scale, request, (deterministic,)))
        if prepared is not None and prepared is not False:
            made[0].set_backward(prepared)
        if grads is None:
            grads = dispatch.run_backward(dout, q, k, v, out, lse, plan, scale, request, deterministic)
        return tuple(grads)

    made.append(_C.make_forward(runs, scale, table, spec, backward_fallback))
    return made[0]


def _prepare_backward(key, dout, q, k, v, out, lse, plan, scale, request, deterministic):
    if len(_BACKWARD) >= MAX_PREPARED:
        return None
    if _why_not(q, k, v, plan, request):
        _remember(_BACKWARD, key, False)
        return None
    if _transient(q, k, v, dout, out):
        return None
    with _kernels().recording() as launches:
        grads = dispatch.run_backward(dout, q, k, v, out, lse, plan, scale, request, deterministic)
    runs, table, has_local = _local_heads(q, k, v, plan, request)
    checks = {"Q": q, "K": k, "V": v, "O": out, "LSE": lse, "DO": dout, "DQ": grads[0], "DK": grads[1],
              "DV": grads[2]}
    specs = [_launch_spec(launch, checks) for launch in launches]
    if len(specs) != 2 * int(has_local) or None in specs:
        _remember(_BACKWARD, key, False)
    else:
        _remember(_BACKWARD, key, _C.RoutedBackward(runs, scale, table, *(specs or (None, None))))
    return grads
