"""Synthetic real-world degradations of HQ training clips (OASIS sec. 3.4): Real-ESRGAN's second-order
model with RealBasicVSR's video compression, in two modes for the progressive curriculum.

``Degradation()(clip, seed)``: HQ ``[F, 3, H, W]`` float in [0, 1] -> LQ ``[F, 3, H/4, W/4]`` in [0, 1]
on 8-bit steps. The first order is blur -> resize (of the frame) -> noise -> JPEG; the second
blur -> resize (to a factor of the LQ size, as Real-ESRGAN) -> noise, each with its own ranges
(:class:`OrderConfig`); then the final resize to the LQ size and, before or after it, a JPEG per frame
or a video codec over the whole clip (PyAV: libx264 or mpeg4 at a random bitrate, RealBasicVSR's
addition). Real-ESRGAN's sinc filters are not included.

Modes (:attr:`Degradation.mode` or per call):

- ``"consistent"`` (stage 1): one draw of every parameter per clip, the same on every frame;
- ``"inconsistent"`` (stage 2): frame by frame; each step of each order keeps the previous frame's
  parameters, its continuous severities jittered by up to ``jitter`` (relative), or with
  probability ``change_prob`` is drawn anew (kind and severity).

Parameters come from a numpy ``Generator`` seeded with ``seed`` and the noise from a torch
``Generator`` seeded from it, so a (clip, seed, config, mode) gives the same LQ clip every time on
the same device and thread count (a different CPU summation order can move a value across an 8-bit
step). Blur, resize and noise run on the clip's device, batched over frames where the
frames share a size; the video codec on the CPU (PyAV); JPEG through PIL on the CPU, or for clips on
a GPU by :mod:`oasis.jpeg` there (``DegradeConfig.jpeg_impl``).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .jpeg import jpeg_roundtrip, jpeg_roundtrip_rows, over_255

__all__ = ["OrderConfig", "DegradeConfig", "Degradation", "blur_kernel", "KERNEL_KINDS", "FIRST_ORDER",
           "SECOND_ORDER"]

KERNEL_KINDS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
CODECS = ("libx264", "mpeg4")
JPEG_IMPLS = ("auto", "pil", "torch")
# bumped whenever the same (clip, seed, config) would give another LQ clip than before, so that an
# oasis-train resume refuses a run degraded by an earlier version (2: grouped noise draws, the JPEG of
# clips on a GPU by oasis.jpeg; 3: the noise of frames of several sizes, inconsistent mode's, drawn by
# kind for all of them at once; 4: libx264 without its macroblock tree, which made its round trip vary)
VERSION = 4
MIN_SIDE = 8  # no resize goes below this many pixels a side


@dataclass(frozen=True)
class OrderConfig:
    """The ranges of one order of degradations (Real-ESRGAN's defaults for the first order)."""

    blur_prob: float = 1.0
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_kinds: tuple[str, ...] = KERNEL_KINDS
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    generalized_beta: tuple[float, float] = (0.5, 4.0)
    plateau_beta: tuple[float, float] = (1.0, 2.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5  # else Poisson
    noise_sigma: tuple[float, float] = (1.0, 30.0)  # on the 0-255 scale
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_quality: tuple[int, int] = (30, 95)
    jpeg_prob: float = 1.0  # Real-ESRGAN's second order has no JPEG of its own (its last step has one)
    # the resize factor applies to the frame's current size ("current", the first order) or to the LQ
    # size ("target", Real-ESRGAN's second order: the rest of the order then works near the LQ size)
    resize_base: str = "current"

    def validate(self, name: str) -> None:
        def unit(field_name, v):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}.{field_name} must be a probability in [0, 1], got {v!r}")

        def span(field_name, v, low=0.0):
            if len(v) != 2 or not low <= v[0] <= v[1]:
                raise ValueError(f"{name}.{field_name} must be (low, high) with {low} <= low <= high, got {v!r}")

        for f in ("blur_prob", "gaussian_noise_prob", "gray_noise_prob", "jpeg_prob"):
            unit(f, getattr(self, f))
        if self.resize_base not in ("current", "target"):
            raise ValueError(f"{name}.resize_base must be 'current' or 'target', got {self.resize_base!r}")
        if not self.kernel_sizes or any(k < 3 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"{name}.kernel_sizes must be odd sizes >= 3, got {self.kernel_sizes!r}")
        unknown = set(self.kernel_kinds) - set(KERNEL_KINDS)
        if unknown or len(self.kernel_kinds) != len(self.kernel_probs) or not self.kernel_kinds:
            raise ValueError(f"{name}.kernel_kinds must be some of {KERNEL_KINDS} with one probability each, got "
                             f"{self.kernel_kinds!r} / {self.kernel_probs!r}")
        for probs, what in ((self.kernel_probs, "kernel_probs"), (self.resize_probs, "resize_probs")):
            if any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                raise ValueError(f"{name}.{what} must be non-negative and sum to 1, got {probs!r}")
        if len(self.resize_probs) != 3:
            raise ValueError(f"{name}.resize_probs must be (up, down, keep), got {self.resize_probs!r}")
        span("blur_sigma", self.blur_sigma, 1e-3)
        span("generalized_beta", self.generalized_beta, 1e-3)
        span("plateau_beta", self.plateau_beta, 1e-3)
        span("resize_range", self.resize_range, 1e-3)
        if not self.resize_range[0] <= 1.0 <= self.resize_range[1]:
            raise ValueError(f"{name}.resize_range must hold 1 (up above it, down below), got {self.resize_range!r}")
        span("noise_sigma", self.noise_sigma)
        span("poisson_scale", self.poisson_scale)
        span("jpeg_quality", self.jpeg_quality, 1)
        if self.jpeg_quality[1] > 100:
            raise ValueError(f"{name}.jpeg_quality must lie in [1, 100], got {self.jpeg_quality!r}")


FIRST_ORDER = OrderConfig()
SECOND_ORDER = OrderConfig(blur_prob=0.8, blur_sigma=(0.2, 1.5), generalized_beta=(0.5, 4.0),
                           resize_probs=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2), noise_sigma=(1.0, 25.0),
                           poisson_scale=(0.05, 2.5), jpeg_prob=0.0, resize_base="target")


