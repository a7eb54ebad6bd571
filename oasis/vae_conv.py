"""The Wan VAE's convolutions on the fastest cuDNN engine for each geometry.

PyTorch asks cuDNN's heuristic for one engine per convolution (and in benchmark mode times a few).
For the decoder's channels-last bf16 convolutions that choice is far from the best engine cuDNN has:
the 96-channel 3x3x3 convolution at 720p runs at ~285-430 TFLOP/s through ``F.conv3d`` and at ~560
on the fastest of the ~30 engine configurations cuDNN's heuristic lists (docs/PERF.md entry 18c).
With the cuDNN frontend (``pip install nvidia-cudnn-frontend``) installed, :func:`conv` builds the
convolution as a cuDNN graph once per geometry (the flashinfer-style plan/run split), times every
configuration its heuristics A and B list (~60; the fallback list's generic engines only when they
list none) on the first call's own tensors, and runs the fastest from then on; the choice is kept on
disk (:func:`choices_file`), so a later process builds only that configuration instead of timing
them all. The bias and a residual branch follow in one pass
(:func:`oasis.vae_kernels.add_bias_`): cuDNN can fuse them into the convolution, but only with
kernels it compiles at run time (~0.3 s each to build, and not faster than the precompiled ones
plus that pass: entry 18c).

The tuned path is used inside :func:`tuning` (``WanVAE.autotune``); elsewhere, and for every case it
does not serve (the CPU, float32/float64, channels-first tensors, gradients wanted, the frontend
missing, a geometry no engine takes), :func:`conv` is ``F.conv2d``/``F.conv3d``: the same arithmetic.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import numbers
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import vae_kernels
from .vae_kernels import add_bias_, conv3d_few_in

__all__ = ["conv", "upsample2x_conv3x3", "phase_weights", "cuda_kernel", "cuda_kernel_takes",
           "few_out_kernel_takes", "tuning", "frontend_missing", "plan_count", "clear_plans", "choices_file",
           "set_choices_file", "tuning_stats"]

_LOG = logging.getLogger(__name__)
_TUNING = contextvars.ContextVar("oasis_vae_conv_tuning", default=False)
_CUDA_K3 = contextvars.ContextVar("oasis_vae_conv_cuda_k3", default=False)  # False, True (any width) or widths
#: the output widths whose causal 3x3x3 convolutions ``WanVAE.conv_kernel = "auto"`` (the default) runs on the CUDA
#: kernel: 192, where cuDNN's 128-wide tiles pad to 256 and ours is exact, reads the cached frames where they lie
#: and takes norm2 in conv1's epilogue. Per call under the power cap it is slower than cuDNN's (1.61 against 1.57
#: ms, 1.21 against 1.14 J at 360p, H100), but the decode takes 12-17 ms and 11-20 J less than with cuDNN everywhere
#: (docs/PERF.md 18za); at 384 it loses outright (1.50 against 1.37 ms at 180p, 0.70 against 0.55 at 90p), and 96
#: input channels it does not take.
AUTO_CUDA_WIDTHS = frozenset({192})
#: part of each recorded choice's key: raised when the way configurations are timed or listed changes,
#: so that choices made the old way are timed again (2: an untimed first run before the timed ones;
#: 3: heuristic B's configurations as well)
CHOICE_VERSION = 3
#: candidates needing more scratch memory than this are not tried
WORKSPACE_LIMIT = 256 << 20
_PLANS: dict = {}  # geometry -> _ConvPlan, or None where the frontend declined it
_HANDLES: dict = {}  # device index -> cuDNN handle
_FRONTEND: list = []  # [module or None, reason]
_CHOICES: dict = {"path": None, "set": False, "loaded": None}  # the file of engine choices, and its contents
_TIMED = {"geometries": 0, "seconds": 0.0}  # what timing cost this process
# one lock over planning, timing and launching: the handle's stream is set per call, and a plan's
# configurations are timed once (the VAE is driven from one thread; the lock keeps others correct)
_LOCK = threading.RLock()


def tuning_stats() -> tuple[int, float]:
    """(geometries timed, seconds spent timing them) in this process: the first call's one-off cost."""
    return _TIMED["geometries"], _TIMED["seconds"]


