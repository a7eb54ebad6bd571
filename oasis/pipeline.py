"""One-step video super-resolution (OASIS sec. 3.2): projector -> routed DiT -> Wan VAE decoder.

    z_L = W_proj UnShuffle(V_L) + b_proj                      (eq. 3)
    z_H = z_L - sigma * DiT(z_L, T_L),  T_L = 799, sigma = 0.799  (eq. 4)
    V_H = Decoder(z_H * std + mean)

The DiT predicts Wan2.1's flow-matching velocity ``v = noise - z_0`` at ``z_t = (1 - s) z_0 + s noise``
for ``s = t / 1000``. Wan's samplers shift the schedule (``s' = k s / (1 + (k - 1) s)``) but always
feed the model ``t = 1000 s'`` with the shifted ``s'`` itself, so a fixed one-step timestep pairs
with ``sigma = T_L / 1000`` and no shift enters: ``z_0 = z_t - sigma v``.

A checkpoint folder (:meth:`OasisVSR.save_pretrained` writes one)::

    oasis.json            {"format": "oasis-vsr/1", "timestep": 799, "projector": {...}, "routing": ...}
    oasis.safetensors     projector.proj.weight / .bias, context [L, text_dim]
    transformer/          the DiT, diffusers' or Wan2.1's layout
    vae/ | Wan2.1_VAE.pth the VAE, diffusers' layout or Wan2.1's file
    routing.json          optional: the routing the DiT was trained with
"""

from __future__ import annotations

import json
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .checkpoint import CheckpointError, read_safetensors_file, write_safetensors
from .dit import WanDiT
from .projector import LatentProjector, ProjectorConfig
from .tiling import TilePlan, estimate_bytes, plan_tiles, span_weights, spans
from .vae import WanDecoder, find_vae, load_vae, save_vae
from .wan_vae import WanVAE

__all__ = ["OasisVSR", "FORMAT"]

FORMAT = "oasis-vsr/1"