@dataclass(frozen=True)
class DegradeConfig:
    """Both orders, the final resize and compression, and the inconsistent mode's dynamics."""

    scale: int = 4
    first: OrderConfig = FIRST_ORDER
    second: OrderConfig = SECOND_ORDER
    video_prob: float = 0.5  # the last compression: a video codec over the clip, else a JPEG per frame
    codecs: tuple[str, ...] = CODECS
    video_bits_per_pixel: tuple[float, float] = (0.1, 1.0)  # bitrate = bpp x LQ pixels x fps
    fps: int = 25
    change_prob: float = 0.2
    jitter: float = 0.1
    mode: str = "consistent"
    # where the JPEG steps run: "pil" (libjpeg through PIL, on the CPU: frames on a GPU go to the host
    # and back), "torch" (oasis.jpeg: the same lossy steps as torch ops on the frames' device, within
    # ~0.1-0.7 levels of libjpeg's output on average), "auto" (PIL for frames on the CPU, torch on a GPU)
    jpeg_impl: str = "auto"

    def __post_init__(self):
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"scale must be a positive int, got {self.scale!r}")
        self.first.validate("first")
        self.second.validate("second")
        for name in ("video_prob", "change_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {v!r}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")
        if set(self.codecs) - set(CODECS) or not self.codecs:
            raise ValueError(f"codecs must be some of {CODECS}, got {self.codecs!r}")
        if not 0 < self.video_bits_per_pixel[0] <= self.video_bits_per_pixel[1]:
            raise ValueError(f"video_bits_per_pixel must be (low, high) > 0, got {self.video_bits_per_pixel!r}")
        if self.mode not in ("consistent", "inconsistent"):
            raise ValueError(f"mode must be 'consistent' or 'inconsistent', got {self.mode!r}")
        if self.jpeg_impl not in JPEG_IMPLS:
            raise ValueError(f"jpeg_impl must be one of {JPEG_IMPLS}, got {self.jpeg_impl!r}")


# -- kernels --------------------------------------------------------------------------------------------

