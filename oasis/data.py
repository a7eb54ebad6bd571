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

import concurrent.futures
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .degrade import Degradation
from .jpeg import over_255
from .video import VIDEO_EXTENSIONS, VideoError, probe_video, synthetic_clip

__all__ = ["ClipSpec", "VideoFolder", "SyntheticVideos", "PairDataset", "HQClips", "WorkerDevicePairs",
           "DeviceDegrader", "PendingBatch", "VIDEO_EXTENSIONS"]



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
    in [0, 1]. A folder of images is one video too, its frames in natural order (``oasis.images``: the
    layout of REDS and of frames exported from footage). Videos shorter or smaller than one crop are left
    out (and counted in ``skipped``)."""

    def __init__(self, root, spec: ClipSpec = ClipSpec(), seed: int = 0):
        from .images import IMAGE_SUFFIXES, ImageFrames

        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"{root}: no such folder of training videos")
        # hidden files and folders are no training videos (.cache/thumbs/*.png, ._x.mp4)
        paths = sorted(p for p in root.rglob("*")
                       if not any(part.startswith(".") for part in p.relative_to(root).parts))
        files = [p for p in paths if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()]
        image_dirs = sorted({p.parent for p in paths if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()})
        if not files and not image_dirs:
            raise ValueError(f"{root}: no videos ({', '.join(VIDEO_EXTENSIONS)}) or folders of images")
        self.spec, self.seed, self.videos, self.skipped = spec, seed, [], []
        self._sequences = {}  # a folder of images -> its ImageFrames (the file list; read one thread per worker)
        for f in sorted(files + image_dirs):
            try:
                if f.is_dir():
                    self._sequences[f] = ImageFrames(f, threads=1)
                    info = self._sequences[f].info
                else:
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
            raise ValueError(f"{root}: none of {len(files) + len(image_dirs)} videos holds a {spec.span}-frame "
                             f"{spec.width}x{spec.height} crop ({reasons})")

    def __len__(self) -> int:
        return len(self.videos)

    def clip(self, index: int) -> torch.Tensor:
        """Crop ``index``: float ``[3, F, H, W]`` in [0, 1]."""
        return _unit(self.frames(index))

    def frames(self, index: int) -> torch.Tensor:
        """Crop ``index`` as decoded: uint8 ``[3, F, H, W]`` (a quarter of the float clip's bytes through the
        loader's workers and to a GPU; :func:`_unit` makes it the float clip there, the same numbers).

        The decoder starts at the last keyframe at or before the crop's first frame (found in the video's
        packet index, read once per video and process without decoding), not at the video's start, and
        frames are identified by their presentation times; a video whose packets lack them, or whose
        seek lands past the crop, is decoded from its start, as :meth:`frames_from_start` does."""
        path, start, top, left = self._draw(index)
        if path in self._sequences:  # a folder of images: the crop's files alone
            frames = self._sequences[path].read(range(start, start + self.spec.span, self.spec.stride))
            # a copy of the crop: a view would keep the whole frames alive in the loader's queue
            return frames[:, top:top + self.spec.height, left:left + self.spec.width].permute(3, 0, 1, 2).contiguous()
        frames = self._decode_from_keyframe(path, start, top, left)
        return frames if frames is not None else self._decode(path, start, top, left)

    def frames_from_start(self, index: int) -> torch.Tensor:
        """Crop ``index`` by decoding its video from the first frame (the reference for :meth:`frames`)."""
        if self._draw(index)[0] in self._sequences:
            return self.frames(index)
        return self._decode(*self._draw(index))

    def _draw(self, index: int):
        rng = _rng(self.seed, index)
        path, info = self.videos[int(rng.integers(len(self.videos)))]
        spec = self.spec
        start = int(rng.integers(0, info.num_frames - spec.span + 1))
        top = int(rng.integers(0, info.height - spec.height + 1))
        left = int(rng.integers(0, info.width - spec.width + 1))
        # a video that decodes to fewer frames than its container counts: the crop ends at its last frame
        decodable = self.__dict__.get("_decodable", {}).get(path)
        return path, start if decodable is None else min(start, decodable - spec.span), top, left

    def _crop(self, frame, top: int, left: int) -> np.ndarray:
        return frame.to_ndarray(format="rgb24")[top:top + self.spec.height, left:left + self.spec.width]

    def _stack(self, frames: list, path, start: int) -> torch.Tensor:
        if len(frames) < self.spec.frames:
            raise VideoError(f"{path}: decoded {len(frames)} of the {self.spec.frames} frames from frame {start}")
        return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)

    def _decode(self, path, start: int, top: int, left: int) -> torch.Tensor:
        import av

        wanted = set(range(start, start + self.spec.span, self.spec.stride))
        frames, decoded = [], 0
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):  # sequential: exact frame indices
                decoded = i + 1
                if i in wanted:
                    frames.append(self._crop(frame, top, left))
                if len(frames) == self.spec.frames:
                    break
        if len(frames) < self.spec.frames and self.spec.span <= decoded < start + self.spec.span:
            # the decoder gave fewer frames than the container counts (an edit list trimming the start,
            # leading pictures without their references): remembered, and the crop moved to end at the last
            self.__dict__.setdefault("_decodable", {})[path] = decoded
            return self._decode(path, decoded - self.spec.span, top, left)
        return self._stack(frames, path, start)

    def _packet_index(self, path):
        """``(presentation times in order, keyframe times)`` of the video stream's packets, or None where the
        i-th packet time need not be the i-th decoded frame (then frames are counted from the start): a packet
        without a time, two with one time, a packet marked to be discarded (an edit list trimming the start),
        a stream that does not open on a keyframe, or pictures shown before the first keyframe (leading
        pictures of an open group whose references were cut off): a decoder drops such frames."""
        cache = self.__dict__.setdefault("_packet_indexes", {})
        if path not in cache:
            import av

            times, keys, ok = [], [], True
            with av.open(str(path)) as container:
                for packet in container.demux(video=0):
                    if not packet.size:
                        continue
                    if packet.pts is None or getattr(packet, "is_discard", False) or (not times and not packet.is_keyframe):
                        ok = False
                        break
                    times.append(packet.pts)
                    if packet.is_keyframe:
                        keys.append(packet.pts)
            ok = ok and bool(keys) and len(set(times)) == len(times) and min(times) >= keys[0]
            cache[path] = (sorted(times), sorted(keys)) if ok else None
        return cache[path]

    def _decode_from_keyframe(self, path, start: int, top: int, left: int):
        import bisect

        import av

        index = self._packet_index(path)
        if index is None or start + self.spec.span > len(index[0]):
            return None
        times, keys = index
        first = times[start]
        k = bisect.bisect_right(keys, first) - 1
        if k <= 0:  # the crop starts in the first keyframe's group: nothing to skip
            return None
        number = {t: i for i, t in enumerate(times)}
        wanted = set(range(start, start + self.spec.span, self.spec.stride))
        frames = []
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            container.seek(keys[k], stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                i = number.get(frame.pts)
                if i is None or (not frames and i > start):  # a time not in the index, or a seek past the crop
                    return None
                if i in wanted:
                    frames.append(self._crop(frame, top, left))
                if len(frames) == self.spec.frames:
                    break
        # a wanted time the decoder did not give: its numbering is not the index's
        return self._stack(frames, path, start) if len(frames) == self.spec.frames else None


class SyntheticVideos:
    """Synthetic HQ clips (:func:`oasis.video.synthetic_clip`: moving discs, rectangles, textures) for
    tests and demos; ``index`` picks the clip."""

    def __init__(self, spec: ClipSpec = ClipSpec(), seed: int = 0):
        self.spec, self.seed = spec, seed

    def __len__(self) -> int:
        return 2**31 - 1

    def clip(self, index: int) -> torch.Tensor:
        """Clip ``index``: float ``[3, F, H, W]`` in [0, 1]."""
        return _unit(self.frames(index))

    def frames(self, index: int) -> torch.Tensor:
        """Clip ``index`` as uint8 ``[3, F, H, W]``."""
        s = self.spec
        seed = int(_rng(self.seed, index).integers(2**62))
        return synthetic_clip(s.span, s.height, s.width, seed=seed)[::s.stride].permute(3, 0, 1, 2)


def _unit(clip: torch.Tensor) -> torch.Tensor:
    """uint8 frames -> float32 in [0, 1], the same numbers on any device (:func:`oasis.jpeg.over_255`); float
    clips pass as they are."""
    return over_255(clip.float()) if clip.dtype == torch.uint8 else clip


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
        [0, 1], on ``hq``'s device (blur, resize, noise and JPEG there; the codec on the CPU)."""
        seed = int(_rng(self.seed + 1, index).integers(2**62))
        return self.degradation(hq.transpose(0, 1), seed, self.mode).transpose(0, 1)

    def hq_only(self) -> "HQClips":
        """The same samples without their degradation: ``(index, hq [3, F, H, W])`` (uint8 from our sources),
        for a trainer that degrades them itself on its device (:class:`DeviceDegrader`)."""
        return HQClips(self)

    def on_device_in_workers(self, device) -> "WorkerDevicePairs":
        """The same pairs, degraded by whichever process loads them (the loader's workers) on ``device``:
        ``(lq, hq)`` with LQ in [0, 1] on the CPU and HQ as the source gives it (see
        :class:`WorkerDevicePairs`)."""
        return WorkerDevicePairs(self, device)


