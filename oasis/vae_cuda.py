"""The Wan VAE's CUDA kernels (``csrc/vae_conv/``), its convolutions and norm pass: loading, weight packing, calls.

``torch.ops.oasis_vae.conv3d_k3`` is an implicit GEMM on Hopper's wgmma with TMA loads (sm_90a only):
output tiles exactly 96 or 192 channels wide (cuDNN's engines pad 96 and 192 to 128-wide tiles), the
causal cache's two frames read from their own tensor (no copy in front of the new frames), the bias and
a residual added before the one bf16 store (docs/PERF.md entry 18j). It is built on first use from the
checkout's ``csrc/vae_conv/`` with ``torch.utils.cpp_extension.load`` (ninja; cached in torch's
extensions folder, rebuilt when a source changes, guarded by torch's file lock) where setup.py did not build it
(``oasis._vae_conv``); :func:`library` says whether that worked, or why not. Nothing here runs at import.

:func:`why_not` is the one predicate that says which calls the kernel takes; :func:`conv3d_k3` runs it.

``torch.ops.oasis_vae.conv3d_few_out`` is the decoder's output convolution (96 -> 3 channels): mma.sync with a
row's three horizontal taps as the GEMM's columns (N = 9 padded to 16, where cuDNN pads 3 to 64), the cached
frames read where they lie (docs/PERF.md entry 18p). :func:`few_out_why_not` says which calls it takes,
:func:`conv3d_few_out` runs it.

``torch.ops.oasis_vae.norm_silu`` is the norm pass (``SiLU(RMSNorm)`` over channels, with the producer's bias, a
residual sum and the cache tail) for channels-last 16-bit activations: warps streaming 1536-byte units, each position's
sum reduced inside the warp (docs/PERF.md entry 18y). :func:`norm_why_not` says which calls it takes;
:func:`oasis.vae_kernels.norm_silu` runs it there and Triton's pass elsewhere.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .vae_kernels import _flat_stride
from .vae_kernels import kept_per_tensor as _kept

__all__ = ["library", "why_not", "channels_why_not", "pack_weight", "conv3d_k3", "conv3d_k3_reference", "SOURCES",
           "NVCC_FLAGS", "NORM_CHANNELS", "few_out_why_not", "pack_few_out_weight", "conv3d_few_out",
           "FEW_OUT_MAX_CHANNELS", "norm_why_not", "norm_silu"]

SOURCES = Path(__file__).resolve().parents[1] / "csrc" / "vae_conv"
#: Hopper only (wgmma, TMA): the card the kernel is measured on
NVCC_FLAGS = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a"]
CXX_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden"]
#: keeps a statically linked libstdc++'s symbols private to the library (as oasis_kernels' CUDA builds do)
LD_FLAGS = ["-Wl,--exclude-libs,ALL"]


@functools.lru_cache(maxsize=1)
def library() -> tuple[bool, str]:
    """``(True, how it was loaded)`` once ``torch.ops.oasis_vae``'s ops are registered, else ``(False, why not)``:
    the extension setup.py built (``oasis._vae_conv``), else a JIT build of ``csrc/vae_conv/``."""
    if hasattr(torch.ops, "oasis_vae") and hasattr(torch.ops.oasis_vae, "conv3d_k3"):
        return _registered("already registered")
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is built without CUDA"
    spec = importlib.util.find_spec(f"{__package__}._vae_conv")
    if spec is not None and spec.origin:
        try:
            torch.ops.load_library(spec.origin)
        except OSError as exc:  # built for another torch, or a library missing
            return False, f"{spec.origin} does not load: {exc}"
        return _registered(f"built by setup.py ({spec.origin})")
    sources = sorted(SOURCES.glob("*.cu")) + sorted(SOURCES.glob("*.cpp"))
    if not sources:
        return False, (f"oasis._vae_conv is not built and the sources of the CUDA convolutions are not at {SOURCES} "
                       "(an install without csrc/)")
    from torch.utils import cpp_extension

    if shutil.which("nvcc") is None and not cpp_extension.CUDA_HOME:
        return False, "oasis._vae_conv is not built and no CUDA toolkit (nvcc) is found to build it"
    print("oasis: building the VAE's CUDA convolutions (first use; cached afterwards)", file=sys.stderr, flush=True)
    try:
        cpp_extension.load(name="oasis_vae_conv", sources=[str(s) for s in sources], extra_cflags=CXX_FLAGS,
                           extra_cuda_cflags=NVCC_FLAGS, extra_ldflags=LD_FLAGS,
                           extra_include_paths=[str(SOURCES)], is_python_module=False, verbose=False)
    except Exception as exc:  # a compiler error, a missing ninja
        return False, f"the JIT build of {SOURCES} failed: {type(exc).__name__}: {str(exc)[-500:]}"
    return _registered(f"JIT-built from {SOURCES}")


def _registered(how: str) -> tuple[bool, str]:
    for op in ("conv3d_few_out", "norm_silu"):  # a library of older sources: the newer ops are not there
        if not hasattr(torch.ops.oasis_vae, op):
            return False, (f"torch.ops.oasis_vae ({how}) has no {op}: it was built from older sources; "
                           "reinstall (setup.py) or start a new process")
    # the ops write into the output the caller allocated: nothing to compute under fake tensors
    for op in ("conv3d_k3", "conv3d_few_out", "norm_silu"):
        try:
            torch.library.register_fake(f"oasis_vae::{op}")(lambda *args, **kwargs: None)
        except RuntimeError:  # registered before in this process
            pass
    return True, how


#: the output channels one program holds (its N tile): where the kernel can normalise a pixel's outputs
NORM_CHANNELS = (96, 192)


def channels_why_not(cin: int, cout: int, norm: bool = False) -> str | None:
    """The part of :func:`why_not` that depends on the channel counts alone (and ``norm``): None where the
    kernel takes ``cin -> cout``, else why not."""
    if cin % 64 or not 64 <= cin <= 1024 or cout % 96:
        # 96 input channels ran at ~226 TFLOP/s in 32-channel stages and at ~380 in 96-channel ones on an
        # H100, where cuDNN's engines run them at ~650 (docs/PERF.md entries 18j, 18l): cuDNN keeps them
        return f"input channels a multiple of 64 (got {cin}) and output channels a multiple of 96 (got {cout})"
    if norm and cout not in NORM_CHANNELS:
        return f"a norm in the epilogue needs {' or '.join(map(str, NORM_CHANNELS))} output channels, got {cout}"
    return None


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 5 and (t.stride(1) == 1 or t.shape[1] == 1)


def _call_why_not(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> str | None:
    """What both kernels ask of a call, None where it holds: a CUDA Hopper GPU (the extension is built for
    sm_90a), bf16 x and weight, a 3x3x3 kernel with stride 1 and spatial padding 1, x ``[B, Cin, T, H, W]``."""
    if not x.is_cuda:
        return f"x is on {x.device}, not a CUDA device"
    major, minor = torch.cuda.get_device_capability(x.device)
    if (major, minor) != (9, 0):
        return f"the kernel is built for sm_90a (Hopper); this GPU is sm_{major}{minor}"
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return f"bfloat16 only, got x {x.dtype} and weight {weight.dtype}"
    if weight.dim() != 5 or tuple(weight.shape[2:]) != (3, 3, 3):
        return f"a 3x3x3 kernel only, got weight {tuple(weight.shape)}"
    if tuple(stride) != (1, 1, 1) or tuple(padding) != (0, 1, 1):
        return f"stride 1 and padding (0, 1, 1) only, got stride {tuple(stride)} and padding {tuple(padding)}"
    if x.dim() != 5 or x.shape[1] != weight.shape[1]:
        return f"x must be [B, {weight.shape[1]}, T, H, W], got {tuple(x.shape)}"
    return None


def _reads_why_not(reader: str, reads: dict, inputs) -> str | None:
    """What both kernels ask last, None where it holds: the tensors ``reads`` names (None ones skipped), read by
    ``reader`` (TMA, cp.async), start and step 16-byte aligned; no gradient wanted of ``inputs``; the
    extension loaded."""
    for name, t in reads.items():
        if t is not None and (t.data_ptr() % 16 or any(t.stride(d) % 8 for d in (0, 2, 3, 4) if t.shape[d] > 1)):
            return f"{name} is not 16-byte aligned for {reader} (strides {t.stride()})"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return "gradients are wanted (the kernel has no backward)"
    ok, why = library()
    return None if ok else why


def why_not(x: torch.Tensor, weight: torch.Tensor, *, stride=(1, 1, 1), padding=(0, 1, 1),
            prev: torch.Tensor | None = None, residual: torch.Tensor | None = None, norm: bool = False) -> str | None:
    """None where :func:`conv3d_k3` takes ``conv3d(cat([prev, x], 2), weight, padding=padding) (+ residual)``,
    else why not (the caller then runs cuDNN): a CUDA Hopper GPU, bf16 channels-last tensors, a 3x3x3 kernel
    with stride 1 and spatial padding 1, no time padding (the cached frames are ``prev``'s), input channels
    a multiple of 64, output channels a multiple of 96, and no gradients wanted. ``norm``: with the
    next layer's norm + SiLU applied to the result (:func:`conv3d_k3`'s ``norm``): 96 or 192 output
    channels only (one program's tile)."""
    why = _call_why_not(x, weight, stride, padding)
    if why is not None:
        return why
    cin, cout = weight.shape[1], weight.shape[0]
    why = channels_why_not(cin, cout, norm)
    if why is not None:
        return why
    others = [t for t in (prev, residual) if t is not None]
    if not all(_channels_last(t) and t.dtype == torch.bfloat16 for t in (x, *others)):
        return "x, prev and residual must be channels-last bfloat16"
    return _reads_why_not("TMA", {"x": x, "prev": prev}, (x, weight, *others))


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[Cout, Cin, 3, 3, 3]`` as the kernel's ``[Cout, 27 * Cin]``: tap ``9 dt + 3 dy + dx``, then the input
    channel; bf16, contiguous. Kept per weight tensor until it changes (its version counter or storage)."""
    return _kept(weight, lambda w: w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1).to(torch.bfloat16).contiguous())


def _bias32(bias: torch.Tensor) -> torch.Tensor:
    """The bias as the kernel reads it: float32, contiguous; a layer's 16-bit bias converted once, not per call."""
    if bias.dtype == torch.float32 and bias.is_contiguous():
        return bias.detach()
    return _kept(bias, lambda b: b.to(torch.float32).contiguous())


def _norm32(gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """``gamma * scale`` as the kernel reads it: float32, contiguous, kept per gamma and scale."""
    return _kept(gamma, lambda g: (g.reshape(-1).to(torch.float32) * scale).contiguous(), tag=float(scale))


def conv3d_k3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
              prev: torch.Tensor | None = None, residual: torch.Tensor | None = None,
              norm: tuple[torch.Tensor, float] | None = None, tail: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = conv3d(cat([prev or zeros(2 frames), x], 2), weight, padding=(0, 1, 1)) + bias + residual``, or
    with ``norm = (gamma, scale)`` the next layer's input ``SiLU(y / max(||y||_C, 1e-12) * scale * gamma)``.

    x: ``[B, Cin, T, H, W]``, prev: ``[B, Cin, 2, H, W]`` (the causal cache) or None (the sequence starts:
    zeros), weight: ``[Cout, Cin, 3, 3, 3]``, bias and gamma: ``[Cout]`` (gamma in any shape of Cout values),
    residual and the result: ``[B, Cout, T, H, W]``; bf16 channels-last (:func:`why_not`). ``tail``:
    ``[B, Cout, k, H, W]`` with ``1 <= k <= T``, also given the result's last ``k`` frames (the next
    convolution's causal cache). The sums in float32, one rounding to bf16 at the end.
    """
    why = why_not(x, weight, prev=prev, residual=residual, norm=norm is not None)
    if why is not None:
        raise ValueError(f"conv3d_k3 does not take this call: {why}")
    b, _, t, h, w = x.shape
    cout = weight.shape[0]
    if norm is not None and norm[0].numel() != cout:
        raise ValueError(f"the norm's gamma must hold {cout} values, got {norm[0].numel()}")
    if out is None:
        out = torch.empty((b, cout, t, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    torch.ops.oasis_vae.conv3d_k3(x, prev, pack_weight(weight), None if bias is None else _bias32(bias), residual,
                                  None if norm is None else _norm32(*norm), tail, out)
    return out


def conv3d_k3_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                        prev: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                        norm: tuple[torch.Tensor, float] | None = None, tail: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`conv3d_k3`'s contract as torch operations, in ``x``'s dtype on any device: what the callers'
    logic is tested against on the CPU (tests/test_vae_cuda.py) and what ``scripts/vae_peak.py --kernel cuda``
    runs in the kernel's place. Not rounded as the kernel rounds (it sums in float32 and rounds once)."""
    from .vae_kernels import norm_silu_reference

    front = prev if prev is not None else x.new_zeros((*x.shape[:2], 2, *x.shape[3:]))
    y = F.conv3d(torch.cat([front, x], 2), weight, None if bias is None else bias.to(x.dtype), padding=(0, 1, 1))
    y = y if residual is None else y + residual
    y = y if norm is None else norm_silu_reference(y, norm[0], norm[1])
    out = torch.empty_like(y, memory_format=torch.channels_last_3d) if out is None else out
    out.copy_(y)
    if tail is not None:
        tail.copy_(out[:, :, out.shape[2] - tail.shape[2]:])
    return out


#: the most output channels :func:`conv3d_few_out` takes: its GEMM's 16 columns hold 3 taps of each
FEW_OUT_MAX_CHANNELS = 5


def few_out_why_not(x: torch.Tensor, weight: torch.Tensor, *, stride=(1, 1, 1), padding=(0, 1, 1),
                    prev: torch.Tensor | None = None) -> str | None:
    """None where :func:`conv3d_few_out` takes ``conv3d(cat([prev, x], 2), weight, padding=padding)``, else why
    not (the caller then runs cuDNN): a CUDA Hopper GPU (the extension is built for sm_90a), bf16 channels-last
    x and prev with 16-byte aligned starts and strides (cp.async), a 3x3x3 kernel with stride 1 and spatial
    padding 1, input channels a multiple of 16 (up to 4096), 1 to 5 output channels, and no gradients wanted."""
    why = _call_why_not(x, weight, stride, padding)
    if why is not None:
        return why
    cin, cout = weight.shape[1], weight.shape[0]
    if weight.device != x.device:
        return f"weight is on {weight.device}, x on {x.device}"
    if x.numel() == 0:
        return f"x is empty ({tuple(x.shape)})"
    if cin % 16 or not 16 <= cin <= 4096 or not 1 <= cout <= FEW_OUT_MAX_CHANNELS:
        return (f"input channels a multiple of 16 up to 4096 (got {cin}) and 1 to {FEW_OUT_MAX_CHANNELS} output "
                f"channels (got {cout})")
    for name, t in (("x", x), ("prev", prev)):
        if t is not None and not (_channels_last(t) and t.dtype == torch.bfloat16):
            return f"{name} must be channels-last bfloat16"
    if prev is not None and (prev.shape[:2] != x.shape[:2] or prev.shape[2] != 2 or prev.shape[3:] != x.shape[3:]
                             or prev.device != x.device):
        return (f"prev must be [{x.shape[0]}, {cin}, 2, {x.shape[3]}, {x.shape[4]}] on x's device, "
                f"got {tuple(prev.shape)}")
    return _reads_why_not("cp.async", {"x": x, "prev": prev}, (x, weight, prev))


def pack_few_out_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[Cout, Cin, 3, 3, 3]`` in :func:`conv3d_few_out`'s fragment order: ``[3 dt, 3 dy, Cin / 16, 2, 32, 4]``
    bf16, contiguous. Column ``n = dx * Cout + o`` of the GEMM (zero for ``n >= 3 Cout``) lies in n tile
    ``n // 8``; lane ``l`` of an m16n8k16 MMA holds column ``8 * tile + l // 4`` at rows (input channels of
    the 16-channel chunk) ``2 (l % 4) + (0, 1, 8, 9)``: PTX's B fragment, two bf16 to a register, the lower row
    in the lower half. Kept per weight tensor until it changes."""
    def pack(w):
        cout, cin = w.shape[:2]
        cols = w.permute(2, 3, 1, 4, 0).reshape(3, 3, cin, 3 * cout)  # [dt, dy, c, dx * cout + o]
        cols = F.pad(cols, (0, 16 - 3 * cout))
        # c = 16 chunk + 8 h + 2 q + j, n = 8 tile + g; lane = 4 g + q holds (h, j) = (0,0) (0,1) (1,0) (1,1)
        frag = cols.reshape(3, 3, cin // 16, 2, 4, 2, 2, 8).permute(0, 1, 2, 6, 7, 4, 3, 5)
        return frag.reshape(3, 3, cin // 16, 2, 32, 4).to(torch.bfloat16).contiguous()

    return _kept(weight, pack, tag="few_out")


def conv3d_few_out(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   prev: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = conv3d(cat([prev or zeros(2 frames), x], 2), weight, padding=(0, 1, 1)) + bias`` for few output
    channels (the decoder's last convolution).

    x: ``[B, Cin, T, H, W]``, prev: ``[B, Cin, 2, H, W]`` (the causal cache) or None (the sequence starts:
    zeros), bf16 channels-last (:func:`few_out_why_not`); weight: ``[Cout, Cin, 3, 3, 3]``, bias: ``[Cout]``;
    the result ``[B, Cout, T, H, W]`` bf16, channels-last unless ``out`` (any strides) is given. The sums in
    float32, one rounding to bf16 at the end.
    """
    why = few_out_why_not(x, weight, prev=prev)
    if why is not None:
        raise ValueError(f"conv3d_few_out does not take this call: {why}")
    b, _, t, h, w = x.shape
    cout = weight.shape[0]
    if out is None:
        out = torch.empty((b, cout, t, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    torch.ops.oasis_vae.conv3d_few_out(x, prev, pack_few_out_weight(weight), None if bias is None else _bias32(bias),
                                       out)
    return out


def norm_channels_why_not(channels: int) -> str | None:
    """None where :func:`norm_silu` takes ``channels``: ``24 * 2**k`` up to 768 (a position's 16-byte vectors split
    evenly over a power of 2 of a warp's lanes: the VAE's 96, 192 and 384), else why not."""
    group, rest = divmod(channels, 24)
    if rest or not 1 <= group <= 32 or group & (group - 1):
        return f"channels must be 24 * 2**k up to 768, got {channels}"
    return None


def _positions_dense(t: torch.Tensor) -> bool:
    """Channels innermost and every position's channels ``C`` apart (channels-last, a time slice of it included)."""
    return t.stride(1) == 1 and (_flat_stride(t) == t.shape[1] or math.prod(t.shape[2:]) <= 1)


def norm_why_not(x: torch.Tensor, *, out: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                 sum_out: torch.Tensor | None = None, tail: torch.Tensor | None = None,
                 inputs=()) -> str | None:
    """None where :func:`norm_silu` takes the call, else why not (the caller then runs the Triton pass): a Hopper GPU,
    ``x [B, C, T, ...]`` in bf16 or fp16 with ``out``, ``residual``, ``sum_out`` and ``tail`` alike, every one
    channels-last with its positions dense (a time slice of a larger buffer included), 16-byte aligned starts and
    batch steps, :func:`norm_channels_why_not`'s channels, and no gradient wanted of ``inputs``."""
    if not x.is_cuda:
        return f"x is on {x.device}, not a CUDA device"
    major, minor = torch.cuda.get_device_capability(x.device)
    if (major, minor) != (9, 0):
        return f"the extension is built for sm_90a (Hopper); this GPU is sm_{major}{minor}"
    if x.dtype not in (torch.bfloat16, torch.float16) or x.dim() < 3:
        return f"x must be a bfloat16 or float16 [B, C, T, ...], got {x.dtype} {tuple(x.shape)}"
    why = norm_channels_why_not(x.shape[1])
    if why is not None:
        return why
    for name, t in (("x", x), ("out", out), ("residual", residual), ("sum_out", sum_out), ("tail", tail)):
        if t is None:
            continue
        if t.dtype != x.dtype or t.device != x.device or not _positions_dense(t):
            return f"{name} must be channels-last {x.dtype} on {x.device} with dense positions (strides {t.stride()})"
        if t.data_ptr() % 16 or (t.shape[0] > 1 and t.stride(0) % 8):
            return f"{name} is not 16-byte aligned (start or batch stride {t.stride(0)})"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, *inputs)):
        return "gradients are wanted (the pass has no backward)"
    ok, why = library()
    return None if ok else why


def norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float, *, out: torch.Tensor, silu: bool = True,
              bias: torch.Tensor | None = None, tail: torch.Tensor | None = None, residual: torch.Tensor | None = None,
              sum_out: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """:func:`oasis.vae_kernels.norm_silu`'s pass in CUDA (``csrc/vae_conv/norm_silu.cu``), for the calls
    :func:`norm_why_not` allows: ``SiLU(y / max(||y||_C, eps) * scale * gamma)`` over dim 1, ``y = x + bias`` in
    float32, or with ``residual`` ``x + bias + residual`` rounded to x's dtype (and written to ``sum_out``);
    ``tail`` ``[B, C, k, ...]`` also given the result's last ``k`` frames. Into ``out``; returns it."""
    why = norm_why_not(x, out=out, residual=residual, sum_out=sum_out, tail=tail, inputs=(gamma, bias))
    if why is not None:
        raise ValueError(f"norm_silu does not take this call: {why}")
    if sum_out is not None and residual is None:
        raise ValueError("sum_out is written only with a residual")
    return _norm_silu_checked(x, gamma, scale, out, silu, bias, tail, residual, sum_out, eps)


def _norm_silu_checked(x, gamma, scale, out, silu, bias, tail, residual, sum_out, eps) -> torch.Tensor:
    """:func:`norm_silu` once :func:`norm_why_not` has allowed the call (``oasis.vae_kernels.norm_silu`` asks it
    itself: the checks run once a call)."""
    torch.ops.oasis_vae.norm_silu(x, _norm32(gamma, scale), None if bias is None else _bias32(bias), residual, sum_out,
                                  tail, silu, eps, out)
    return out