def blur_kernel(kind: str, size: int, sigma_x: float, sigma_y: float = None, theta: float = 0.0,
                beta: float = 1.0) -> torch.Tensor:
    """A ``[size, size]`` float32 blur kernel summing to one (Real-ESRGAN's six families).

    ``iso``/``aniso``: Gaussian ``exp(-0.5 d^T S^-1 d)``; ``generalized_*``: ``exp(-0.5 (d^T S^-1 d)^beta)``;
    ``plateau_*``: ``1 / (1 + (d^T S^-1 d)^beta)``; S has standard deviations ``sigma_x``, ``sigma_y``
    (equal for ``*iso``) along axes rotated by ``theta``.
    """
    return torch.from_numpy(_kernel(kind, size, sigma_x, sigma_y, theta, beta)).float()


def _kernel(kind: str, size: int, sigma_x: float, sigma_y: float = None, theta: float = 0.0,
            beta: float = 1.0) -> np.ndarray:
    """:func:`blur_kernel` in float64 numpy."""
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kind must be one of {KERNEL_KINDS}, got {kind!r}")
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size must be odd and positive, got {size}")
    if sigma_y is None or not kind.endswith("aniso"):
        sigma_y = sigma_x
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    cov = rot @ np.diag([sigma_x ** 2, sigma_y ** 2]) @ rot.T
    inv = np.linalg.inv(cov)
    r = np.arange(size, dtype=np.float64) - size // 2
    xx, yy = np.meshgrid(r, r, indexing="xy")
    d = np.stack([xx, yy], -1)
    q = np.einsum("...i,ij,...j->...", d, inv, d)
    if kind in ("iso", "aniso"):
        k = np.exp(-0.5 * q)
    elif kind.startswith("generalized"):
        k = np.exp(-0.5 * q ** beta)
    else:
        k = 1.0 / (1.0 + q ** beta)
    return k / k.sum()


def _blur_weights(params: list) -> np.ndarray:
    """``[len(params), S, S]`` float32: each blur's kernel centred in the largest one's size (a frame
    without blur: the identity); the kernels of equal parameters made once, in numpy (no torch operations
    per frame: a clip's frames share one draw in consistent mode)."""
    kernels, made = [], {}
    for p in params:
        if p is None:
            kernels.append(np.ones((1, 1)))
            continue
        if p not in made:
            made[p] = _kernel(*p[:6])
        kernels.append(made[p])
    size = max(k.shape[0] for k in kernels)
    weight = np.zeros((len(kernels), size, size), dtype=np.float32)
    for i, k in enumerate(kernels):
        o = (size - k.shape[0]) // 2
        weight[i, o:o + k.shape[0], o:o + k.shape[0]] = k  # float64 -> float32 rounded as torch's .float()
    return weight


# -- parameters -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepParams:
    """One order's draw for one frame; ``None`` fields are steps left out."""

    blur: tuple | None  # (kind, size, sigma_x, sigma_y, theta, beta)
    resize: tuple | None  # (mode, factor)
    noise: tuple | None  # ("gaussian", sigma, gray) or ("poisson", scale, gray)
    jpeg: int | None
    redrawn: tuple[str, ...] = ()  # inconsistent mode: the steps drawn anew for this frame


@dataclass(frozen=True)
class ClipParams:
    """Every draw for one clip: per frame the two orders and the last resize; per clip the last compression."""

    first: list[StepParams]
    second: list[StepParams]
    final_resize: list[str]
    compress: tuple  # ("jpeg", [quality per frame], compress_first) or ("video", codec, bpp, compress_first)


def _uniform(rng, span):
    return float(rng.uniform(span[0], span[1]))


def _draw_blur(rng, cfg: OrderConfig):
    if rng.random() >= cfg.blur_prob:
        return None
    kind = str(rng.choice(cfg.kernel_kinds, p=cfg.kernel_probs))
    size = int(rng.choice(cfg.kernel_sizes))
    sx = _uniform(rng, cfg.blur_sigma)
    sy = _uniform(rng, cfg.blur_sigma) if "aniso" in kind else sx
    theta = float(rng.uniform(-math.pi, math.pi)) if "aniso" in kind else 0.0
    if kind.startswith(("generalized", "plateau")):
        low, high = cfg.generalized_beta if kind.startswith("generalized") else cfg.plateau_beta
        # as BasicSR: half the draws in [low, 1), half in [1, high] (shapes sharper and flatter than 1)
        beta = float(rng.uniform(low, 1.0)) if rng.random() < 0.5 and low < 1.0 else float(rng.uniform(max(low, 1.0),
                                                                                                        high))
    else:
        beta = 1.0
    return (kind, size, sx, sy, theta, beta)