class WorkerDevicePairs(torch.utils.data.Dataset):
    """``(lq [3, F, H/4, W/4] float32 in [0, 1], hq [3, F, H, W])`` of a :class:`PairDataset`, both on the
    CPU, the LQ clip degraded on ``device`` by the process that loads the sample: with a DataLoader's
    workers, each worker degrades its own clips on the GPU (blur, resize, noise and JPEG there, the codec
    on its CPU), so the degradations' Python runs in as many interpreters as there are workers instead
    of the trainer's one (:class:`DeviceDegrader`). HQ is uint8 from sources with ``frames`` (ours), else
    float in [0, 1]. The LQ clips are :meth:`PairDataset.degrade`'s on that device, bit for bit.

    Workers that use CUDA must be started with ``spawn`` (a forked CUDA context does not work), and each
    holds a CUDA context of its own on the device (~0.5 GB)."""

    def __init__(self, pairs: PairDataset, device):
        self.pairs = pairs
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" in a spawned worker would be GPU 0
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = str(device)  # a string pickles to spawned workers as it is

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        hq = _source_frames(self.pairs.source, index)
        with torch.no_grad():
            lq = self.pairs.degrade(_unit(hq.to(self.device)), index)
        return lq.cpu(), hq


class HQClips(torch.utils.data.Dataset):
    """``(index, HQ clip)`` of a :class:`PairDataset` (see :meth:`PairDataset.hq_only`): uint8 ``[3, F, H,
    W]`` from sources with ``frames`` (four times fewer bytes through the workers' shared memory, the
    pinned buffers and the copy to the GPU), else float in [0, 1]."""

    def __init__(self, pairs: PairDataset):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        return index, _source_frames(self.pairs.source, index)