def _progress(total: int, enabled: bool, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; stay silent rather than fail without it
        return None
    return tqdm(total=total, disable=not enabled, desc=desc, unit="tile", leave=False)


class OasisVSR:
    """The OASIS x4 video super-resolution pipeline.

    ``pipe(video)`` takes ``uint8 [F, h, w, 3]`` RGB frames (any ``F >= 1``, any ``h, w``) and returns
    ``uint8 [F, 4h, 4w, 3]`` (uint16 ones for uint16 frames: FFmpeg's 16-bit RGB, 256 x the 8-bit level, white
    65280; what a 10-bit video keeps). Long or
    large videos are restored in overlapping chunks of frames and,
    when a frame does not fit the memory budget, in overlapping spatial tiles, cross-faded
    (:mod:`oasis.tiling`).
    """

    def __init__(self, dit: WanDiT, projector: LatentProjector, decoder: WanDecoder, *, timestep: float = 799.0,
                 context: torch.Tensor | None = None, compile: bool | None = None):
        if projector.config.latent_channels != dit.config.in_channels:
            raise ValueError(f"the projector makes {projector.config.latent_channels} latent channels but the DiT "
                             f"takes {dit.config.in_channels}")
        if decoder.z_dim != dit.config.out_channels:
            raise ValueError(f"the DiT makes {dit.config.out_channels} channels but the VAE takes {decoder.z_dim}")
        if projector.config.frames_per_latent != decoder.temporal:
            raise ValueError(f"the projector groups {projector.config.frames_per_latent} frames per latent frame but "
                             f"the VAE decodes {decoder.temporal}")
        if decoder.spatial % projector.config.pixels_per_latent:
            raise ValueError(f"the VAE's spatial factor {decoder.spatial} is not a multiple of the projector's "
                             f"{projector.config.pixels_per_latent}")
        if not 0 < timestep <= 1000:
            raise ValueError(f"timestep must be in (0, 1000], got {timestep}")
        self.dit, self.projector, self.decoder = dit, projector, decoder
        self.timestep = float(timestep)
        if context is None:
            warnings.warn("no cross-attention context in the checkpoint: using zeros (an untrained choice)",
                          stacklevel=2)
            context = torch.zeros(dit.config.text_len, dit.config.text_dim)
        self.context = context
        dit.set_context(context)
        # torch.compile of the DiT blocks' regions around the attention (WanDiT.compile_regions): on
        # CUDA by default, where it fuses the float32 norms, modulation and RoPE (docs/OASIS.md has
        # the measurement); the first call of each new clip size pays its compile time
        if compile is None:
            compile = dit.device.type == "cuda"
        if compile:
            dit.compile_regions()
        if isinstance(decoder.vae, WanVAE) and decoder.device.type == "cuda":
            # cuDNN's 3D convolutions run 1.3-1.8x faster on channels-last activations, and its benchmark
            # mode picks the Hopper kernels for the 2-frame pieces (docs/PERF.md entry 18b)
            decoder.vae.channels_last()
            decoder.vae.autotune = True

    # -- properties ----------------------------------------------------------------------------
    @property
    def sigma(self) -> float:
        return self.timestep / 1000.0

    @property
    def scale(self) -> int:
        """Output pixels per input pixel along each side (4 for the paper's setting)."""
        return self.decoder.spatial // self.projector.config.pixels_per_latent

    @property
    def align(self) -> int:
        """Input sides are padded to multiples of this (projector x DiT patch)."""
        return self.projector.config.pixels_per_latent * self.dit.config.patch_size[1]

    @property
    def device(self) -> torch.device:
        return self.dit.device

    # -- checkpoints ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, routing="checkpoint", window=(3, 5, 5), dtype=torch.bfloat16,
                        device="cuda", compile: bool | None = None, vae: str = "oasis") -> "OasisVSR":
        """Load a checkpoint folder (layout in the module docstring); nothing is downloaded.

        ``routing="checkpoint"`` uses the checkpoint's ``routing.json`` when it has one (else all heads
        global); a path, a RoutingFile, a list of modes per layer or ``None`` (all global) override it.
        ``vae``: ``"oasis"`` (our decoder, :mod:`oasis.wan_vae`) or ``"diffusers"`` (AutoencoderKLWan).
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint folder")
        meta_path = path / "oasis.json"
        if not meta_path.is_file():
            raise CheckpointError(f"{path}: no oasis.json; an OASIS checkpoint holds the projector beside the DiT "
                                  f"(see OasisVSR.save_pretrained)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{meta_path}: not a table of settings (got {type(meta).__name__})")
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        timestep = meta.get("timestep", 799)
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float)) or not 0 < timestep <= 1000:
            raise CheckpointError(f"{meta_path}: timestep must be a number in (0, 1000], got {timestep!r}")
        tensors_path = path / "oasis.safetensors"
        extra = read_safetensors_file(tensors_path) if tensors_path.is_file() else {}
        if "projector.proj.weight" not in extra or "projector.proj.bias" not in extra:
            raise CheckpointError(f"{path}: the checkpoint has no projector (oasis.safetensors lacks "
                                  f"projector.proj.weight / projector.proj.bias)")
        try:
            projector = LatentProjector(ProjectorConfig(**meta.get("projector", {})))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{meta_path}: its projector settings do not make a projector ({exc})") from None
        try:
            projector.load_state_dict({"proj.weight": extra["projector.proj.weight"],
                                       "proj.bias": extra["projector.proj.bias"]})
        except RuntimeError as exc:
            raise CheckpointError(f"{tensors_path}: the projector does not fit oasis.json's projector config "
                                  f"({str(exc).splitlines()[-1].strip()})") from None
        if routing == "checkpoint":
            name = meta.get("routing")
            routing = path / name if name else None
        device = torch.device(device)
        dit = WanDiT.from_pretrained(path, routing=routing, window=window, dtype=dtype, device=device)
        decoder = WanDecoder(load_vae(find_vae(path), dtype=dtype, device=device, backend=vae))
        projector.to(device=device, dtype=torch.float32)
        return cls(dit, projector, decoder, timestep=float(timestep), context=extra.get("context"),
                   compile=compile)

    def save_pretrained(self, path, *, layout: str = "diffusers") -> None:
        """Write the checkpoint folder; the DiT in ``layout`` (``"diffusers"`` or ``"wan"``)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        routing = None
        if any(m != 0 for modes in self.dit.routing for m in modes):
            routing = "routing.json"
            routing_json = {"format": "oasis-routing/1", "rho": None, "eps": None, "query_stride": None,
                            "videos": 0, "window": list(self.dit.blocks[0].self_attn.window),
                            "num_global": sum(int(m == 0) for modes in self.dit.routing for m in modes),
                            "layers": [{"name": f"blocks.{i}.self_attn", "modes": [m.name.lower() for m in modes],
                                        "stats": {}} for i, modes in enumerate(self.dit.routing)]}
            (path / routing).write_text(json.dumps(routing_json, indent=1))
        meta = {"format": FORMAT, "timestep": self.timestep, "projector": vars(self.projector.config).copy(),
                "routing": routing}
        (path / "oasis.json").write_text(json.dumps(meta, indent=1))
        write_safetensors({"projector.proj.weight": self.projector.proj.weight,
                           "projector.proj.bias": self.projector.proj.bias,
                           "context": self.context}, path, "oasis")
        self.dit.save_pretrained(path / "transformer", layout=layout)
        save_vae(self.decoder.vae, path / "vae")

    # -- the three stages -------------------------------------------------------------------------------
    def project(self, video: torch.Tensor) -> torch.Tensor:
        """Eq. 3: ``[B, 3, F, h, w]`` in [-1, 1] -> ``z_L [B, 16, T, h/2, w/2]`` float32."""
        return self.projector(video.to(self.device, torch.float32)).float()

    def restore(self, z_low: torch.Tensor) -> torch.Tensor:
        """Eq. 4: one DiT step from the projected latents."""
        v = self.dit(z_low.to(self.dit.dtype), torch.full((z_low.shape[0],), self.timestep, device=z_low.device))
        # under sequence parallelism the residual's gradient counts each frame on one rank (as v's does)
        return self.dit.own_frames_gradient(z_low) - self.sigma * v.float()

    def decode(self, z_high: torch.Tensor) -> torch.Tensor:
        """``[B, 16, T, H, W]`` -> ``[B, 3, 1 + 4(T-1), 8H, 8W]`` in [-1, 1]."""
        return self.decoder(z_high)

    @torch.no_grad()
    def restore_clip(self, video: torch.Tensor) -> torch.Tensor:
        """The three stages on one clip that fits: ``[B, 3, 4k+1, h, w]`` -> ``[B, 3, 4k+1, 4h, 4w]``."""
        return self.decode(self.restore(self.project(video))).float()

    # -- whole videos ---------------------------------------------------------------------------------------
    def plan(self, frames: int, height: int, width: int, *, memory_budget: float | None = None,
             chunk_frames: int | None = None, tile: int | None = None) -> TilePlan:
        """How a video of this size will be cut (validates everything before any work)."""
        for name, value in (("frames", frames), ("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        a = self.align
        height, width = a * math.ceil(height / a), a * math.ceil(width / a)
        budget = self._budget(memory_budget)
        cfg = self.dit.config
        elem = torch.finfo(self.dit.dtype).bits // 8

        def estimate(f, h, w):
            return estimate_bytes(f, h, w, dim=cfg.dim, ffn_dim=cfg.ffn_dim, elem=elem, scale=self.scale,
                                  decoder_width=self.decoder.width, decoder_values=self.decoder.working_values,
                                  frame_area=height * width,
                                  frames_per_latent=self.projector.config.frames_per_latent, pixels_per_token=a)

        return plan_tiles(frames, height, width, budget=budget, estimate=estimate, chunk_frames=chunk_frames,
                          tile=tile, frames_per_latent=self.projector.config.frames_per_latent, align=a)

    def _budget(self, memory_budget) -> int | None:
        """Bytes left for activations: the budget (GiB) less the weights, or 90% of the free GPU memory
        (the weights already sit there); None on the CPU without a budget (no limit)."""
        if memory_budget is not None:
            if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or memory_budget <= 0:
                raise ValueError(f"memory_budget must be a positive number of GiB, got {memory_budget!r}")
            left = int(memory_budget * 2**30) - self._weight_bytes()
            if left <= 0:
                raise MemoryError(f"the memory budget of {memory_budget:g} GiB does not hold the model's weights "
                                  f"({self._weight_bytes() / 2**30:.2f} GiB)")
            return left
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(0.9 * free)
        return None

    def _weight_bytes(self) -> int:
        mods = (self.dit, self.projector, self.decoder.vae)
        return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())

    def __call__(self, video: torch.Tensor, *, memory_budget: float | None = None, chunk_frames: int | None = None,
                 tile: int | None = None, progress: bool = True) -> torch.Tensor:
        """Super-resolve ``uint8 [F, h, w, 3]`` -> ``uint8 [F, 4h, 4w, 3]`` (on the CPU).

        ``video``: a tensor, or a frame source read a chunk at a time (anything with ``shape``
        ``(F, h, w, 3)``, ``dtype`` ``torch.uint8`` and ``video[a:b]`` -> ``uint8 [b - a, h, w, 3]``:
        :class:`oasis.video.VideoFrames` for a video file, :class:`oasis.images.ImageFrames` for a folder
        of images); with :meth:`stream`, a long video then never sits in memory whole."""
        video = _as_frames(video)
        plan = self._plan_for(video, memory_budget, chunk_frames, tile)
        frames, height, width, _ = video.shape
        start = 0
        # the output's host pages are made resident on another thread while the device works
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_host_frames, (frames, height * self.scale, width * self.scale, 3), video.dtype)
            for block in self._run(video, plan, progress):  # each chunk copied once, into its place
                out = pending.result()
                out[start:start + block.shape[0]].copy_(block)
                start += block.shape[0]
        return pending.result()

    @torch.no_grad()
    def stream(self, video: torch.Tensor, *, memory_budget: float | None = None, chunk_frames: int | None = None,
               tile: int | None = None, progress: bool = True, start: int = 0):
        """Like ``__call__``, yielding finished output frames chunk by chunk (``uint8 [f, 4h, 4w, 3]``, on
        the CPU, contiguous).

        ``start``: yield frames ``start, start + 1, ...`` only, the same numbers as the whole run's (to
        resume an interrupted one): the chunks before the first one that reaches ``start`` are not run."""
        video = _as_frames(video)
        plan = self._plan_for(video, memory_budget, chunk_frames, tile)
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < video.shape[0]:
            raise ValueError(f"start must be a frame of the video's {video.shape[0]}, got {start!r}")
        for block in self._run(video, plan, progress, start):
            yield _host_frames(block.shape, block.dtype).copy_(block)

    def _plan_for(self, video, memory_budget, chunk_frames, tile) -> TilePlan:
        if isinstance(video, torch.Tensor):
            shape, dtype = tuple(video.shape), video.dtype
            if video.dim() != 4:
                raise ValueError(f"video must be uint8 [F, h, w, 3] RGB, got {video.dtype} {shape}")
        elif hasattr(video, "__getitem__") and isinstance(getattr(video, "shape", None), (tuple, torch.Size)):
            shape, dtype = tuple(video.shape), getattr(video, "dtype", None)  # a frame source
        else:
            raise TypeError(f"video must be a uint8 tensor [F, h, w, 3] or a frame source (oasis.video.VideoFrames, "
                            f"oasis.images.ImageFrames), got {type(video).__name__}")
        if dtype not in _LEVELS or len(shape) != 4 or shape[-1] != 3 or min(shape) == 0:
            raise ValueError(f"video must be uint8 [F, h, w, 3] RGB (or uint16), got {dtype} {shape}")
        frames, height, width, _ = shape
        return self.plan(frames, height, width, memory_budget=memory_budget, chunk_frames=chunk_frames, tile=tile)

    @torch.no_grad()
    def _run(self, video: torch.Tensor, plan: TilePlan, progress: bool, start: int = 0):
        """The finished output frames from ``start`` on, chunk by chunk, ``[f, 4h, 4w, 3]`` in the video's
        dtype, contiguous on the device."""
        frames, height, width, _ = tuple(video.shape)
        a, s, ft = self.align, self.scale, self.projector.config.frames_per_latent
        ph, pw = a * math.ceil(height / a), a * math.ceil(width / a)
        padded = 1 + ft * math.ceil((frames - 1) / ft)
        chunk = min(plan.chunk_frames, padded)
        total = max(frames, chunk)
        half = _LEVELS[video.dtype] / 2
        # each clip is cut from the uint8 video, the borders replicated up to the grid (cropped again
        # at the end) and a short clip's last frame repeated up to 4k+1 frames; it travels to the
        # device as uint8 and becomes [-1, 1] floats there. A frame source is sliced once per chunk, in
        # order, with starts that never go back: a streamed video is decoded once, a window at a time
        def frames_of(t0, t1):
            first, last = min(t0, frames - 1), min(t1 - 1, frames - 1)
            part = video[first:last + 1]
            if t1 > frames:  # the last frame repeated beyond the video's end
                part = part.index_select(0, torch.arange(t0, t1, device=part.device).clamp_(max=frames - 1) - first)
            return part

        def clip_at(part, h0, h1, w0, w1):
            for dim, (lo, hi, size) in ((1, (h0, h1, height)), (2, (w0, w1, width))):
                first, last = min(lo, size - 1), min(hi - 1, size - 1)
                part = part.narrow(dim, first, last - first + 1)  # the clip's rows, columns
                if hi > size:  # and the replicated ones beyond the frame's edge
                    part = part.index_select(dim, torch.arange(lo, hi, device=part.device).clamp_(max=size - 1) - first)
            part = part.to(self.device)
            return part.permute(3, 0, 1, 2)[None].float().div_(half).sub_(1.0)  # [1, 3, f, h, w]

        t_spans = spans(total, chunk, plan.overlap_frames)
        t_weights = span_weights(t_spans)
        th, tw = plan.tile if plan.tiled else (ph, pw)
        h_spans, w_spans = spans(ph, th, plan.tile_overlap), spans(pw, tw, plan.tile_overlap)
        h_weights, w_weights = span_weights(h_spans), span_weights(w_spans)
        # from frame `start`: every chunk that adds to a frame from there on runs, the first of them being the
        # first to reach past `start` (earlier ones add to earlier frames only); what it finishes before
        # `start` lacks the chunks before it and is not yielded
        first = next(i for i, (_, t1) in enumerate(t_spans) if t1 > start)
        bar = _progress((len(t_spans) - first) * len(h_spans) * len(w_spans), progress, "oasis-vsr")
        carry = None  # (start, weighted sum, weight sum) of frames a later chunk still adds to
        emitted = t_spans[first][0]
        try:
            for i, ((t0, t1), tw_) in enumerate(zip(t_spans, t_weights)):
                if i < first:
                    continue
                acc = torch.zeros(3, t1 - t0, ph * s, pw * s, device=self.device)
                part = frames_of(t0, t1)
                for (h0, h1), hw_ in zip(h_spans, h_weights):
                    for (w0, w1), ww_ in zip(w_spans, w_weights):
                        out = self.restore_clip(clip_at(part, h0, h1, w0, w1))[0]
                        weight = (hw_.repeat_interleave(s)[:, None] * ww_.repeat_interleave(s)[None]).to(out.device)
                        acc[:, :, h0 * s:h1 * s, w0 * s:w1 * s] += out * weight
                        if bar is not None:
                            bar.update(1)
                weights = tw_.to(acc.device)
                acc *= weights[None, :, None, None]
                wsum = weights.clone()
                if carry is not None:
                    c0, c_acc, c_w = carry
                    k = c_acc.shape[1]
                    acc[:, c0 - t0:c0 - t0 + k] += c_acc
                    wsum[c0 - t0:c0 - t0 + k] += c_w
                next_start = t_spans[i + 1][0] if i + 1 < len(t_spans) else t1
                done = next_start - t0
                carry = (next_start, acc[:, done:], wsum[done:]) if done < t1 - t0 else None
                final = acc[:, :done] / wsum[None, :done, None, None]
                # NaN or inf would become black frames (uint8 0) without a word: one reduction and one wait
                # a chunk, against seconds of its work
                if not bool(torch.isfinite(final).all()):
                    raise FloatingPointError(
                        f"the restored frames {t0}..{min(t0 + done, frames) - 1} are not finite (NaN or inf): the checkpoint's "
                        f"weights, or the range of the model's dtype ({self.dit.dtype})")
                keep = min(done, frames - emitted)
                skip = min(max(start - emitted, 0), max(keep, 0))
                if keep > skip:
                    yield _to_frames(final[:, skip:keep, :height * s, :width * s], video.dtype)
                emitted += max(keep, 0)
        except torch.OutOfMemoryError:
            raise MemoryError(f"out of device memory restoring a chunk of {plan.chunk_frames} frames"
                              f"{'' if not plan.tiled else f' in tiles of {plan.tile}'}; lower the memory budget, "
                              f"chunk frames or tile size") from None
        finally:
            if bar is not None:
                bar.close()