def _default_choices_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "oasis" / "cudnn_conv_choices.json"


def choices_file() -> Path | None:
    """Where the engine chosen for each geometry is kept between processes (None: nowhere).

    By default ``$XDG_CACHE_HOME/oasis/cudnn_conv_choices.json`` (``~/.cache/...``): a later process
    builds only the recorded configuration of a geometry instead of timing them all (the first 720p
    decode times ~50 geometries: 13 s on an H200 at 427a7d6). Entries are keyed by GPU, cuDNN version and geometry, and a
    recorded choice is timed again where its configuration no longer stands at the recorded place of
    cuDNN's list under the recorded name, or fails to run (then the record is dropped)."""
    return _CHOICES["path"] if _CHOICES["set"] else _default_choices_file()


def set_choices_file(path) -> None:
    """Keep the choices in ``path`` instead (None: keep none, time every geometry in each process)."""
    _CHOICES.update(path=None if path is None else Path(path), set=True, loaded=None)


def _choices() -> dict:
    if _CHOICES["loaded"] is None:
        path, data = choices_file(), {}
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:
                _LOG.warning("ignoring the cuDNN engine choices in %s (%s); they are timed again", path, e)
                data = {}
        _CHOICES["loaded"] = data
    return _CHOICES["loaded"]


def _record_choice(key: str, choice: dict) -> None:
    _choices()[key] = choice
    _write_choices()


def _forget_choice(key: str) -> None:
    """Drop a recorded choice that failed to run (a later process times the geometry again)."""
    _choices().pop(key, None)
    _write_choices(drop=key)


def _write_choices(drop: str | None = None) -> None:
    """This process's choices merged with what other processes wrote meanwhile (ours win), less
    ``drop``, replaced atomically (two processes may each miss the other's latest: they time again)."""
    path = choices_file()
    if path is None:
        return
    data = dict(_choices())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            try:
                on_disk = json.loads(path.read_text())
                if isinstance(on_disk, dict):
                    data = {**on_disk, **data}
            except ValueError:
                pass
        data.pop(drop, None)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        _LOG.warning("could not keep the cuDNN engine choices in %s (%s)", path, e)


