"""Training clips: HQ crops from a folder of videos (or a synthetic source), paired with their LQ
degradation (:mod:`oasis.degrade`).

Every sample is a pure function of ``(seed, index)``: which video, which frames, which crop and
which degradation draw all come from a generator seeded with both. The trainer numbers its samples
by step, micro-batch, rank and position (:meth:`oasis.train.Trainer.samples`), so it resumes exactly
from its step alone and two runs with one seed see the same data (with the same number of loader
workers: workers run torch single-threaded, and another summation order can move a degraded value
across an 8-bit step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .degrade import Degradation
from .video import VideoError, probe_video, synthetic_clip

__all__ = ["ClipSpec", "VideoFolder", "SyntheticVideos", "PairDataset", "HQClips", "VIDEO_EXTENSIONS"]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v")


@dataclass(frozen=True)
class ClipSpec:
    """The HQ crop: ``frames`` frames ``stride`` apart, ``height x width`` pixels (the paper: 17 at 320x640)."""

    frames: int = 17
    height: int = 320
    width: int = 640
    stride: int = 1

    def __post_init__(self):
        for name in ("frames", "height", "width", "stride"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"clip {name} must be a positive int, got {v!r}")
        if (self.frames - 1) % 4:
            raise ValueError(f"clip frames must be 4k+1 (the VAE's grid), got {self.frames}")
        if self.height % 32 or self.width % 32:
            raise ValueError(f"clip height and width must be multiples of 32 (x4 LQ on the latent grid), got "
                             f"{self.height}x{self.width}")

    @property
    def span(self) -> int:
        """Source frames one clip covers."""
        return 1 + (self.frames - 1) * self.stride


def _count_frames(path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**63, int(index)])


class VideoFolder:
    """Random HQ crops from the videos under ``root`` (searched recursively), as float ``[3, F, H, W]``
    in [0, 1]. Videos shorter or smaller than one crop are left out (and counted in ``skipped``)."""

    def __init__(self, root, spec: ClipSpec = ClipSpec(), seed: int = 0):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"{root}: no such folder of training videos")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"{root}: no videos ({', '.join(VIDEO_EXTENSIONS)})")
        self.spec, self.seed, self.videos, self.skipped = spec, seed, [], []
        for f in files:
            try:
                info = probe_video(f)
            except VideoError as exc:
                self.skipped.append((f, str(exc)))
                continue
            if info.num_frames is None:  # Matroska/WebM declare none: count the stream's packets (no decoding)
                info = dataclasses.replace(info, num_frames=_count_frames(f))
            if info.height < spec.height or info.width < spec.width:
                self.skipped.append((f, f"{info.width}x{info.height} is smaller than the crop"))
            elif info.num_frames < spec.span:
                self.skipped.append((f, f"{info.num_frames} frames, fewer than the crop's {spec.span}"))
            else:
                self.videos.append((f, info))
        if not self.videos:
            reasons = "; ".join(f"{p.name}: {r}" for p, r in self.skipped[:5])
            raise ValueError(f"{root}: none of {len(files)} videos holds a {spec.span}-frame "
                             f"{spec.width}x{spec.height} crop ({reasons})")

    def __len__(self) -> int:
        return len(self.videos)

    def clip(self, index: int) -> torch.Tensor:
        import av

        rng = _rng(self.seed, index)
        path, info = self.videos[int(rng.integers(len(self.videos)))]
        spec = self.spec
        start = int(rng.integers(0, info.num_frames - spec.span + 1))
        top = int(rng.integers(0, info.height - spec.height + 1))
        left = int(rng.integers(0, info.width - spec.width + 1))
        wanted = set(range(start, start + spec.span, spec.stride))
        frames = []
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):  # sequential: exact frame indices
                if i in wanted:
                    frames.append(frame.to_ndarray(format="rgb24")[top:top + spec.height, left:left + spec.width])
                if len(frames) == spec.frames:
                    break
        if len(frames) < spec.frames:
            raise VideoError(f"{path}: decoded {len(frames)} of the {spec.frames} frames from frame {start}")
        x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)
        return x.float() / 255.0


class SyntheticVideos:
    """Synthetic HQ clips (:func:`oasis.video.synthetic_clip`: moving discs, rectangles, textures) for
    tests and demos; ``index`` picks the clip."""

    def __init__(self, spec: ClipSpec = ClipSpec(), seed: int = 0):
        self.spec, self.seed = spec, seed

    def __len__(self) -> int:
        return 2**31 - 1

    def clip(self, index: int) -> torch.Tensor:
        s = self.spec
        seed = int(_rng(self.seed, index).integers(2**62))
        x = synthetic_clip(s.span, s.height, s.width, seed=seed)[::s.stride]
        return x.permute(3, 0, 1, 2).float() / 255.0


class PairDataset(torch.utils.data.Dataset):
    """``(lq, hq)`` pairs: HQ ``[3, F, H, W]`` and its degradation ``[3, F, H/4, W/4]``, both in [-1, 1].
    Indexable by any non-negative int (the trainer's sample number)."""

    def __init__(self, source, degradation: Degradation, mode: str = "consistent", seed: int = 0):
        self.source, self.degradation, self.mode, self.seed = source, degradation, mode, seed

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, index: int):
        hq = self.source.clip(index)
        return self.degrade(hq, index) * 2 - 1, hq * 2 - 1

    def degrade(self, hq: torch.Tensor, index: int) -> torch.Tensor:
        """Sample ``index``'s LQ clip ``[3, F, H/4, W/4]`` in [0, 1] from its HQ clip ``[3, F, H, W]`` in
        [0, 1], on ``hq``'s device (blur, resize and noise there; JPEG and the codec on the CPU)."""
        seed = int(_rng(self.seed + 1, index).integers(2**62))
        return self.degradation(hq.transpose(0, 1), seed, self.mode).transpose(0, 1)

    def hq_only(self) -> "HQClips":
        """The same samples without their degradation: ``(index, hq [3, F, H, W] in [0, 1])``, for a
        trainer that degrades them itself on its device (:meth:`degrade`)."""
        return HQClips(self)


class HQClips(torch.utils.data.Dataset):
    """``(index, HQ clip in [0, 1])`` of a :class:`PairDataset` (see :meth:`PairDataset.hq_only`)."""

    def __init__(self, pairs: PairDataset):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        return index, self.pairs.source.clip(index)