def _as_frames(video):
    """A numpy array of frames as a tensor (shared memory); anything else as it is."""
    import numpy as np

    return torch.from_numpy(video) if isinstance(video, np.ndarray) and video.dtype in (np.uint8, np.uint16) \
        else video


#: white in each frame dtype: uint8 frames 0..255; uint16 ones as FFmpeg's 16-bit RGB (rgb48), 256 x the 8-bit
#: level (its conversions put 10-bit video's white at 65280, and write 65535 above it, as 943 of 10 bits)
_LEVELS = {torch.uint8: 255, torch.uint16: 65280}


def _host_frames(shape, dtype=torch.uint8) -> torch.Tensor:
    """An uninitialised host tensor whose pages are resident (one byte of each written): a copy
    from the device into fresh pageable memory faults its pages in as it goes, 52 ms for 33 frames of
    720p on an H200's host against 5 ms into resident pages (docs/PERF.md entry 18d)."""
    out = torch.empty(shape, dtype=dtype)
    out.view(-1)[::4096 // out.element_size()].zero_()
    return out


def _to_frames(x: torch.Tensor, dtype=torch.uint8) -> torch.Tensor:
    """``[3, F, H, W]`` in [-1, 1] -> ``uint8 [F, H, W, 3]`` (or uint16), contiguous, on ``x``'s device: the copy
    to the host is then one plain memcpy, where a channel-planar permute left every reader of the
    frames (``torch.cat``, the video writer) a strided gather of all their bytes on the CPU."""
    return ((x.clamp(-1, 1) + 1) * (_LEVELS[dtype] / 2)).round().to(dtype).permute(1, 2, 3, 0).contiguous()