@contextlib.contextmanager
def cuda_kernel(enabled: bool = True, widths=None):
    """Within this block (on this thread), the causal 3x3x3 convolutions that :func:`cuda_kernel_takes`
    run on the CUDA kernel (:mod:`oasis.vae_cuda`), their cached frames read where they lie; ``widths``: only
    those with these output channel counts (an iterable of positive ints; None: every one the kernel takes)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True or False, got {enabled!r}")
    if widths is not None:
        widths = _widths(widths)
    token = _CUDA_K3.set(enabled and (True if widths is None else widths))
    try:
        yield
    finally:
        _CUDA_K3.reset(token)


def _widths(widths) -> frozenset:
    """``widths`` as a frozenset of positive ints, else a ValueError naming it."""
    try:
        items = list(widths)
    except TypeError:
        items = None
    if not items or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c <= 0 for c in items):
        raise ValueError(f"widths must be positive channel counts or None, got {widths!r}")
    return frozenset(int(c) for c in items)


def cuda_kernel_takes(x: torch.Tensor, weight: torch.Tensor, time_pad: int, *, prev: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None, norm: bool = False) -> bool:
    """Whether a causal convolution of ``weight`` over ``time_pad`` cached frames ``prev`` and ``x``'s new ones
    (or its input's stand-in of the same dtype, device and layout), plus ``residual`` (and with the next
    layer's norm applied in its epilogue: ``norm``), runs on the CUDA kernel here
    (:func:`oasis.vae_cuda.conv3d_k3`): inside :func:`cuda_kernel`, for one of its widths, and where
    :func:`oasis.vae_cuda.why_not` has no reason against it."""
    widths = _CUDA_K3.get()
    if not widths or time_pad != 2 or not x.is_cuda or (widths is not True and weight.shape[0] not in widths):
        return False
    from . import vae_cuda

    return vae_cuda.why_not(x, weight, prev=prev, residual=residual, norm=norm) is None


def few_out_kernel_takes(x: torch.Tensor, weight: torch.Tensor, time_pad: int, *,
                         prev: torch.Tensor | None = None) -> bool:
    """Whether a causal convolution of ``weight`` over ``time_pad`` cached frames ``prev`` and ``x``'s new ones
    runs on the output convolution's CUDA kernel (:func:`oasis.vae_cuda.conv3d_few_out`: 1 to 5 output
    channels, where cuDNN's engines pad them to 64): wherever :func:`oasis.vae_cuda.few_out_why_not` has no
    reason against it, whatever :func:`cuda_kernel` says (docs/PERF.md entry 18p)."""
    if time_pad != 2 or not x.is_cuda or not 1 <= weight.shape[0] <= 5:
        return False
    from . import vae_cuda

    return vae_cuda.few_out_why_not(x, weight, prev=prev) is None


@contextlib.contextmanager
def tuning(enabled: bool = True):
    """Within this block (on this thread), :func:`conv` runs eligible convolutions on the fastest
    cuDNN engine, timed once per geometry."""
    token = _TUNING.set(bool(enabled))
    try:
        yield
    finally:
        _TUNING.reset(token)


def _frontend():
    if not _FRONTEND:
        try:
            import cudnn  # nvidia-cudnn-frontend

            cudnn.backend_version()  # loads libcudnn: fails where there is none
            _FRONTEND[:] = [cudnn, None]
        except Exception as e:  # ImportError, or no usable cuDNN library
            _FRONTEND[:] = [None, f"the cuDNN frontend is not usable ({type(e).__name__}: {e})"]
    return _FRONTEND[0]


def frontend_missing() -> str | None:
    """Why the tuned path cannot run here (None when the cuDNN frontend is importable)."""
    _frontend()
    return _FRONTEND[1]


def plan_count() -> int:
    """Geometries planned so far (declined ones included)."""
    return len(_PLANS)


def clear_plans() -> None:
    """Forget every plan of this process (the choices file stays)."""
    _PLANS.clear()


def _channels_last_strides(shape) -> list[int]:
    """Dense strides of ``[N, C, *spatial]`` with the channels innermost (size-1 dims included): what
    the cuDNN graph declares, whatever strides PyTorch gave the size-1 dims."""
    strides = [0] * len(shape)
    acc = shape[1]
    strides[1] = 1
    for i in range(len(shape) - 1, 1, -1):
        strides[i] = acc
        acc *= shape[i]
    strides[0] = acc
    return strides


def _dense_channels_last(t: torch.Tensor) -> bool:
    """PyTorch's channels-last contiguity (it ignores the strides of size-1 dims: a time slice of one
    video is dense)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return fmt is not None and t.is_contiguous(memory_format=fmt)


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """``t`` (dense channels-last) as a view with the canonical strides (size-1 dims differ at most)."""
    return t.as_strided(t.shape, _channels_last_strides(t.shape))


def _out_shape(x, w, stride, padding, padding_after) -> list[int]:
    sp = [(x.shape[2 + i] + padding[i] + padding_after[i] - w.shape[2 + i]) // stride[i] + 1
          for i in range(x.dim() - 2)]
    return [x.shape[0], w.shape[0], *sp]