def _draw_resize(rng, cfg: OrderConfig):
    which = int(rng.choice(3, p=cfg.resize_probs))
    factor = (float(rng.uniform(1.0, cfg.resize_range[1])), float(rng.uniform(cfg.resize_range[0], 1.0)), 1.0)[which]
    return (str(rng.choice(RESIZE_MODES)), factor)


def _draw_noise(rng, cfg: OrderConfig):
    gray = bool(rng.random() < cfg.gray_noise_prob)
    if rng.random() < cfg.gaussian_noise_prob:
        return ("gaussian", _uniform(rng, cfg.noise_sigma), gray)
    return ("poisson", _uniform(rng, cfg.poisson_scale), gray)


def _draw_jpeg(rng, cfg: OrderConfig):
    return int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))


def _draw_order_jpeg(rng, cfg: OrderConfig):
    return _draw_jpeg(rng, cfg) if rng.random() < cfg.jpeg_prob else None


_DRAW = {"blur": _draw_blur, "resize": _draw_resize, "noise": _draw_noise, "jpeg": _draw_order_jpeg}


def _jittered(step: str, value, rng, jitter: float, cfg: OrderConfig):
    """The previous frame's parameters with their severities moved by up to ``jitter`` (relative), kept in range."""
    if value is None or jitter == 0:
        return value

    def move(v, span):
        return float(min(max(v * (1.0 + rng.uniform(-jitter, jitter)), span[0]), span[1]))

    if step == "blur":
        kind, size, sx, sy, theta, beta = value
        return (kind, size, move(sx, cfg.blur_sigma), move(sy, cfg.blur_sigma), theta, beta)
    if step == "resize":
        mode, factor = value
        return (mode, factor if factor == 1.0 else move(factor, cfg.resize_range))
    if step == "noise":
        kind, level, gray = value
        return (kind, move(level, cfg.noise_sigma if kind == "gaussian" else cfg.poisson_scale), gray)
    q = int(round(move(value, cfg.jpeg_quality)))
    return min(max(q, cfg.jpeg_quality[0]), cfg.jpeg_quality[1])


def _draw_order(rng, cfg: OrderConfig, frames: int, mode: str, change_prob: float, jitter: float) -> list[StepParams]:
    first = StepParams(**{s: d(rng, cfg) for s, d in _DRAW.items()})
    out = [first]
    for _ in range(1, frames):
        prev = out[-1]
        if mode == "consistent":
            out.append(prev)
            continue
        values, redrawn = {}, []
        for step, draw in _DRAW.items():
            if rng.random() < change_prob:
                values[step] = draw(rng, cfg)
                redrawn.append(step)
            else:
                values[step] = _jittered(step, getattr(prev, step), rng, jitter, cfg)
        out.append(StepParams(**values, redrawn=tuple(redrawn)))
    return out


# -- the operations -------------------------------------------------------------------------------------

def _blur(frames: torch.Tensor, params: list) -> torch.Tensor:
    """Each frame of ``[N, 3, H, W]`` with its own kernel (or none), in one grouped convolution."""
    if all(p is None for p in params):
        return frames
    weight = torch.from_numpy(_blur_weights(params))
    size = weight.shape[-1]
    n, c, h, w = frames.shape
    weight = weight.to(frames.device, frames.dtype, non_blocking=True).repeat_interleave(c, 0)[:, None]
    pad = size // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    x = F.pad(frames.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode=mode)
    return F.conv2d(x, weight, groups=n * c).reshape(n, c, h, w)


