"""Training OASIS (sec. 3.4): the progressive two-stage curriculum with eq. 11's objective.

Stage 1 (``stage1_steps``) degrades each clip consistently (one draw per clip), stage 2
(``stage2_steps``) inconsistently (frame by frame), :mod:`oasis.degrade`. Each step: the projector
and the DiT restore the LQ clip's latents in one step (eqs. 3-4); the frozen VAE encodes the HQ clip
(the latent target) and decodes the prediction with gradients flowing to the latents; the loss is
:class:`oasis.losses.OasisLoss`. The DiT and the projector train (AdamW), the VAE does not.

Runs on one GPU, the CPU (slow; the demo), or several GPUs under ``torchrun``: DDP (each rank its own
samples, gradients averaged), or with ``sequence_parallel = S`` groups of S ranks that split each
clip's DiT call by latent frames (``WanDiT.set_sequence_parallel``) and sum their gradients, the
groups data-parallel among themselves. Checkpoints (``out/step_N/``) hold an OASIS model folder that
``oasis-vsr`` reads and ``trainer.pt`` (optimizer, step, random states): ``resume`` continues exactly,
the data being a function of the seed and the sample number (:mod:`oasis.data`).

    oasis-train config.toml          # or .yaml / .json; keys: the fields of TrainConfig
    oasis-train --demo               # a tiny random model on synthetic clips, CPU, a few steps
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import DeviceDegrader, _unit
from .degrade import VERSION as DEGRADE_VERSION
from .losses import clip_flows
from .vae import normalise_latents

__all__ = ["TrainConfig", "Trainer", "main"]


#: the forms of TrainConfig.compile beyond true and false
COMPILE_MODES = ("regions", "graphs")


def check_compile(setting) -> None:
    """``TrainConfig.compile``'s values: true, false, absent, or one of COMPILE_MODES."""
    if setting is not None and not isinstance(setting, bool) and setting not in COMPILE_MODES:
        raise ValueError(f"compile must be true, false, one of {', '.join(map(repr, COMPILE_MODES))} or absent "
                         f"(regions on CUDA), got {setting!r}")


def compile_dit(dit, setting, device: torch.device) -> str | None:
    """Compile ``dit`` as ``TrainConfig.compile = setting`` asks; returns the form used (None: eager)."""
    check_compile(setting)
    mode = "regions" if setting is True or (setting is None and device.type == "cuda") else setting or None
    if mode == "regions":
        dit.compile_regions()
    elif mode == "graphs":
        # static shapes: a run trains at one batch and clip size, and a new one compiles anew
        dit.compile_model(fullgraph=True, dynamic=False, mode="reduce-overhead")
    return mode


#: GPU memory a loader worker degrading on the trainer's GPU holds outside the trainer's process, as the
#: checkpointing budget counts it: its CUDA context and its allocator's cache of a 17x320x640 clip's buffers.
#: Measured (degrade_bench's CardMemory, H100, 07f22fd): 2.21-2.28 GiB a worker at the peak of 4 workers'
#: rows, 1.60-2.09 with 16 (their peaks coincide less); the most, rounded up
DEGRADE_WORKER_BYTES = 5 << 29  # 2.5 GiB