def _torch_conv(x, weight, bias, residual, stride, padding, padding_after):
    fn = F.conv3d if x.dim() == 5 else F.conv2d
    if padding_after != padding:  # zeros on each side, explicitly (F.pad lists the last dim first)
        x = F.pad(x, [p for pair in zip(padding[::-1], padding_after[::-1]) for p in pair])
        padding = 0
    y = fn(x, weight, None, stride, padding)
    return add_bias_(y, bias, residual)


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, *, stride=1, padding=0, padding_after=None) -> torch.Tensor:
    """``conv(x, weight) + bias[c] + residual`` for images ``[N, C, H, W]`` or videos ``[N, C, T, H, W]``.

    ``bias``: ``[C_out]``; ``residual``: the output's shape; both added in one pass after the
    convolution. ``padding``: zeros before each spatial dim, ``padding_after`` after it (default: the
    same), as the encoder's downsamplers pad right and bottom only. Inside :func:`tuning` on CUDA, with 16-bit channels-last ``x`` and ``weight``, the
    fastest cuDNN engine runs the convolution (see the module's docstring); else PyTorch's.
    """
    nd = x.dim() - 2
    stride = (stride,) * nd if isinstance(stride, int) else tuple(stride)
    padding = (padding,) * nd if isinstance(padding, int) else tuple(padding)
    padding_after = padding if padding_after is None else (
        (padding_after,) * nd if isinstance(padding_after, int) else tuple(padding_after))
    if padding_after == padding and _few_inputs(x, weight, bias, stride, padding):
        return add_bias_(conv3d_few_in(x, weight, bias), None, residual)
    if _TUNING.get() and _eligible(x, weight):
        with _LOCK:
            plan = _plan(x, weight, stride, padding, padding_after)
            if plan is not None:
                try:
                    y = plan.run(x, weight)
                except Exception as e:
                    if plan.proven:  # a configuration that ran before: a real error, not a decline
                        raise
                    # a geometry's first call (its candidates timed, or the recorded choice built)
                    _LOG.warning("no cuDNN engine ran the convolution %s (%s); PyTorch's path runs it",
                                 tuple(x.shape), e)
                    _PLANS[plan.key] = None
                    _forget_choice(plan.record_key)
                else:
                    plan.proven = True
                    return add_bias_(y, bias, residual)
    return _torch_conv(x, weight, bias, residual, stride, padding, padding_after)