def _blur_each(frames: list, params: list) -> list:
    """:func:`_blur` for frames ``[1, 3, H_i, W_i]`` of several sizes, in one grouped convolution: each
    frame padded by its own kernel's half size and mode (reflect, or replicate where it is smaller than
    that), then with zeros to the batch's largest (the zeros meet only the zero margin of the smaller
    kernels)."""
    idx = [i for i, p in enumerate(params) if p is not None]
    out = list(frames)
    if not idx:
        return out
    weight = torch.from_numpy(_blur_weights([params[i] for i in idx]))
    size = weight.shape[-1]
    pad = size // 2
    hp = max(frames[i].shape[-2] for i in idx) + 2 * pad
    wp = max(frames[i].shape[-1] for i in idx) + 2 * pad
    xs = []
    for i in idx:
        own = params[i][1] // 2  # the frame's own kernel's half size
        o = pad - own
        f = frames[i]
        h, w = f.shape[-2:]
        x = F.pad(f, (own, own, own, own), mode="reflect" if own < min(h, w) else "replicate")
        xs.append(F.pad(x, (o, wp - w - 2 * own - o, o, hp - h - 2 * own - o)))
    n, c = len(idx), frames[idx[0]].shape[1]
    weight = weight.to(frames[idx[0]].device, frames[idx[0]].dtype, non_blocking=True).repeat_interleave(c, 0)[:, None]
    y = F.conv2d(torch.cat(xs).reshape(1, n * c, hp, wp), weight, groups=n * c).reshape(n, c, hp - 2 * pad, wp - 2 * pad)
    for j, i in enumerate(idx):
        out[i] = y[j:j + 1, :, :frames[i].shape[-2], :frames[i].shape[-1]]
    return out


def _resize(frames: torch.Tensor, size: tuple[int, int], mode: str, clamp: bool = True) -> torch.Tensor:
    """``frames`` at ``size`` (themselves where they have it), clamped to [0, 1] where resized (``clamp``
    False: the caller clamps, :func:`_resize_runs`)."""
    if tuple(frames.shape[-2:]) == size:
        return frames
    kw = {} if mode == "area" else {"align_corners": False}
    out = F.interpolate(frames, size=size, mode=mode, **kw)
    return out.clamp_(0.0, 1.0) if clamp else out


def _noise(frames: torch.Tensor, params: list, gen: torch.Generator) -> torch.Tensor:
    """Each frame of ``[N, 3, H, W]`` with its own noise (or none); frames of one kind and colour take
    one draw together. Nothing here waits for the device: frame indices and levels go over with the
    stream, and the Poisson levels are counted by a scatter (a bincount on CUDA reads its range back)."""
    groups = _noise_groups(params)
    if not groups:
        return frames
    device = frames.device
    out = frames.clone()
    for (kind, gray), idx in groups.items():
        n = len(idx)
        index = None if n == frames.shape[0] else torch.tensor(idx).to(device, non_blocking=True)
        x = frames if index is None else frames.index_select(0, index)
        level = torch.tensor([params[i][1] for i in idx], dtype=x.dtype).to(device, non_blocking=True).view(n, 1, 1, 1)
        if kind == "gaussian":
            shape = (n, 1, *x.shape[2:]) if gray else x.shape
            noise = torch.randn(shape, generator=gen, device=device, dtype=x.dtype) * over_255(level)
        else:  # Poisson on the image's own number of levels (Real-ESRGAN's), scaled
            src = x.mean(1, keepdim=True) if gray else x
            q8 = (src * 255.0).round().clamp_(0, 255)
            q = over_255(q8)
            seen = torch.zeros(n, 256, dtype=torch.bool, device=device)
            seen.scatter_(1, q8.flatten(1).to(torch.int64), True)  # each frame's distinct 8-bit values
            levels = _poisson_levels(seen).to(x.dtype).view(n, 1, 1, 1)
            noise = (torch.poisson(q * levels, generator=gen) / levels - q) * level
        if index is None:
            out.add_(noise)
        else:
            out.index_add_(0, index, noise.expand_as(x))
    return out.clamp_(0.0, 1.0)