def blocks_to_checkpoint(num_layers: int, peak_all: int, per_block: float, extra: int, budget: int) -> int:
    """How many of ``num_layers`` blocks to checkpoint (the fewest) so that a step's peak memory stays
    within ``budget`` bytes: ``peak_all`` is a probe step's peak with every block checkpointed,
    ``per_block`` the activations one block keeps when it is not (the blocks are alike), ``extra`` bytes
    the probe did not hold (AdamW's moments before the first step; with accumulation, the gradients a
    later micro-batch's forward runs beside). Each kept block adds its activations to the peak. A
    probe that saw no activations (``per_block <= 0``) decides nothing: every block stays checkpointed."""
    room = budget - peak_all - extra
    if room <= 0 or per_block <= 0:
        return num_layers
    return num_layers - min(num_layers, int(room // per_block))


def over_budget_note(peak: int, budget: int, gpu_workers: int) -> str | None:
    """What to change when a step checkpointing every block still peaks above ``budget`` bytes (None where it
    fits): the step may run out of memory; ``gpu_workers`` loader workers degrading on this GPU hold
    DEGRADE_WORKER_BYTES each outside the budget."""
    if peak <= budget:
        return None
    note = (f"a step checkpointing every block peaks at {peak / 2**30:.1f} GiB, above the budget of "
            f"{budget / 2**30:.1f} GiB (memory_fraction of the GPU")
    if gpu_workers:
        return (note + f", less {gpu_workers} loader workers degrading on it at {DEGRADE_WORKER_BYTES / 2**30:.1f} "
                "GiB each): fewer workers, degrade_on = \"device\", a smaller batch or shorter clips make room")
    return note + "): a smaller batch or shorter clips make room"


@dataclass
class TrainConfig:
    """Every setting of a run (the defaults are the paper's where it gives one)."""

    # the model to start from: an OASIS checkpoint folder (OasisVSR.save_pretrained's layout), and a
    # whole Wan VAE (folder or Wan2.1_VAE.pth) when that checkpoint's VAE has no encoder
    checkpoint: str | None = None
    vae: str | None = None
    demo: bool = False  # a tiny random model and synthetic clips instead (tests, --demo)
    routing: str | None = None  # a routing file for the DiT (None: the checkpoint's)
    # Algorithm 1 before training, from the starting DiT on this many training clips (0: skip; the
    # paper: 50 at rho 0.4); the result is saved as out/routing.json and trained with
    calibrate_videos: int = 0
    calibrate_rho: float = 0.4
    # data
    videos: str | None = None  # a folder of HQ videos, or of folders of frames (searched recursively)
    frames: int = 17
    height: int = 320
    width: int = 640
    frame_stride: int = 1
    workers: int = 4
    # where the degradations run: "workers" (the loader's CPU processes), "device" (the training device,
    # in the main process: blur, resize, noise and JPEG on the GPU, the codec on the CPU between),
    # "workers-device" (the loader's processes, each on the training device: the same GPU work, its Python
    # in `workers` interpreters instead of one; each worker holds a CUDA context, and the checkpointing
    # budget leaves DEGRADE_WORKER_BYTES of the GPU to each) or "auto" (on CUDA
    # "workers-device" with loader workers, "device" without; "workers" on the CPU). On an H100's 16-core
    # host (48e8a57, docs/OASIS.md) 16 workers degrading on the GPU made 48-53 clips/s and a matmul beside
    # them kept 88% of its rate; "device" made 26-46 and kept 55% (the main process's interpreter is shared)
    degrade_on: str = "auto"
    degrade_threads: int = 4
    # the curriculum
    stage1_steps: int = 25000
    stage2_steps: int = 25000
    batch: int = 1  # clips per GPU (per group of sequence_parallel GPUs) per micro-batch
    accumulate: int = 1  # micro-batches per optimizer step
    # ranks that split each clip's DiT call by latent frames (1: none); the world size must be a multiple,
    # and frames must give at least this many latent frames (frames >= 4 * sequence_parallel - 3)
    sequence_parallel: int = 1
    change_prob: float = 0.2  # stage 2: the chance a degradation step is drawn anew on the next frame
    # optimizer
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    # losses
    lpips: str | None = None  # local torchvision backbone checkpoint for LPIPS; None trains without LPIPS
    lpips_net: str = "vgg"
    warp_weight: float = 0.1
    raft: str | None = None  # local torchvision raft_large weights: the HQ clip's flows for the warp loss
                             # (None: no warp loss)
    # execution
    device: str = "cuda"
    dtype: str = "bfloat16"  # autocast dtype on CUDA (weights stay float32)
    # DiT blocks that recompute their activations in the backward: true = all, false = none, a number of
    # blocks (the first ones; the rest keep theirs: faster, more memory), or "auto": on CUDA the fewest
    # that keep a step's peak within memory_fraction of the GPU, from probe steps before the first
    # (fit_checkpointing); all of them on the CPU and under compile = "graphs" (a count is a whole
    # compile there). The 1.3B step at batch 4, H200 (426bad8): 0.454 s
    # with all 30 checkpointed, 0.371 s with none (57.5 GiB for the DiT alone)
    activation_checkpointing: bool | int | str = "auto"
    memory_fraction: float = 0.9
    # torch.compile of the DiT: "regions" compiles each block's code around the routed attention
    # (WanDiT.compile_regions, as oasis-vsr does on CUDA); "graphs" the whole DiT, its forward and
    # backward one graph each, replayed as CUDA graphs (torch.compile's reduce-overhead mode; static
    # shapes, minutes to compile). true = "regions"; absent: "regions" on CUDA, eager on the CPU. The
    # 1.3B step at (5,20,40), batch 1, H200 (426bad8): 0.37 s eager, 0.25-0.37 s with regions (the
    # host bounds it), 0.157 s with graphs; batch 4: regions 0.454 s with every block checkpointed,
    # 0.371 s with none (docs/OASIS.md)
    compile: bool | str | None = None
    seed: int = 0
    out: str = "runs/oasis"
    save_every: int = 1000
    log_every: int = 10
    progress: bool = True
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        # the kinds first, each naming its setting (a config file's "false" is a string, which is true)
        for name in ("demo", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("checkpoint", "vae", "routing", "videos", "lpips", "raft"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise ValueError(f"{name} must be a path (a string), got {v!r}")
        if not isinstance(self.out, (str, os.PathLike)):
            raise ValueError(f"out must be a path (a string), got {self.out!r}")
        for name in ("device", "dtype", "degrade_on", "lpips_net"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("calibrate_rho", "change_prob", "memory_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name} must be a number, got {v!r}")
        if isinstance(self.betas, (str, bytes)) or not isinstance(self.betas, (list, tuple)) or \
                not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        positive = ("frames", "height", "width", "frame_stride", "batch", "accumulate", "save_every", "log_every",
                    "sequence_parallel")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("stage1_steps", "stage2_steps", "workers", "degrade_threads", "seed", "calibrate_videos"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.stage1_steps + self.stage2_steps == 0:
            raise ValueError("stage1_steps + stage2_steps must be at least 1")
        if isinstance(self.lr, bool) or not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.dtype not in ("bfloat16", "float32"):  # float16 would need loss scaling
            raise ValueError(f"dtype must be bfloat16 or float32, got {self.dtype!r}")
        for name in ("warp_weight", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        if self.grad_clip is not None and (isinstance(self.grad_clip, bool) or
                                           not isinstance(self.grad_clip, (int, float)) or self.grad_clip <= 0):
            raise ValueError(f"grad_clip must be a positive number or None, got {self.grad_clip!r}")
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            raise ValueError(f"device must be 'cuda', 'cuda:N' or 'cpu', got {self.device!r}") from None
        if kind not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        check_compile(self.compile)
        if self.compile == "graphs" and self.sequence_parallel > 1:
            raise ValueError(f"compile = {self.compile!r} takes the whole DiT into one graph, which the "
                             f"sequence-parallel collectives would break; use 'regions' with sequence_parallel > 1")
        v = self.activation_checkpointing
        if v != "auto" and (not isinstance(v, (bool, int)) or (not isinstance(v, bool) and v < 0)):
            raise ValueError(f"activation_checkpointing must be true, false, a number of blocks or 'auto', got {v!r}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction!r}")
        if self.degrade_on not in ("auto", "workers", "device", "workers-device"):
            raise ValueError(f"degrade_on must be 'auto', 'workers', 'device' or 'workers-device', got "
                             f"{self.degrade_on!r}")
        if self.lpips_net not in ("vgg", "alex"):
            raise ValueError(f"lpips_net must be 'vgg' or 'alex', got {self.lpips_net!r}")
        if not 0 < self.calibrate_rho <= 1:
            raise ValueError(f"calibrate_rho must be in (0, 1], got {self.calibrate_rho!r}")
        if self.calibrate_videos and self.routing is not None:
            raise ValueError("give routing or calibrate_videos, not both")
        if not 0 <= self.change_prob <= 1:
            raise ValueError(f"change_prob must be in [0, 1], got {self.change_prob!r}")
        if 1 + (self.frames - 1) // 4 < self.sequence_parallel:
            raise ValueError(f"frames = {self.frames} make {1 + (self.frames - 1) // 4} latent frames, fewer than "
                             f"sequence_parallel = {self.sequence_parallel} (give frames >= "
                             f"{4 * self.sequence_parallel - 3})")
        if not self.demo and self.checkpoint is None:
            raise ValueError("checkpoint is required (an OASIS checkpoint folder to start from), or demo = true")
        if not self.demo and self.videos is None:
            raise ValueError("videos is required (a folder of HQ training videos), or demo = true")

    @classmethod
    def from_file(cls, path) -> "TrainConfig":
        """A ``.toml``, ``.yaml``/``.yml`` or ``.json`` file of TrainConfig's fields; unknown keys are one error."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such config file")
        if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
            raise ValueError(f"{path}: the config must be .toml, .yaml/.yml or .json")
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ValueError(f"{path}: reading TOML needs Python >= 3.11; use .json or .yaml") from None
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use TOML") from None
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(text)
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                data = yaml.safe_load(text) or {}
        except Exception as exc:  # the parsers' own errors: a line and a reason
            raise ValueError(f"{path}: cannot parse ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a table of settings")
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where}: unknown settings {unknown}; known: {sorted(names)}")
        return cls(**data)

    def stage(self, step: int) -> int:
        return 1 if step < self.stage1_steps else 2

    @property
    def steps(self) -> int:
        return self.stage1_steps + self.stage2_steps


def _distributed():
    """(rank, world size, local rank) under torchrun, else (0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


class Trainer:
    """One run of :class:`TrainConfig`: ``Trainer(cfg).run()``; ``resume=`` a ``step_N`` folder."""

    def __init__(self, cfg: TrainConfig, resume=None):
        from .data import ClipSpec, PairDataset, SyntheticVideos, VideoFolder
        from .degrade import Degradation
        from .losses import OasisLoss, load_lpips, load_raft

        self.cfg = cfg
        self.rank, self.world, local = _distributed()
        # on every rank, before any collective: a rank that failed alone would leave the others waiting
        _check_out(Path(cfg.out), resume)
        if self.world % cfg.sequence_parallel:
            raise ValueError(f"sequence_parallel = {cfg.sequence_parallel} does not divide the {self.world} ranks")
        # data-parallel replicas: groups of sequence_parallel consecutive ranks, each on its own samples
        self.replicas, self.replica = self.world // cfg.sequence_parallel, self.rank // cfg.sequence_parallel
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if cfg.device == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)
        device = torch.device(cfg.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device is 'cuda' but no CUDA device is available; set device = 'cpu'")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        self.device = device
        self.autocast = getattr(torch, cfg.dtype) if device.type == "cuda" and cfg.dtype != "float32" else None
        _seed_everything(cfg.seed + self.replica)
        self.pipe, self.vae = self._build_model()
        spec = ClipSpec(cfg.frames, cfg.height, cfg.width, cfg.frame_stride)
        source = SyntheticVideos(spec, cfg.seed) if cfg.videos is None else VideoFolder(cfg.videos, spec, cfg.seed)
        degradation = Degradation(change_prob=cfg.change_prob)
        self.data = {stage: PairDataset(source, degradation, mode, cfg.seed)
                     for stage, mode in ((1, "consistent"), (2, "inconsistent"))}
        self.routing = None
        if cfg.calibrate_videos and resume is None:
            self.routing = self.calibrate_routing(cfg.calibrate_videos, cfg.calibrate_rho)
        if cfg.sequence_parallel > 1:  # after the calibration, which rank 0 runs alone
            sp = cfg.sequence_parallel
            groups = [torch.distributed.new_group(list(range(g * sp, (g + 1) * sp))) for g in range(self.replicas)]
            self.pipe.dit.set_sequence_parallel(groups[self.replica])
            with torch.no_grad():  # the same start on every rank, as DDP's broadcast gives it
                for p in (*self.pipe.dit.parameters(), *self.pipe.projector.parameters()):
                    torch.distributed.broadcast(p.data, 0)
        # after the calibration (its hooks on the blocks) and the sequence-parallel split
        compile_dit(self.pipe.dit, cfg.compile, device)
        self.loss = OasisLoss(lpips=load_lpips(cfg.lpips, cfg.lpips_net, device) if cfg.lpips else None,
                              warp_weight=cfg.warp_weight)
        self.flow_model = load_raft(cfg.raft, device) if cfg.raft else None
        self.params = [p for m in (self.pipe.dit, self.pipe.projector) for p in m.parameters() if p.requires_grad]
        # fused: one kernel pass over the parameters and both moments, where the default (foreach)
        # makes about ten (1.3B float32 parameters: ~36 GB of traffic against ~110 GB)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                           fused=True)
        self.model = self._wrap()
        self.step = 0
        self._fitted = False  # activation_checkpointing = "auto": fit_checkpointing has run
        self.history: list[dict] = []
        if resume is not None:
            self.load(resume)

    # -- construction ----------------------------------------------------------------------------------
    def _build_model(self):
        from .vae import WanDecoder, find_vae, load_vae
        from .wan_vae import WanVAE

        cfg, device = self.cfg, self.device
        if cfg.demo:
            from .demo import TINY_VAE, tiny_pipeline

            pipe = tiny_pipeline(cfg.seed, device=device)
            if cfg.routing is not None:
                pipe.dit.set_routing(cfg.routing)
            gen = torch.Generator().manual_seed(cfg.seed + 1)
            vae = WanVAE(TINY_VAE)  # the tiny pipeline's decoder, with a seeded random encoder beside it
            decoder = pipe.decoder.vae.state_dict()
            with torch.no_grad():
                for name, p in vae.named_parameters():
                    p.copy_(decoder[name] if name in decoder else torch.randn(p.shape, generator=gen) * 0.05 + (
                        1.0 if name.endswith("gamma") else 0.0))
            vae = vae.to(device).eval().requires_grad_(False)
            pipe.decoder = WanDecoder(vae)
        else:
            from .pipeline import OasisVSR

            routing = "checkpoint" if cfg.routing is None else cfg.routing
            pipe = OasisVSR.from_pretrained(cfg.checkpoint, routing=routing, dtype=torch.float32, device=device,
                                            compile=False)
            vae_path = cfg.vae or find_vae(cfg.checkpoint)
            vae_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            vae = load_vae(vae_path, dtype=vae_dtype, device=device, encoder=True)
            if device.type == "cuda":
                vae.channels_last()
            pipe.decoder = WanDecoder(vae)
        pipe.dit.requires_grad_(True).train()
        pipe.projector.requires_grad_(True).train()
        # "auto": every block until fit_checkpointing has measured a step
        v = cfg.activation_checkpointing
        pipe.dit.activation_checkpointing = True if v == "auto" else v
        return pipe, vae

    def _wrap(self):
        """The trainable part as one module (DDP over it when several ranks run, each on its own
        samples; under sequence parallelism :meth:`train_step` sums the gradients itself)."""
        module = _Restorer(self.pipe, self.autocast)
        if self.world > 1 and self.cfg.sequence_parallel == 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return module

    # -- routing ---------------------------------------------------------------------------------------
    def calibrate_routing(self, videos: int, rho: float):
        """Algorithm 1 (:mod:`oasis_kernels.routing`) from the current DiT, all heads global, on ``videos``
        LQ training clips (sample numbers apart from training's); rank 0 computes and saves
        ``out/routing.json``, every rank then routes its DiT with it."""
        from oasis_kernels.routing import RoutingCalibrator, load_routing

        from .dit import WanBlock

        path = Path(self.cfg.out) / "routing.json"
        if self.rank == 0:
            dit = self.pipe.dit
            dit.set_routing(None)
            calibrator = RoutingCalibrator()
            restorer = _Restorer(self.pipe, self.autocast)
            # the blocks are the modules called around each routed attention (named after their attention)
            with torch.no_grad(), calibrator.record(dit, lambda name, m: isinstance(m, WanBlock)):
                for i in range(videos):
                    lq, _ = self.data[1][CALIBRATION_SAMPLES + i]
                    restorer(lq[None].to(self.device))
            path.parent.mkdir(parents=True, exist_ok=True)
            routing = calibrator.assign(rho)
            routing = dataclasses.replace(routing, layers=[dataclasses.replace(layer, name=f"{layer.name}.self_attn")
                                                           for layer in routing.layers])
            routing.save(path)
        if self.world > 1:
            torch.distributed.barrier()
        routing = load_routing(path)
        self.pipe.dit.set_routing(routing)
        return routing

    # -- data ------------------------------------------------------------------------------------------
    def samples(self, step: int) -> list[list[int]]:
        """The sample numbers of ``step``'s ``accumulate`` micro-batches on this rank (fixed by the step:
        data-parallel replicas and micro-batches never share one; the ranks of a sequence-parallel group
        load the same samples)."""
        cfg = self.cfg
        per_step = cfg.accumulate * cfg.batch * self.replicas
        return [[step * per_step + (j * self.replicas + self.replica) * cfg.batch + i for i in range(cfg.batch)]
                for j in range(cfg.accumulate)]

    def fit_checkpointing(self, batches=None) -> int:
        """``activation_checkpointing = "auto"`` on CUDA: forward and backward of one micro-batch (``batches``:
        this step's by default), untrained (the gradients are dropped, DDP does not reduce them), three
        times: a warm-up (compiles, autotuning), then with every block checkpointed (the step's peak)
        and with the last two keeping their activations (the memory held at the end of the forward,
        against the first: each block's share); sets the fewest checkpointed blocks whose step fits
        within ``memory_fraction`` of the GPU (blocks_to_checkpoint; the most any rank needs) and
        returns that number."""
        dit, cfg = self.pipe.dit, self.cfg
        num = len(dit.blocks)
        if self.device.type != "cuda":
            dit.activation_checkpointing = True
            return num
        lq, hq = next(iter(self.micro_batches(self.step) if batches is None else batches))
        free = min(2, num)
        peaks, held = [], []
        quiet = self.model.no_sync() if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) \
            else contextlib.nullcontext()
        with quiet:
            for k in (num, num, num - free):
                dit.activation_checkpointing = k
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
                total = self._losses(lq, hq)["total"]
                held.append(torch.cuda.memory_allocated(self.device) - before)
                total.backward()
                del total
                self.optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize(self.device)
                peaks.append(torch.cuda.max_memory_allocated(self.device))
        per_block = (held[2] - held[1]) / free
        param_bytes = sum(p.numel() * p.element_size() for p in self.params)
        extra = (0 if self.optimizer.state else 2 * param_bytes) + (param_bytes if cfg.accumulate > 1 else 0)
        budget = self._memory_budget(torch.cuda.get_device_properties(self.device).total_memory)
        k = blocks_to_checkpoint(num, peaks[1], per_block, extra, budget)
        if self.world > 1:
            most = torch.tensor([k], device=self.device)
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
            k = int(most.item())
        dit.activation_checkpointing = k
        if self.rank == 0:
            print(f"oasis-train: activation checkpointing on {k} of {num} blocks (a step's peak with all "
                  f"{peaks[1] / 2**30:.1f} GiB, {per_block / 2**30:.2f} GiB per block kept, {extra / 2**30:.1f} GiB "
                  f"still to come; budget {budget / 2**30:.1f} GiB)", flush=True)
            short = over_budget_note(peaks[1] + extra, budget, self._gpu_workers())
            if short:
                print(f"oasis-train: warning: {short}", file=sys.stderr, flush=True)
        return k

    def _degrade_place(self, setting: str, device=None) -> str:
        """On which kind of device ``degrade_on = setting`` degrades, for a trainer on ``device`` (this
        one's): "device" or "workers" (the CPU). "workers-device" makes the pairs "device" does, in other
        processes, so a resume takes either for the other."""
        kind = self.device.type if device is None else torch.device(device).type
        if setting == "workers-device":
            return "workers" if kind == "cpu" else "device"
        return "device" if setting == "device" or (setting == "auto" and kind == "cuda") else "workers"

    @property
    def degrades_on_device(self) -> bool:
        return self._degrade_place(self.cfg.degrade_on) == "device"

    def _memory_budget(self, total: int) -> int:
        """The bytes a step may peak at on a GPU of ``total`` bytes: ``memory_fraction`` of it, less what loader
        workers degrading on this GPU hold there (not in this process's counts: DEGRADE_WORKER_BYTES each, a CUDA
        context and its allocator's cache of a clip's degradation buffers, as measured)."""
        return int(self.cfg.memory_fraction * total) - self._gpu_workers() * DEGRADE_WORKER_BYTES

    def _gpu_workers(self) -> int:
        """The loader workers that hold memory on this trainer's GPU (those degrading there), else 0."""
        return self.cfg.workers if self._degrades_in_workers() else 0

    def _degrades_in_workers(self, device=None) -> bool:
        """Whether the loader's workers degrade their clips on this trainer's device (``"workers-device"``, or
        ``"auto"`` on CUDA with loader workers), for a trainer on ``device`` (this one's)."""
        kind = self.device.type if device is None else torch.device(device).type
        setting = self.cfg.degrade_on
        return setting == "workers-device" or (setting == "auto" and kind == "cuda" and self.cfg.workers > 0)

    def micro_batches(self, step: int):
        """``step``'s micro-batches ``(lq, hq)``, loaded here (no workers, no degradation threads)."""
        data = self.data[self.cfg.stage(step)]
        for numbers in self.samples(step):
            if self.degrades_on_device:
                hq = torch.stack([data.hq_only()[n][1] for n in numbers])
                yield _signed(*DeviceDegrader(self.device, 0).submit(data, numbers, hq).result())
                continue
            pairs = [data[n] for n in numbers]
            yield (torch.stack([p[0] for p in pairs]).to(self.device),
                   torch.stack([p[1] for p in pairs]).to(self.device))

    def _loader(self, start: int, end: int):
        """Micro-batches of steps ``start .. end-1`` in order, ``workers`` processes loading ahead;
        one DataLoader per stage (each stage has its own degradation mode)."""
        cfg = self.cfg
        for stage_start, stage_end in ((start, min(end, cfg.stage1_steps)), (max(start, cfg.stage1_steps), end)):
            if stage_start >= stage_end:
                continue
            order = [numbers for step in range(stage_start, stage_end) for numbers in self.samples(step)]
            data = self.data[cfg.stage(stage_start)]
            if self._degrades_in_workers():
                # each worker degrades its clips on this trainer's device; CUDA needs spawned workers
                spawn = cfg.workers > 0 and self.device.type == "cuda"
                loader = torch.utils.data.DataLoader(data.on_device_in_workers(self.device), batch_sampler=order,
                                                     num_workers=cfg.workers, pin_memory=self.device.type == "cuda",
                                                     multiprocessing_context="spawn" if spawn else None)
                for lq, hq in loader:
                    hq = _unit(hq.to(self.device, non_blocking=True))
                    yield _signed(lq.to(self.device, non_blocking=True), hq)
                continue
            on_device = self.degrades_on_device
            loader = torch.utils.data.DataLoader(data.hq_only() if on_device else data, batch_sampler=order,
                                                 num_workers=cfg.workers, pin_memory=self.device.type == "cuda")
            if not on_device:
                for a, b in loader:
                    yield a.to(self.device, non_blocking=True), b.to(self.device, non_blocking=True)
                continue
            # (index, HQ clip) batches, degraded here: a step's micro-batches are taken together, so
            # keeping `accumulate` of them in flight degrades the next step's while this one trains
            with DeviceDegrader(self.device, cfg.degrade_threads) as degrader:
                pending = collections.deque()
                for numbers, hq in loader:
                    pending.append(degrader.submit(data, numbers.tolist(), hq))
                    if len(pending) > cfg.accumulate:
                        yield _signed(*pending.popleft().result())
                while pending:
                    yield _signed(*pending.popleft().result())

    # -- one step ----------------------------------------------------------------------------------------
    def _losses(self, lq: torch.Tensor, hq: torch.Tensor) -> dict:
        """Eq. 11's parts for one micro-batch: restore, encode the target, decode (unclamped, gradients
        to the latents through the frozen VAE), the flows when a flow model is set."""
        vae_dtype = self.vae.post_quant_conv.weight.dtype
        with torch.no_grad():
            z_hq = normalise_latents(self.vae.encode(hq.to(vae_dtype), chunk=1), self.vae.config)
        z_hat = self.model(lq)
        video = self.vae.decode(self.pipe.decoder.raw_latents(z_hat).to(vae_dtype), chunk=1, piece_frames=2,
                                clamp=False)
        flows = clip_flows(self.flow_model, hq) if self.flow_model is not None else (None, None)
        return self.loss(z_hat.float(), z_hq, video.float(), hq.float(), *flows)

    def train_step(self, batches=None) -> dict:
        """One optimizer step over ``batches`` (``accumulate`` pairs ``(lq, hq)``; default: this step's)."""
        cfg = self.cfg
        batches = list(self.micro_batches(self.step) if batches is None else batches)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict = {}
        ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        for j, (lq, hq) in enumerate(batches):
            # DDP: all-reduce the gradients once, with the last micro-batch's backward
            quiet = ddp and j < len(batches) - 1
            with self.model.no_sync() if quiet else contextlib.nullcontext():
                parts = self._losses(lq, hq)
                (parts["total"] / len(batches)).backward()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v.item() / len(batches)
        if self.cfg.sequence_parallel > 1 and not self._sum_sequence_parallel_gradients():
            # every rank sees the same reduced gradients, so every rank stops here together
            totals["grad_norm"] = float("nan")
        if cfg.grad_clip:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
        if not all(math.isfinite(v) for v in totals.values()):  # before the step: the weights stay finite
            raise FloatingPointError(f"step {self.step}: a non-finite loss or gradient {totals}")
        self.optimizer.step()
        self.step += 1
        return totals

    @torch.no_grad()
    def _sum_sequence_parallel_gradients(self, bucket_bytes: int = 25 * 2**20) -> bool:
        """Under sequence parallelism each rank's gradients come from its latent frames only: summed over
        the world they hold each group's whole gradient once per group, so the mean over the groups
        (the data-parallel replicas) is DDP's average. All-reduced in buckets of ~25 MB (DDP's size),
        not one flat copy of every gradient. Returns whether the reduced gradients are finite (the
        same answer on every rank: a NaN of one replica reaches all)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        finite = True
        i = 0
        while i < len(grads):
            j, size = i, 0
            while j < len(grads) and (j == i or size + grads[j].numel() * grads[j].element_size() <= bucket_bytes):
                size += grads[j].numel() * grads[j].element_size()
                j += 1
            group = grads[i:j]
            copied = len(group) > 1 or not group[0].is_contiguous()
            flat = torch.cat([g.flatten() for g in group]) if copied else group[0].view(-1)
            torch.distributed.all_reduce(flat)
            flat /= self.replicas
            finite = finite and bool(torch.isfinite(flat).all())
            if copied:
                offset = 0
                for g in group:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
            i = j
        return finite

    @torch.no_grad()
    def evaluate(self, step: int = 0) -> float:
        """The loss on ``step``'s micro-batches, without training (a fixed batch to watch the loss on)."""
        batches = list(self.micro_batches(step))
        return sum(self._losses(lq, hq)["total"].item() for lq, hq in batches) / len(batches)

    def run(self, steps: int | None = None) -> list[dict]:
        """Train to the end of the curriculum (or ``steps`` more steps); returns the logged records."""
        cfg = self.cfg
        end = cfg.steps if steps is None else min(cfg.steps, self.step + steps)
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="oasis-train", unit="step")
        # (under compile = "graphs" each count would compile the whole DiT anew: "auto" keeps every block)
        if cfg.activation_checkpointing == "auto" and cfg.compile != "graphs" and self.step < end and not self._fitted:
            self.fit_checkpointing()
            self._fitted = True
        start, clips = time.perf_counter(), 0
        try:
            batches = self._loader(self.step, end)
            while self.step < end:
                stage = cfg.stage(self.step)
                parts = self.train_step([next(batches) for _ in range(cfg.accumulate)])
                clips += cfg.batch * cfg.accumulate * self.replicas
                record = {"step": self.step, "stage": stage, **parts,
                          "clips_per_s": clips / max(time.perf_counter() - start, 1e-9)}
                self.history.append(record)
                if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step == end):
                    self._log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(stage=stage, loss=f"{parts['total']:.4f}")
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        return self.history

    # -- checkpoints -----------------------------------------------------------------------------------
    def save(self, path=None) -> Path:
        path = Path(path or Path(self.cfg.out) / f"step_{self.step}")
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            self.pipe.save_pretrained(path / "model")
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "random": _random_states(),
                     "config": {**dataclasses.asdict(self.cfg), "world": self.world,
                                "degradations": DEGRADE_VERSION}, "history": self.history}
            torch.save(state, path / "trainer.pt")
        if self.world > 1:
            torch.distributed.barrier()
        return path

    def load(self, path) -> None:
        """Continue from a ``step_N`` folder written by :meth:`save` (model, optimizer, step, random states).
        The frozen VAE is the one this trainer loaded (the folder's copy of it is the same)."""
        from .checkpoint import read_safetensors_file
        from .dit import WanDiT

        path = Path(path)
        state_file = path / "trainer.pt"
        if not state_file.is_file():
            raise ValueError(f"{path}: no trainer.pt (not a checkpoint written by oasis-train)")
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        saved = state.get("config", {})
        fixed = ("seed", "batch", "accumulate", "frames", "height", "width", "frame_stride", "stage1_steps",
                 "change_prob", "videos", "sequence_parallel", "degrade_on")
        older = {"sequence_parallel": 1, "degrade_on": "workers"}  # what runs saved before these settings did
        before = {k: saved.get(k, older.get(k)) for k in fixed}
        now = {k: getattr(self.cfg, k) for k in fixed}
        # where each run degraded: "auto" by the device it ran on
        before["degrade_on"] = self._degrade_place(before["degrade_on"], saved.get("device", self.cfg.device))
        now["degrade_on"] = self._degrade_place(now["degrade_on"])
        changed = [f"{k}: {before[k]!r} -> {now[k]!r}" for k in fixed if before[k] != now[k]]
        if saved.get("degradations", 1) != DEGRADE_VERSION:  # runs saved before the version was written: 1
            changed.append(f"the degradations' random draws: version {saved.get('degradations', 1)} -> "
                           f"{DEGRADE_VERSION} (this oasis makes other LQ clips for the same samples)")
        if saved.get("world", 1) != self.world:
            changed.append(f"world size: {saved.get('world', 1)} -> {self.world}")
        if changed:
            raise ValueError(f"{path}: resuming needs the run's data settings; changed: {'; '.join(changed)}")
        model = path / "model"
        # the run's routing goes on with it: its routing.json, or all heads global when it wrote none
        self.pipe.dit.set_routing(model / "routing.json" if (model / "routing.json").is_file() else None)
        self.pipe.dit.load_state_dict(WanDiT.from_pretrained(model, dtype=torch.float32, device=self.device).state_dict())
        extra = read_safetensors_file(model / "oasis.safetensors")
        self.pipe.projector.load_state_dict({"proj.weight": extra["projector.proj.weight"],
                                             "proj.bias": extra["projector.proj.bias"]})
        optimizer = state["optimizer"]
        for group in optimizer["param_groups"]:  # the fused AdamW this trainer runs, whatever wrote the
            group.update(fused=True, foreach=None)  # checkpoint (loading keeps the saved groups' flags)
        self.optimizer.load_state_dict(optimizer)
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        _set_random_states(state["random"])

    def _log(self, record: dict) -> None:
        out = Path(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = getattr(self, "_tb", None)
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = self._tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # TensorBoard is optional: the JSON lines hold the same numbers
                writer = self._tb = False
        if writer:
            for k, v in record.items():
                if k != "step":
                    writer.add_scalar(k, v, record["step"])


class _Restorer(torch.nn.Module):
    """LQ ``[B, 3, F, h, w]`` in [-1, 1] -> restored latents (eqs. 3-4): the trainable projector and DiT.
    The projector and the residual run in float32 as at inference (``OasisVSR.project``/``restore``);
    only the DiT under autocast (``autocast``: its dtype, or None)."""

    def __init__(self, pipe, autocast=None):
        super().__init__()
        self.projector, self.dit = pipe.projector, pipe.dit  # registered: DDP sees their parameters
        self.pipe, self.autocast = pipe, autocast

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        z_low = self.pipe.project(lq)
        with torch.autocast(z_low.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.pipe.restore(z_low)  # the residual stays float32: autocast leaves elementwise ops


def _signed(lq: torch.Tensor, hq: torch.Tensor):
    """A pair in [0, 1] -> in [-1, 1], as the model takes it."""
    return lq * 2 - 1, hq * 2 - 1


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _random_states() -> dict:
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_random_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


CALIBRATION_SAMPLES = 2**30  # calibration reads sample numbers from here on, apart from training's

DEMO = dict(demo=True, device="cpu", frames=5, height=32, width=64, stage1_steps=6, stage2_steps=6, batch=1,
            lr=3e-4, workers=0, save_every=1000, log_every=1, activation_checkpointing=False)


def _check_out(out: Path, resume) -> None:
    """The output folder, before any work: made if missing (its parents too), writable, and holding no
    earlier run unless this one resumes it (two runs' logs and checkpoints would mix)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out {str(out)!r}: the folder cannot be made ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"out {str(out)!r}: the folder is not writable")
    if resume is None:
        earlier = sorted(p.name for p in out.iterdir() if p.name == "log.jsonl" or (p.is_dir() and p.name.startswith("step_")))
        if earlier:
            raise ValueError(f"out {str(out)!r} holds an earlier run ({', '.join(earlier[:3])}"
                             f"{', ...' if len(earlier) > 3 else ''}): continue it with --resume {out}/step_N, or "
                             f"give another out")


def _unused_folder(path: str) -> str:
    """``path``, or ``path-2``, ``path-3``... the first that holds no run."""
    n, candidate = 1, path
    while Path(candidate).is_dir() and any(Path(candidate).iterdir()):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="oasis-train", description="Train OASIS (progressive two-stage curriculum).")
    p.add_argument("config", nargs="?", help="a .toml / .yaml / .json file of TrainConfig's settings")
    p.add_argument("--demo", action="store_true", help="a tiny random model on synthetic clips (CPU, 12 steps): "
                                                       "shows the loop running and the loss going down")
    p.add_argument("--resume", help="a step_N folder of an earlier run")
    p.add_argument("--out", help="override the config's output folder")
    args = p.parse_args(argv)
    try:
        if args.demo == bool(args.config):
            raise ValueError("give a config file or --demo (one of them)")
        if args.demo:
            # the demo's own folder: a fresh one each time unless --out names one
            cfg = TrainConfig(**DEMO, out=args.out or (args.resume and str(Path(args.resume).parent))
                              or _unused_folder("runs/oasis-demo"))
        else:
            cfg = TrainConfig.from_file(args.config)
            if args.out:
                cfg.out = args.out
        trainer = Trainer(cfg, resume=args.resume)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"oasis-train: error: {exc}", file=sys.stderr)
        return 2
    try:
        # every rank evaluates: under sequence parallelism the DiT's calls are collective
        before = trainer.evaluate(0) if cfg.demo else None
        history = trainer.run()
        after = trainer.evaluate(0) if cfg.demo else None
        if trainer.rank == 0:
            if cfg.demo:
                print(f"oasis-train: {len(history)} steps; the loss on a fixed batch {before:.4f} -> {after:.4f} "
                      f"(a tiny random model on synthetic clips: the loop, not a result); checkpoints in {cfg.out}")
            else:
                print(f"oasis-train: {len(history)} steps, last loss {history[-1]['total']:.4f}; checkpoints in "
                      f"{cfg.out}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