#: the rows of a 3x3 kernel each phase of a 2x nearest upsampling reads, as the rows of its 2x2 kernel: output
#: row 2i reads input rows i - 1 (tap 0) and i (taps 1 and 2), row 2i + 1 rows i (taps 0 and 1) and i + 1 (tap 2)
_PHASE_TAPS = ((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1))


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel ``[Co, C, 3, 3]`` as the 2x2 kernels of the four phases of a 2x nearest upsampling,
    ``[4 Co, C, 2, 2]`` (phase ``(a, b)``, output rows ``2i + a`` and columns ``2j + b``, at channels
    ``(2a + b) Co``): taps summed in at least float32 and rounded once to ``weight``'s dtype, in its layout."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    m = torch.tensor(_PHASE_TAPS, dtype=wide, device=weight.device)  # [phase a, 2 rows, 3 taps]
    k = torch.einsum("air,bjs,ocrs->abocij", m, m, weight.to(wide))
    fmt = torch.channels_last if weight.stride(1) == 1 and weight.shape[1] > 1 else torch.contiguous_format
    return k.reshape(4 * weight.shape[0], *weight.shape[1:2], 2, 2).to(weight.dtype).contiguous(memory_format=fmt)


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest-exact"), weight, bias, padding=1)`` for images
    ``[N, C, H, W]`` and a 3x3 ``weight`` ``[Co, C, 3, 3]``, without the upsampled image: each output pixel
    ``(2i + a, 2j + b)`` reads 2x2 distinct input pixels, so the four phases are one 2x2 convolution of ``x``
    padded by one on each side, to ``4 Co`` channels (:func:`phase_weights`: 4/9 of the multiply-adds), woven
    into the output with the bias in one pass (:func:`oasis.vae_kernels.interleave_phases`). The same sums as
    the resize and the 3x3 convolution; the summed taps are rounded once to the weight's dtype (docs/PERF.md
    entry 18s)."""
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"upsample2x_conv3x3 takes images [N, C, H, W] and a 3x3 weight [Co, C, 3, 3], got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if vae_kernels._needs_grad(weight):
        k = phase_weights(weight)
    else:
        k = vae_kernels.kept_per_tensor(weight, phase_weights, tag="phases")
    return vae_kernels.interleave_phases(conv(x, k, padding=1), bias)


def _few_inputs(x, weight, bias, stride, padding) -> bool:
    """A channels-last video convolution from at most 4 channels with a spatial kernel (odd, padded by
    half, kw * C <= 16) over dense pixels, as the encoder's first (3 -> 96, 3x3x3), where the Triton passes
    run: the Triton kernel :func:`oasis.vae_kernels.conv3d_few_in` (cuDNN's engines run it at ~22 TFLOP/s)."""
    co, ci, _, kh, kw = weight.shape if weight.dim() == 5 else (0,) * 5
    return (x.dim() == 5 and 0 < ci <= 4 and 0 < co <= 256 and kh * kw > 1 and kh % 2 == 1 and kw % 2 == 1
            and kw * ci <= 16 and stride == (1, 1, 1) and padding == (0, kh // 2, kw // 2)
            and (ci == 1 or x.stride(1) == 1) and (x.shape[4] == 1 or x.stride(4) == ci)
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and weight.dtype == x.dtype
            and weight.device == x.device and vae_kernels.on_triton_device(x)
            and not vae_kernels._needs_grad(x, weight, bias))


def _eligible(x, weight) -> bool:
    # 16-byte aligned operands: what the planned configurations assume (the VAE's frame views are)
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and x.dim() in (4, 5) and weight.device == x.device and not torch.is_grad_enabled()
            and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
            and _dense_channels_last(x) and _dense_channels_last(weight) and _frontend() is not None)


def _plan(x, weight, stride, padding, padding_after):
    key = (x.device.index, x.dtype, tuple(x.shape), tuple(weight.shape), stride, padding, padding_after)
    if key not in _PLANS:
        try:
            _PLANS[key] = _ConvPlan(key, x, weight, stride, padding, padding_after)
        except Exception as e:  # a geometry the frontend does not take: PyTorch's path for it
            _LOG.warning("cuDNN frontend declined the convolution %s: %s; PyTorch's path runs it",
                         key[2:], e)
            _PLANS[key] = None
    return _PLANS[key]


def _handle(device: torch.device):
    cudnn = _frontend()
    if device.index not in _HANDLES:
        with torch.cuda.device(device):
            _HANDLES[device.index] = cudnn.create_handle()
    return _HANDLES[device.index]


class _ConvPlan:
    """One convolution geometry as a cuDNN graph, and which of its engine configurations runs it."""

    def __init__(self, key, x, weight, stride, padding, padding_after):
        cudnn = _frontend()
        self.key = key
        io = cudnn.data_type.BFLOAT16 if x.dtype == torch.bfloat16 else cudnn.data_type.HALF
        f32 = cudnn.data_type.FLOAT
        self.device = x.device
        self.handle = _handle(x.device)
        self.out_shape = _out_shape(x, weight, stride, padding, padding_after)
        if min(self.out_shape) < 1:
            raise ValueError(f"empty output {self.out_shape}")
        nd = x.dim() - 2

        def graph(modes):
            g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=self.handle)
            X = g.tensor(name="x", dim=list(x.shape), stride=_channels_last_strides(x.shape), data_type=io)
            W = g.tensor(name="w", dim=list(weight.shape), stride=_channels_last_strides(weight.shape), data_type=io)
            Y = g.conv_fprop(image=X, weight=W, pre_padding=list(padding), post_padding=list(padding_after),
                             stride=list(stride), dilation=[1] * nd, compute_data_type=f32)
            Y.set_output(True).set_data_type(io).set_dim(self.out_shape).set_stride(_channels_last_strides(self.out_shape))
            g.validate()
            g.build_operation_graph()
            g.create_execution_plans(modes)
            g.check_support()
            if not g.get_execution_plan_count():
                raise RuntimeError(f"no engine configuration from {modes}")
            return g, [X, W, Y]

        # the configurations of both heuristics (B lists ~25 that A does not, one of them the fastest
        # at 192 channels, 360p); the fallback list's generic engines (one takes ~2 s a call at 720p)
        # only when those give none
        try:
            g, self.order = graph([cudnn.heur_mode.A, cudnn.heur_mode.B])
        except Exception as e:
            _LOG.debug("heuristics A and B gave no configuration (%s); the fallback list", e)
            g, self.order = graph([cudnn.heur_mode.FALLBACK])
        self.graph = g
        # one index per configuration (a configuration both heuristics list is timed once)
        first: dict[str, int] = {}
        for i in range(g.get_execution_plan_count()):
            first.setdefault(g.get_plan_name_at_index(i), i)
        self.candidates = list(first.values())  # not empty: graph() raised otherwise
        self.best = None  # chosen at the first run, on its tensors (or recorded by an earlier process)
        self.proven = False  # the chosen configuration has run once
        self.workspace_size = 0  # the chosen configuration's scratch bytes, taken from torch's allocator per call
        self.times_ms: dict[int, float] = {}
        self.record_key = "|".join(map(str, (CHOICE_VERSION, torch.cuda.get_device_name(x.device),
                                             cudnn.backend_version(), *key[1:])))
        self._recall()

    def _recall(self) -> None:
        """The configuration an earlier process chose for this geometry, if it is still listed and builds."""
        choice = _choices().get(self.record_key)
        if not isinstance(choice, dict):
            return
        i = choice.get("index")
        try:
            if i in self.candidates and self.graph.get_plan_name_at_index(i) == choice.get("name"):
                self.graph.build_plan_at_index(i)
                self.workspace_size = self.graph.get_workspace_size_plan_at_index(i)
                self.best = i
        except Exception as e:  # timed again
            _LOG.debug("recorded cuDNN engine configuration %s not usable: %s", choice, e)

    def _feeds(self, x, weight, out):
        return dict(zip(self.order, (_canonical(x), _canonical(weight), _canonical(out))))

    def _execute(self, index, feeds, workspace):
        cudnn = _frontend()
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(self.device).cuda_stream)
        self.graph.execute_plan_at_index(feeds, workspace, index=index, handle=self.handle)

    def _timed(self, index, feeds, workspace) -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        self._execute(index, feeds, workspace)
        b.record()
        b.synchronize()
        return a.elapsed_time(b)

    def _tune(self, feeds) -> None:
        """Build and time each candidate on this call's tensors: a first run, untimed by events (it
        loads the configuration's kernels: CUDA loads a module at its first launch, which would make
        every candidate look slow once), then, unless its wall time already says it is far slower than
        the fastest so far, a timed run, and where that is within 1.5x of the fastest, two more, the
        median counting."""
        g = self.graph
        start = time.perf_counter()
        for i in self.candidates:
            try:
                g.build_plan_at_index(i)
                size = g.get_workspace_size_plan_at_index(i)
                if size > WORKSPACE_LIMIT:
                    continue
                ws = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
                torch.cuda.synchronize(self.device)
                cold = time.perf_counter()
                self._execute(i, feeds, ws)
                torch.cuda.synchronize(self.device)
                cold_ms = (time.perf_counter() - cold) * 1e3
                best = min(self.times_ms.values(), default=None)
                if best is not None and cold_ms > 3 * best + 2:  # the kernels' loading is ~1 ms
                    continue
                runs = [self._timed(i, feeds, ws)]
                if best is None or runs[0] < 1.5 * best:
                    runs += [self._timed(i, feeds, ws) for _ in range(2)]
                self.times_ms[i] = statistics.median(runs)
            except Exception as e:  # a configuration that does not build or run here
                _LOG.debug("cuDNN engine configuration %d skipped: %s", i, e)
        _TIMED["geometries"] += 1
        _TIMED["seconds"] += time.perf_counter() - start
        if not self.times_ms:
            raise RuntimeError("no engine configuration ran")
        self.best = min(self.times_ms, key=self.times_ms.get)
        self.workspace_size = g.get_workspace_size_plan_at_index(self.best)
        _record_choice(self.record_key, {"index": self.best, "name": g.get_plan_name_at_index(self.best),
                                         "ms": round(self.times_ms[self.best], 4)})

    def run(self, x, weight) -> torch.Tensor:
        fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        with torch.cuda.device(self.device):  # the handle's, the events' and the stream's device
            out = torch.empty(self.out_shape, dtype=x.dtype, device=x.device, memory_format=fmt)
            feeds = self._feeds(x, weight, out)
            if self.best is None:
                self._tune(feeds)
            # the scratch memory from torch's caching allocator, freed (stream-ordered) after the call:
            # a plan holds none between calls, however many geometries a process meets
            ws = torch.empty(max(self.workspace_size, 1), dtype=torch.uint8, device=self.device)
            self._execute(self.best, feeds, ws)
        return out

    @property
    def name(self) -> str:
        return self.graph.get_plan_name_at_index(self.best) if self.best is not None else "(not tuned)"