def _noise_each(frames: list, params: list, gen: torch.Generator) -> list:
    """:func:`_noise` for frames ``[1, 3, H_i, W_i]`` of several sizes: the frames of one kind and colour
    take one draw together, over their values laid end to end, and each its own level (for Poisson
    noise, each its own count of distinct values). Nothing here waits for the device."""
    groups = _noise_groups(params)
    out = list(frames)
    if not groups:
        return out
    device, dtype = frames[0].device, frames[0].dtype
    for (kind, gray), idx in groups.items():
        # the shape the noise is drawn in: one channel for gray noise, broadcast over the three
        shapes = [(1, 1, *frames[i].shape[2:]) if gray else tuple(frames[i].shape) for i in idx]
        sizes = [math.prod(shape) for shape in shapes]
        counts = torch.tensor(sizes).to(device, non_blocking=True)
        level = torch.tensor([params[i][1] for i in idx], dtype=dtype).to(device, non_blocking=True)
        if kind == "gaussian":
            noise = torch.randn(sum(sizes), generator=gen, device=device, dtype=dtype)
            noise = noise * over_255(level).repeat_interleave(counts, output_size=sum(sizes))
        else:  # Poisson on each frame's own number of levels (Real-ESRGAN's), scaled
            src = [frames[i].mean(1, keepdim=True) if gray else frames[i] for i in idx]
            q8 = (torch.cat([s.reshape(-1) for s in src]) * 255.0).round_().clamp_(0, 255)
            q = over_255(q8)
            frame = torch.arange(len(idx)).to(device, non_blocking=True).repeat_interleave(counts, output_size=sum(sizes))
            seen = torch.zeros(len(idx) * 256, dtype=torch.bool, device=device)
            seen.scatter_(0, frame * 256 + q8.to(torch.int64), True)  # each frame's distinct 8-bit values
            levels = _poisson_levels(seen.view(len(idx), 256)).to(dtype)
            per = torch.stack([levels, level]).repeat_interleave(counts, dim=1, output_size=sum(sizes))
            noise = (torch.poisson(q * per[0], generator=gen) / per[0] - q) * per[1]
        # one multi-tensor add and clamp for the group's frames (per frame: three operations each)
        noisy = torch._foreach_add([frames[i] for i in idx], [part.view(shape) for part, shape in
                                                             zip(noise.split(sizes), shapes)])
        _clamp_unit(noisy)
        for i, x in zip(idx, noisy):
            out[i] = x
    return out


def _clamp_unit(tensors: list) -> None:
    """``clamp_(0, 1)`` of every tensor of the list, as two multi-tensor operations."""
    torch._foreach_clamp_min_(tensors, 0.0)
    torch._foreach_clamp_max_(tensors, 1.0)