def _source_frames(source, index: int) -> torch.Tensor:
    """A source's clip as it has it: uint8 where the source offers ``frames`` (ours do), else its float
    ``clip``; :class:`DeviceDegrader` takes either."""
    frames = getattr(source, "frames", None)
    return frames(index) if frames is not None else source.clip(index)


class DeviceDegrader:
    """Degrades HQ clips of a :class:`PairDataset` on ``device`` in ``threads`` background threads, so
    that the next micro-batches' degradations run while the current one trains.

    Blur, resize, noise and (by default, ``DegradeConfig.jpeg_impl``) JPEG run on the device; the video
    codec on the CPU between them (PyAV releases the GIL while it codes). On CUDA each thread queues its work on a stream of its own
    and hands its clips over with an event, so the caller's stream waits for them and nothing else.
    The pairs are the ones :meth:`PairDataset.degrade` makes, clip for clip, in any thread order (each
    clip's draws come from its own seeded generators). ``threads = 0`` degrades in the caller's thread,
    at :meth:`submit`.
    """

    def __init__(self, device, threads: int):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads must be a non-negative int, got {threads!r}")
        import threading

        self.device = torch.device(device)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="oasis-degrade") \
            if threads else None
        self._local = threading.local()

    def submit(self, pairs: PairDataset, numbers, hq: torch.Tensor) -> "PendingBatch":
        """Start degrading samples ``numbers`` (ints) whose HQ clips are ``hq [B, 3, F, H, W]``, uint8 or float
        in [0, 1] (on the CPU, pinned for an asynchronous copy, or already on the device)."""
        numbers = [int(n) for n in numbers]
        if not isinstance(hq, torch.Tensor) or hq.dim() != 5 or hq.shape[0] != len(numbers):
            raise ValueError(f"hq must be [B, 3, F, H, W] with B = {len(numbers)} samples, got "
                             f"{tuple(getattr(hq, 'shape', ()))}")
        if hq.dtype != torch.uint8 and not hq.is_floating_point():
            raise ValueError(f"hq must be uint8 or float in [0, 1], got {hq.dtype}")
        jobs = [(pairs, n, hq[i]) for i, n in enumerate(numbers)]
        if self._pool is None:
            return PendingBatch(self.device, [_done(self._one(*job)) for job in jobs])
        return PendingBatch(self.device, [self._pool.submit(self._one, *job) for job in jobs])

    def _one(self, pairs: PairDataset, number: int, hq: torch.Tensor):
        if self.device.type != "cuda" or self._pool is None:
            hq = _unit(hq.to(self.device, non_blocking=True))
            return pairs.degrade(hq, number), hq, None
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            hq = _unit(hq.to(self.device, non_blocking=True))
            lq = pairs.degrade(hq, number)
            done = torch.cuda.Event()
            done.record(stream)
        return lq, hq, done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PendingBatch:
    """A micro-batch :class:`DeviceDegrader` is degrading; :meth:`result` waits for it."""

    def __init__(self, device: torch.device, clips: list):
        self.device, self._clips = device, clips

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lq [B, 3, F, H/4, W/4], hq [B, 3, F, H, W])`` in [0, 1] on the device, ready for the current
        stream (on CUDA it waits for the threads' streams on the device, not on the host)."""
        lqs, hqs = [], []
        current = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for clip in self._clips:
            lq, hq, done = clip.result()
            if done is not None:
                current.wait_event(done)
                # made on another stream: the allocator must not reuse them before the current stream is done
                lq.record_stream(current)
                hq.record_stream(current)
            lqs.append(lq)
            hqs.append(hq)
        return torch.stack(lqs), torch.stack(hqs)


def _done(value) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    future.set_result(value)
    return future