def _noise_groups(params: list) -> dict:
    """Frame indices by (kind, gray) of their noise, in order of first appearance (the draws' order)."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        if p is not None:
            groups.setdefault((p[0], p[2]), []).append(i)
    return groups


def _poisson_levels(seen: torch.Tensor) -> torch.Tensor:
    """Each frame's Poisson levels from its distinct 8-bit values (``seen`` bool ``[N, 256]``): 2 ** ceil(log2(
    distinct)), at least 2, float32 (exact: distinct <= 256)."""
    distinct = seen.sum(1).clamp_(min=2).to(torch.float32)
    return torch.exp2(torch.ceil(torch.log2(distinct)))


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [0, 1] -> ``uint8 [N, H, W, 3]`` on the CPU."""
    return (frames.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _from_uint8(arr: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return over_255(torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).to(like.device, like.dtype))


def _jpeg(frames: torch.Tensor, qualities: list, impl: str = "pil") -> torch.Tensor:
    if all(q is None for q in qualities):
        return frames
    if _torch_jpeg(frames, impl):
        return jpeg_roundtrip(frames, qualities)
    from PIL import Image

    arr = _to_uint8(frames)
    out = arr.copy()
    for i, q in enumerate(qualities):
        if q is None:
            continue
        buf = io.BytesIO()
        Image.fromarray(arr[i]).save(buf, format="JPEG", quality=int(q))
        out[i] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return _from_uint8(out, frames)


def _torch_jpeg(frames: torch.Tensor, impl: str) -> bool:
    return impl == "torch" or (impl == "auto" and frames.device.type != "cpu")


def _jpeg_each(frames: list, qualities: list, impl: str) -> list:
    """:func:`_jpeg` of frames ``[1, 3, H_i, W_i]`` of different sizes; the torch JPEG takes them in one batch."""
    if not _torch_jpeg(frames[0], impl):
        return [_jpeg(f, [q], impl) for f, q in zip(frames, qualities)]
    return jpeg_roundtrip_rows(frames, qualities)


def video_roundtrip(frames: np.ndarray, codec: str, bitrate: int, fps: int = 25) -> np.ndarray:
    """``uint8 [N, H, W, 3]`` through a video codec (yuv420p) in memory and back; odd sizes are padded
    by replication for the codec and cropped after. The same frames give the same result on every call
    (libx264 without its macroblock tree: below)."""
    import av

    n, h, w, _ = frames.shape
    ph, pw = h + h % 2, w + w % 2
    if (ph, pw) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4" if codec == "libx264" else "avi") as out:
        # x264's macroblock tree reads uninitialised values (valgrind, the libx264 PyAV 18.1 bundles), so
        # its stream for the same frames changed with what ran before in the process: without it the round
        # trip is the same every time (benchmarks/results/2026-12-05_cpu_11a2e65/x264_repeat.txt)
        stream = out.add_stream(codec, rate=fps, options={"x264-params": "mbtree=0"} if codec == "libx264" else {})
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        stream.bit_rate = int(bitrate)
        # one thread: x264's output depends on its thread count (frame threads and lookahead), so the
        # same pair on any machine; and the degradation threads and workers already fill the cores
        stream.codec_context.thread_count = 1
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    buf.seek(0)
    with av.open(buf, mode="r") as src:
        src.streams.video[0].codec_context.thread_count = 1
        decoded = [fr.to_ndarray(format="rgb24") for fr in src.decode(video=0)]
    if len(decoded) != n:
        raise RuntimeError(f"the {codec} round trip gave {len(decoded)} frames for {n}")
    return np.stack(decoded)[:, :h, :w]


# -- the model ------------------------------------------------------------------------------------------

class Degradation:
    """HQ clip -> LQ clip by the second-order model; see the module docstring."""

    def __init__(self, config: DegradeConfig | None = None, **overrides):
        config = config or DegradeConfig()
        self.config = replace(config, **overrides) if overrides else config

    def sample(self, frames: int, seed: int, mode: str | None = None) -> ClipParams:
        """Every parameter for a clip of ``frames`` frames (the same seed gives the same draw)."""
        cfg = self.config if mode is None else replace(self.config, mode=mode)
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be a positive int, got {frames!r}")
        rng = np.random.default_rng(_seed(seed))
        first = _draw_order(rng, cfg.first, frames, cfg.mode, cfg.change_prob, cfg.jitter)
        second = _draw_order(rng, cfg.second, frames, cfg.mode, cfg.change_prob, cfg.jitter)
        final = [str(rng.choice(RESIZE_MODES))]
        for _ in range(1, frames):
            final.append(final[-1] if cfg.mode == "consistent" or rng.random() >= cfg.change_prob
                         else str(rng.choice(RESIZE_MODES)))
        compress_first = bool(rng.random() < 0.5)
        if rng.random() < cfg.video_prob:
            compress = ("video", str(rng.choice(cfg.codecs)), _uniform(rng, cfg.video_bits_per_pixel), compress_first)
        else:
            q = [_draw_jpeg(rng, cfg.second)]
            for _ in range(1, frames):
                q.append(q[-1] if cfg.mode == "consistent" else _jittered("jpeg", q[-1], rng, cfg.jitter, cfg.second)
                         if rng.random() >= cfg.change_prob else _draw_jpeg(rng, cfg.second))
            compress = ("jpeg", q, compress_first)
        return ClipParams(first, second, final, compress)

    def __call__(self, clip: torch.Tensor, seed: int, mode: str | None = None) -> torch.Tensor:
        """``[F, 3, H, W]`` float in [0, 1] (H, W multiples of the scale) -> ``[F, 3, H/s, W/s]``."""
        if not isinstance(clip, torch.Tensor) or clip.dim() != 4 or clip.shape[1] != 3 or not clip.is_floating_point():
            raise ValueError(f"clip must be a float tensor [F, 3, H, W] in [0, 1], got "
                             f"{getattr(clip, 'dtype', type(clip).__name__)} {tuple(getattr(clip, 'shape', ()))}")
        s = self.config.scale
        if clip.shape[-2] % s or clip.shape[-1] % s:
            raise ValueError(f"clip height and width must be multiples of the scale {s}, got {tuple(clip.shape[-2:])}")
        return self.apply(clip, self.sample(clip.shape[0], seed, mode), seed)

    def apply(self, clip: torch.Tensor, params: ClipParams, seed: int) -> torch.Tensor:
        """The degradations of ``params`` on ``clip`` (noise drawn from ``seed``)."""
        cfg = self.config
        if not len(params.first) == len(params.second) == len(params.final_resize) == clip.shape[0]:
            raise ValueError(f"params were drawn for {len(params.first)} frames, the clip has {clip.shape[0]}")
        gen = torch.Generator(clip.device).manual_seed(_seed(seed) ^ 0x5DEECE66D)
        h, w = clip.shape[-2:]
        target = (h // cfg.scale, w // cfg.scale)
        frames = clip.float().clamp(0, 1)
        for order, ocfg in ((params.first, cfg.first), (params.second, cfg.second)):
            frames = _run_order(frames, order, gen, target, ocfg.resize_base, cfg.jpeg_impl)
        kind = params.compress[0]
        compress_first = params.compress[-1]

        def compress(x: torch.Tensor) -> torch.Tensor:
            if kind == "jpeg":
                return _jpeg(x, params.compress[1], cfg.jpeg_impl)
            _, codec, bpp, _ = params.compress
            bitrate = max(1000, int(bpp * x.shape[-2] * x.shape[-1] * cfg.fps))
            return _from_uint8(video_roundtrip(_to_uint8(x), codec, bitrate, cfg.fps), x)

        n = clip.shape[0]
        if compress_first:  # compression at the intermediate size needs one size: resize to the first frame's
            size = tuple(frames[0].shape[-2:])
            x = compress(_cat(_resize_runs(frames, [size] * n, ["bilinear"] * n)))
            x = _cat(_resize_runs(x, [target] * n, params.final_resize))
        else:
            x = compress(_cat(_resize_runs(frames, [target] * n, params.final_resize)))
        return over_255((x.clamp(0, 1) * 255.0).round())


def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return int(seed) % (2**63)


def _run_order(frames, order: list[StepParams], gen, target: tuple[int, int], resize_base: str, jpeg_impl: str):
    """One order over the frames: a tensor ``[N, 3, H, W]`` while they have one size, else a list of
    ``[1, 3, H_i, W_i]`` (inconsistent mode); frames of one size run together. The resize factor scales
    the frame (``resize_base="current"``) or the LQ size ``target``."""
    if isinstance(frames, torch.Tensor):
        frames = _blur(frames, [p.blur for p in order])
    else:
        frames = _blur_each(frames, [p.blur for p in order])
    sizes, modes = [], []
    for i, p in enumerate(order):
        mode, factor = p.resize if p.resize is not None else ("area", 1.0)
        base = frames[i].shape[-2:] if resize_base == "current" else target
        sizes.append((max(MIN_SIDE, round(base[0] * factor)), max(MIN_SIDE, round(base[1] * factor))))
        modes.append(mode)
    out = _resize_runs(frames, sizes, modes)
    if not isinstance(out, torch.Tensor) and _same_size(out):
        out = torch.cat(out)
    if isinstance(out, torch.Tensor):
        return _jpeg(_noise(out, [p.noise for p in order], gen), [p.jpeg for p in order], jpeg_impl)
    return _jpeg_each(_noise_each(out, [p.noise for p in order], gen), [p.jpeg for p in order], jpeg_impl)


def _same_size(frames) -> bool:
    return len({tuple(f.shape[-2:]) for f in frames}) == 1


def _split(x: torch.Tensor) -> list[torch.Tensor]:
    return list(x.split(1))  # one operation, where a slice per frame is one each


def _resize_runs(frames, sizes: list, modes: list):
    """Frame ``i`` resized to ``sizes[i]`` by ``modes[i]``. A tensor of frames with one target and mode
    comes back as one tensor (one call); otherwise a list, each run of consecutive frames with one input
    size, output size and mode resized in one call."""
    if isinstance(frames, torch.Tensor):
        if len(set(map(tuple, sizes))) == 1 and len(set(modes)) == 1:
            return _resize(frames, tuple(sizes[0]), modes[0])
        frames = _split(frames)
    out, resized, i = [], [], 0
    while i < len(frames):
        key = (tuple(frames[i].shape[-2:]), tuple(sizes[i]), modes[i])
        j = i + 1
        while j < len(frames) and (tuple(frames[j].shape[-2:]), tuple(sizes[j]), modes[j]) == key:
            j += 1
        x = _resize(frames[i] if j == i + 1 else torch.cat(frames[i:j]), key[1], key[2], clamp=False)
        if key[0] != key[1]:
            resized.append(x)
        out.extend(_split(x) if j > i + 1 else [x])
        i = j
    if resized:  # the runs' resized frames clamped together, as _resize clamps them
        _clamp_unit(resized)
    return out


def _cat(frames) -> torch.Tensor:
    return frames if isinstance(frames, torch.Tensor) else torch.cat(frames)
