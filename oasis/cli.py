"""``oasis-vsr``: super-resolve a video file or a folder of frames x4 with an OASIS checkpoint.

Every argument, the input (a video decoded once through, or every image's header), the checkpoint
folder, the output (its type, encoder and folder: a scratch write) and the memory plan are checked
before any model work starts; a bad one, and any later failure of the run's own (a full disk, out of
memory), ends the program with one line on stderr and exit code 2. The input is read a chunk at a time
(a long video never sits in memory whole); a video is written beside the output and renamed to it once
complete, and each image likewise.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import socket
import sys
import time
import warnings
from pathlib import Path

EPILOG = """\
examples:
  oasis-vsr clip.mp4 -o clip_x4.mp4 --checkpoint ckpt/
  oasis-vsr Vid4/calendar/ -o out/calendar/ --checkpoint ckpt/   # a folder of frames -> the same names, PNG
  oasis-vsr Vid4/ -o out/ --checkpoint ckpt/   # a folder of clips: one model, out/calendar/, out/city/, ...
  oasis-vsr frames/%05d.png -o clip_x4.mp4 --fps 30 --checkpoint ckpt/
  oasis-vsr long.mp4 -o long_x4.mp4 --checkpoint ckpt/ --chunk-frames 33 --memory-budget 40
  oasis-vsr --demo -o demo.mp4        # tiny random-weight model on a synthetic clip (CPU, untrained)
  oasis-vsr long.mp4 -o long_x4.mp4 --checkpoint ckpt/ --gpus 4   # the DiT's tokens split over 4 GPUs
  torchrun --nproc-per-node 4 -m oasis.cli long.mp4 -o long_x4.mp4 --checkpoint ckpt/   # the same

A checkpoint folder holds oasis.json + oasis.safetensors (projector, context), transformer/ (the
Wan2.1 DiT in diffusers' or Wan2.1's layout), vae/ or Wan2.1_VAE.pth, and optionally routing.json.
Nothing is downloaded.
"""

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "fp32": "float32", "float32": "float32"}


def _chunk_frames(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer 4k+1 (5, 9, 17, 33, ...), got {text!r}") from None
    if n < 1 or (n - 1) % 4:
        raise argparse.ArgumentTypeError(f"must be 4k+1 (5, 9, 17, 33, ...), got {n}")
    return n


def _rate(text: str):
    from fractions import Fraction

    try:
        rate = Fraction(text)
    except (ValueError, ZeroDivisionError):
        rate = None
    if rate is None or rate <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive rate (30, 29.97, 30000/1001), got {text!r}")
    return rate


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oasis-vsr", description="One-step x4 video super-resolution (OASIS on Wan2.1, routed attention).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="*",
                   help="the low-quality video (any format PyAV/FFmpeg reads), or its frames: a folder of images "
                        "(natural order) or a numbered pattern such as frames/%%05d.png. Several, or a folder of "
                        "clips (videos, and folders of frames: a test set), are restored in turn by one model "
                        "into the output folder, each under its own name")
    p.add_argument("-o", "--output", required=True,
                   help="where to write the x4 video (its folder must exist), or its frames: a folder (an "
                        "existing one, or a name ending in /, made; PNG, named as the input's images or "
                        "00000001.png...) or a numbered pattern such as out/%%05d.png (.png .jpg .bmp .tif .webp). "
                        "For several clips, or a folder of clips: the folder that holds one output per clip")
    p.add_argument("--fps", type=_rate,
                   help="the frame rate of an input folder of images (default 25); a video keeps its own")
    p.add_argument("--checkpoint", help="OASIS checkpoint folder (see below)")
    p.add_argument("--routing", help="routing file (oasis-route output) overriding the checkpoint's routing.json; "
                                     "'none' runs every head global")
    p.add_argument("--chunk-frames", type=_chunk_frames,
                   help="frames restored together (4k+1); longer videos run in overlapping chunks "
                        "(default: the most that fits the memory budget, at most 81)")
    p.add_argument("--tile", type=_positive(int),
                   help="restore frames in overlapping square tiles of this many input pixels (multiple of 4; "
                        "default: tiles only when a whole frame does not fit the memory budget)")
    p.add_argument("--memory-budget", type=_positive(float), metavar="GiB",
                   help="device memory to plan for, weights included (default: 90%% of the free GPU memory)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--crf", type=float, default=18,
                   help="video encoder quality: the constant rate factor of libx264/libx265 (0..51, 0 lossless "
                        "for libx264), VP9 and AV1 (0..63); lower is better, default 18. Images are lossless PNG "
                        "unless the pattern says otherwise")
    p.add_argument("--bits", type=int, choices=[8, 10, 16],
                   help="bits per colour of the output: for a video 10 keeps a 10-bit (HDR) source's gradations, "
                        "4:2:0 10-bit in HEVC for .mkv, AV1 for .webm, H.264 High 10 otherwise; 8 writes H.264 "
                        "(VP9 for .webm); images take 8 or 16 (PNG, TIFF) (default: 10 for a video, 16 for PNG or "
                        "TIFF images, when the input has more than 8 bits per colour, else 8)")
    p.add_argument("--max-frames", type=_positive(int), help="restore only the first N frames")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: frames already written as images (each written whole) are "
                        "kept and the run starts at the first missing one's chunk; an output video that exists is "
                        "kept (a video appears only once complete)")
    p.add_argument("--no-audio", action="store_true",
                   help="leave the input's sound out (default: copied, cut where the restored frames end; "
                        "re-encoded to AAC, or Opus for WebM, where the output's container cannot hold its codec)")
    p.add_argument("--vae", choices=["oasis", "diffusers"], default="oasis",
                   help="decoder: ours (default) or diffusers' AutoencoderKLWan (the reference; same numbers)")
    p.add_argument("--no-compile", action="store_true",
                   help="run the DiT eagerly (default on CUDA: torch.compile of its blocks, ~1 min on the first "
                        "clip size, ~1.6x faster after)")
    p.add_argument("--gpus", type=_positive(int), default=1,
                   help="processes, one GPU each, that split the DiT's tokens by latent frames (sequence "
                        "parallel over torch.distributed: NCCL, or gloo with --device cpu); each chunk needs at "
                        "least this many latent frames. Under torchrun the world is torchrun's (default 1)")
    p.add_argument("--demo", action="store_true",
                   help="run a tiny random-weight model on a synthetic clip: shows the pipeline, restores nothing")
    return p


class _Exit(Exception):
    """A clean one-line failure (exit code 2)."""


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise _Exit(f"--device {name!r} is not a torch device (cuda, cuda:0, cpu)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _Exit(f"--device {name}: CUDA is not available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise _Exit(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise _Exit(f"--device {name}: only cuda and cpu are supported")
    return device


def _images_out(args) -> bool:
    from .images import is_image_sequence

    return is_image_sequence(args.output, output=True)


def _images_in(args) -> bool:
    from .images import is_image_sequence

    return bool(args.input) and is_image_sequence(args.input)


def _clip_folder_members(path) -> list[Path] | None:
    """The clips of a folder of clips (its video files and its folders of frames, in natural order), or None
    where ``path`` is no such folder (a file, a folder of frames itself, or one holding neither)."""
    from .images import _frame_files, _natural_key
    from .video import VIDEO_EXTENSIONS

    folder = Path(path)
    if not folder.is_dir() or _frame_files(folder):
        return None
    members = [f for f in folder.iterdir() if not f.name.startswith(".") and (
        (f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS) or (f.is_dir() and _frame_files(f)))]
    return sorted(members, key=lambda f: _natural_key(f.name)) or None


def _clips(args) -> list:
    """One set of arguments per clip to restore: ``args`` itself for one input; for several, or a folder of
    clips, each input with its output in the output folder: a video under its file name, frames (a folder,
    or a numbered pattern's folder) in a folder of the clip's name."""
    import copy

    from .images import is_image_sequence, is_numbered

    inputs = list(args.input or [])
    members = _clip_folder_members(inputs[0]) if len(inputs) == 1 else None
    if len(inputs) <= 1 and members is None:
        one = copy.copy(args)
        one.input, one.batch = (inputs[0] if inputs else None), False
        return [one]
    if args.demo:
        raise _Exit("--demo takes no input video or checkpoint (it makes both up)")
    if members is None:
        folder = next((i for i in inputs if _clip_folder_members(i) is not None), None)
        if folder is not None:
            raise _Exit(f"{folder} is a folder of clips: give it alone (or its clips one by one)")
    else:
        skipped = [f.name for f in Path(inputs[0]).iterdir() if f.is_dir() and not f.name.startswith(".")
                   and f not in members]
        if skipped:
            print(f"oasis-vsr: note: {len(skipped)} folders in {inputs[0]} hold no frames and are skipped "
                  f"({', '.join(sorted(skipped)[:3])}{', ...' if len(skipped) > 3 else ''})", file=sys.stderr)
    if members is not None and os.path.realpath(args.output) == os.path.realpath(inputs[0]):
        raise _Exit(f"{args.output} is the folder of clips itself: write the clips elsewhere (its outputs would be "
                    f"taken for clips by the next run)")
    inputs = members if members is not None else [Path(i) for i in inputs]
    if not is_image_sequence(args.output, output=True) or is_numbered(args.output):
        raise _Exit(f"{len(inputs)} clips are written into a folder: give -o an existing folder or one ending in / "
                    f"(not {args.output!r})")
    clips, names = [], {}
    for source in inputs:
        clip = copy.copy(args)
        clip.input, clip.batch = str(source), True
        frames = is_image_sequence(source)
        name = (source.parent.name if is_numbered(source) else source.name) if frames else source.name
        name = name.replace("%", "_")  # a name, never a numbered pattern
        if name in names:
            raise _Exit(f"{source} and {names[name]} would both be written to {name!r} in {args.output}")
        names[name] = source
        clip.output = os.path.join(args.output, name, "") if frames else os.path.join(args.output, name)
        if os.path.exists(clip.output) and os.path.realpath(clip.output) == os.path.realpath(source):
            raise _Exit(f"{source}: its output would be the clip itself ({clip.output}); write the clips elsewhere")
        clips.append(clip)
    return clips


def _image_input(args):
    """The input folder or pattern of images, opened once per run (its headers read; kept on ``args``)."""
    from .images import ImageFrames

    if getattr(args, "_image_frames", None) is None:
        args._image_frames = ImageFrames(args.input, fps=args.fps, max_frames=args.max_frames)
    return args._image_frames


def _deep_image_input(args):
    """The same input read as 16-bit frames (for a 10-bit video or 16-bit images)."""
    from .images import ImageFrames

    return ImageFrames(args.input, fps=args.fps, max_frames=args.max_frames, bits=16)


def _input_info(args):
    """The input's metadata (an image sequence's from its headers; a video's from its container, its frame
    count where the container says it) without decoding it."""
    from .video import probe_video

    if _images_in(args):
        return _image_input(args).info
    return probe_video(args.input)  # raises VideoError for a missing or unreadable file


def _image_writer(args, width: int, height: int):
    """The image output: frames of an image input keep their names in a folder (as PNG) and their numbers
    in a pattern, so restored frames line up with their ground truth; others are numbered from 1."""
    from .images import ImageWriter, is_numbered

    names, start = None, 1
    if _images_in(args):
        frames = _image_input(args)
        if not is_numbered(args.output):
            names = [f.stem + ".png" for f in frames.files]
            names = names if len(set(names)) == len(names) else None
        elif frames.first_number is not None:
            start = frames.first_number
    return ImageWriter(args.output, width, height, names=names, start=start)


def _deep_images_out(args) -> bool:
    """Whether the image output's format holds 16 bits per colour (a folder's frames are PNG)."""
    from .images import DEEP_SUFFIXES, is_numbered

    return not is_numbered(args.output) or Path(args.output).suffix.lower() in DEEP_SUFFIXES


def _image_bits(args, source_bits: int) -> int:
    """The image output's bits per colour (``--bits``, else 16 for a deeper source where the format holds it)."""
    return args.bits or (16 if source_bits > 8 and _deep_images_out(args) else 8)


def _encoding(args, source_bits: int) -> dict:
    """The output video's bits per colour, encoder and pixel format (``--bits``, else the source's depth)."""
    import av

    bits = args.bits or (10 if source_bits > 8 else 8)
    if bits == 8:
        return {"bits": 8, "codec": None, "pix_fmt": "yuv420p"}
    suffix = Path(args.output).suffix.lower()
    # HEVC is what phones record 10-bit video in and play, but FFmpeg's MP4 muxer fails at random on
    # libx265's headers in this PyAV (6-85% of 60 two-frame files, at the first packet or the flush;
    # Matroska never): HEVC in .mkv, H.264 High 10 elsewhere; this PyAV's libvpx-vp9 encodes 8 bits only
    codecs = {".webm": ["libsvtav1", "libaom-av1"], ".mkv": ["libx265", "libx264"]}.get(suffix, ["libx264"])
    codec = next((c for c in codecs if c in av.codecs_available), None)
    if codec is None:
        raise _Exit(f"--bits 10: this PyAV build has no 10-bit encoder for {suffix or 'this file type'} "
                    f"({' or '.join(codecs)}); give --bits 8")
    return {"bits": 10, "codec": codec, "pix_fmt": "yuv420p10le"}


def _check_args(args) -> None:
    """Everything that can be checked without loading a model."""
    from .images import IMAGE_SUFFIXES
    from .video import check_writable

    if not args.output:
        raise _Exit("no output (-o is empty)")
    out = Path(args.output)
    images_out = _images_out(args)
    if not images_out and re.search(r"%0?\d*d", out.name) and not os.path.lexists(out):
        raise _Exit(f"output {args.output!r}: numbered frames are written as {' '.join(IMAGE_SUFFIXES)} images, "
                    f"not {out.suffix or 'without a file type'}")
    if not images_out and not out.suffix:
        raise _Exit(f"output {args.output!r} has no file type: give a video (out.mp4) or, for images, a folder "
                    f"ending in / (out/) or a numbered pattern (out/%05d.png)")
    if not images_out and out.suffix.lower() in IMAGE_SUFFIXES:
        raise _Exit(f"output {args.output!r} is one image: give a folder (out/) or a numbered pattern "
                    f"(out/%05d{out.suffix}) for the frames")
    if not images_out and not out.parent.exists() and str(out.parent) not in ("", "."):
        raise _Exit(f"output folder {str(out.parent)!r} does not exist")
    if not images_out and out.suffix.lower() != ".webm" and args.crf > 51:
        raise _Exit(f"--crf {args.crf:g}: H.264 and HEVC take 0..51")
    if images_out and args.bits == 10:
        raise _Exit("--bits 10: images hold 8 or 16 bits per colour (--bits 16: PNG, TIFF); write a video for 10")
    if not images_out and args.bits == 16:
        raise _Exit("--bits 16: for PNG or TIFF images; a video takes --bits 8 or 10")
    if images_out and args.bits == 16 and not _deep_images_out(args):
        raise _Exit(f"--bits 16: PNG or TIFF images hold 16 bits per colour, not {Path(args.output).suffix}")
    if args.fps is not None and not _images_in(args):
        raise _Exit("--fps sets the rate of an input folder of images; a video keeps its own")

    def check_output(width, height, fps, source_bits=8):
        if images_out:  # its folder, the pattern's suffix; nothing is made yet
            writer = _image_writer(args, width, height)
            writer._abort()
            if _images_in(args):  # never over the frames being read
                inputs = {os.path.realpath(f) for f in _image_input(args).files}
                over = next((writer.path_of(k) for k in range(len(inputs))
                             if os.path.realpath(writer.path_of(k)) in inputs), None)
                if over is not None:
                    raise _Exit(f"{over}: would be written over an input frame; give another folder or pattern")
        else:
            encoding = _encoding(args, source_bits)
            check_writable(out, width, height, fps, crf=args.crf, codec=encoding["codec"],
                           pix_fmt=encoding["pix_fmt"])

    if args.demo:
        if args.input or args.checkpoint:
            raise _Exit("--demo takes no input video or checkpoint (it makes both up)")
        given = [flag for flag, value in (("--dtype", args.dtype), ("--routing", args.routing),
                                          ("--vae", args.vae != "oasis" or None)) if value]
        if given:  # the demo's tiny model is float32 with its own routing and VAE: these would do nothing
            raise _Exit(f"--demo runs its own tiny float32 model, routing and VAE: {', '.join(given)} is for a "
                        f"--checkpoint")
        check_output(320, 192, 24)
        return
    if not args.input:
        raise _Exit("no input video (give IN.mp4, a folder of frames, or --demo)")
    if not args.checkpoint:
        raise _Exit("no --checkpoint folder (or use --demo for an untrained tiny model)")
    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise _Exit(f"checkpoint folder {str(ckpt)!r} does not exist")
    if not (ckpt / "oasis.json").is_file():
        raise _Exit(f"{ckpt}: not an OASIS checkpoint (no oasis.json with the projector's settings)")
    if args.routing and args.routing.lower() != "none" and not Path(args.routing).is_file():
        raise _Exit(f"routing file {args.routing!r} does not exist")
    info = _input_info(args)
    # the output's type, encoder and folder, before minutes of work (the x4 size: sizes only need be even)
    check_output(4 * info.width, 4 * info.height, info.fps, info.bits)
    if not images_out and not _images_in(args) and out.exists() and os.path.samefile(out, args.input):
        # as FFmpeg refuses: the source would be gone with the first failed or unwanted run
        raise _Exit(f"{out}: is the input video itself; give the output another name")


def _world() -> tuple[int, int, int, int]:
    """``(rank, world size, local rank, local world size)`` of a process started by torchrun or
    :func:`_spawn` (one process: 0, 1, 0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return (int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))),
            local_world)


def _check_world(args, device, world: int, local_world: int) -> None:
    """What can be checked before any process loads anything: devices, and frames per chunk (the
    video's frame count where its container knows it)."""
    import torch

    if device.type == "cuda" and local_world > torch.cuda.device_count():
        raise _Exit(f"--gpus {local_world}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "cuda" and device.index is not None and world > 1:
        raise _Exit(f"--device {device} names one GPU; with --gpus {world} give --device cuda (rank r takes cuda:r)")
    if args.chunk_frames is not None and 1 + (args.chunk_frames - 1) // 4 < world:
        raise _Exit(f"--chunk-frames {args.chunk_frames} makes {1 + (args.chunk_frames - 1) // 4} latent frames per "
                    f"chunk, fewer than the {world} processes that split them (at least {4 * world - 3} frames)")
    frames = (args.max_frames or 17) if args.demo else _input_info(args).num_frames
    if frames:
        frames = min(frames, args.max_frames or frames)
        _check_latent_frames(1 + math.ceil((frames - 1) / 4), world, f"{frames} frames")


def _check_latent_frames(latent: int, world: int, what: str) -> None:
    if latent < world:
        raise _Exit(f"{what} make {latent} latent frames per DiT call, fewer than the {world} processes that split "
                    f"them (give at least {4 * world - 3} frames)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, args) -> None:
    """One process of ``--gpus``: the environment torchrun would give it, then :func:`run`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    code = run(args)
    if code:
        raise SystemExit(code)


def _spawn(args, world: int) -> int:
    """Run ``world`` processes of this command (``--gpus``), each with torchrun's environment."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(_rank_main, args=(world, _free_port(), args), nprocs=world, join=True)
    except mp.ProcessRaisedException as exc:  # one line: the child's own error, its traceback is above
        raise _Exit(f"a process of --gpus {world} failed: {str(exc).strip().splitlines()[-1]}") from None
    except mp.ProcessExitedException as exc:
        raise _Exit(f"a process of --gpus {world} exited with code {exc.exit_code}") from None
    return 0


def run(args) -> int:
    import torch

    clips = _clips(args)
    made = None
    if clips[0].batch and not os.path.isdir(args.output):  # the clips' folder, made (its parent must exist)
        parent = os.path.dirname(os.path.abspath(args.output.rstrip("/" + os.sep)))
        if not os.path.isdir(parent):
            raise _Exit(f"output folder {parent!r} does not exist")
        os.mkdir(args.output)
        made = args.output
    try:
        for clip in clips:  # every clip's input and output, before any model work
            _check_args(clip)
    except BaseException:
        if made is not None and not os.listdir(made):
            os.rmdir(made)
        raise
    device = _device(args.device)
    rank, world, local_rank, local_world = _world()
    if world == 1 and args.gpus > 1:  # this process starts the others, and is none of them
        for clip in clips:
            _check_world(clip, device, args.gpus, args.gpus)
        return _spawn(args, args.gpus)
    if world > 1:
        if args.gpus not in (1, world):
            raise _Exit(f"--gpus {args.gpus} under torchrun's {world} processes: leave --gpus out (torchrun sets the "
                        "world)")
        for clip in clips:
            _check_world(clip, device, world, local_world)
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        pipe = None
        for k, clip in enumerate(clips):
            if clip.batch and rank == 0:
                print(f"oasis-vsr: clip {k + 1} of {len(clips)}: {clip.input} -> {clip.output}", file=sys.stderr)
            try:
                pipe = _restore(clip, device, rank, world, pipe)
            except BaseException:
                if clip.batch and rank == 0:
                    print(f"oasis-vsr: {k} of {len(clips)} clips done; {clip.input} failed, the rest not begun",
                          file=sys.stderr)
                raise
        return 0
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _restore(args, device, rank: int, world: int, pipe=None):
    """Read, load (unless ``pipe`` is the model of an earlier clip), plan, restore and write (rank 0 writes;
    every rank computes its frames of each DiT call). Returns the model, for the next clip."""
    import contextlib

    import torch

    from .video import VideoFrames, probe_video, streams_left_out, synthetic_clip

    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    images_in, images_out = _images_in(args), _images_out(args)
    say = (lambda text: print(f"oasis-vsr: {text}", file=sys.stderr)) if rank == 0 else (lambda text: None)
    if args.resume and not images_out and os.path.isfile(args.output):
        say(f"{args.output} exists (a video appears only once complete): kept (--resume)")
        return pipe
    with contextlib.ExitStack() as stack:
        if args.demo:
            from .demo import tiny_pipeline

            say("--demo: a tiny RANDOM-WEIGHT model (untrained) on a synthetic clip; the output shows the pipeline "
                "working, not super-resolution quality")
            pipe = tiny_pipeline(device=device)
            video, info = synthetic_clip(args.max_frames or 17, 48, 80), None
            bits = args.bits or 8
            if bits > 8:
                video = video.to(torch.int32).mul_(256).to(torch.uint16)  # FFmpeg's 16-bit scale
        else:
            from .pipeline import OasisVSR

            # the input first, read a chunk at a time later: a video is decoded once through now, which counts
            # and times its frames and finds a damaged file before the model loads
            t0 = time.perf_counter()
            source_bits = _image_input(args).info.bits if images_in else probe_video(args.input).bits
            bits = _image_bits(args, source_bits) if images_out else _encoding(args, source_bits)["bits"]
            # frames of 16 bits where the output has 10 or 16: the model's output is not rounded to 8 bits first
            if images_in:
                video = stack.enter_context(_image_input(args) if bits == 8 else _deep_image_input(args))
            else:
                video = stack.enter_context(VideoFrames(args.input, max_frames=args.max_frames, bits=8 if bits == 8
                                                        else 16, progress=not args.no_progress and rank == 0))
            info = video.info
            if source_bits > bits:
                more = "" if bits > 8 else " (give --bits 10 for 10)" if not images_out else \
                    " (give --bits 16 for 16)" if _deep_images_out(args) else " (this image type holds 8)"
                say(f"warning: the input's {source_bits} bits per colour are written as {bits}{more}")
            if not images_out and _encoding(args, source_bits)["codec"] == "libx264" and bits == 10:
                say("note: 10-bit H.264 plays in mpv, VLC and FFmpeg, not in Apple's players or most browsers; "
                    "write .mkv for 10-bit HEVC, or give --bits 8")
            if not images_in and time.perf_counter() - t0 > 5:
                say(f"read through {args.input} in {time.perf_counter() - t0:.1f} s")
            if info.interlaced:
                say("warning: the input is interlaced and is restored as progressive frames (its combing too); "
                    "deinterlace it first for a clean result (e.g. ffmpeg -vf bwdif)")
            if info.alpha:
                say(f"warning: the input's transparency ({info.pix_fmt}) is not kept")
            left = streams_left_out(args.input, audio=images_out) if rank == 0 and not images_in else []
            if left:
                kinds = ", ".join(f"{left.count(k)} {k}" for k in dict.fromkeys(left))
                say(f"warning: the input's other streams are not kept ({kinds})")
            routing = "checkpoint"
            if args.routing:
                routing = None if args.routing.lower() == "none" else args.routing
            t0 = time.perf_counter()
            loaded = pipe is None
            if loaded:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    pipe = OasisVSR.from_pretrained(args.checkpoint, routing=routing, dtype=dtype, device=device,
                                                    compile=False if args.no_compile else None, vae=args.vae)
        frames, height, width, _ = tuple(video.shape)
        budget = args.memory_budget
        if world > 1 and device.type == "cuda" and budget is None:
            # one plan for every rank (the same DiT calls, in number and shape): the budget of the GPU with
            # the least free memory, weights included as an explicit --memory-budget counts them
            free = torch.cuda.mem_get_info(device)[0] * 0.9 + pipe._weight_bytes()
            least = torch.tensor([free / 2**30], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(least, op=torch.distributed.ReduceOp.MIN)
            budget = float(least)
        s = pipe.scale
        start, chunk_frames, tile, record = 0, args.chunk_frames, args.tile, None
        if images_out:
            record = _run_record(args, frames, width, height, bits)
            missing = _resume_point(args, frames, width * s, height * s) if args.resume else 0
            if missing:
                # the frames there fix the chunks and tiles (the rest must be cut as they were), and the
                # record says how many of them its run wrote (the others may be an earlier run's)
                chunk_frames, tile, start = _resumed_plan(args, record, width * s, height * s)
                start = min(start, missing)
                if start == frames:
                    say(f"all {frames} frames are in {args.output} already: nothing to restore")
                    return pipe
                if start:
                    say(f"resuming at frame {start} ({start} of {frames} written before)")
        plan = pipe.plan(frames, height, width, memory_budget=budget, chunk_frames=chunk_frames, tile=tile)
        # the square side the tiles were cut from (a tile is clipped to the frame: (min(t, h), min(t, w)))
        chunk_frames, tile = plan.chunk_frames, max(plan.tile) if plan.tiled else None
        if record is not None:
            record.update(chunk_frames=chunk_frames, tile=tile)
            if rank == 0:
                _write_record(_record_path(args, width * s, height * s), dict(record, done=start))
        if world > 1:
            padded = 1 + 4 * math.ceil((frames - 1) / 4)
            chunk = min(plan.chunk_frames, padded)  # the chunk the pipeline runs (OasisVSR._run)
            _check_latent_frames(1 + (chunk - 1) // 4, world, f"chunks of {chunk} frames")
            pipe.dit.set_sequence_parallel()
        if not args.demo:
            say((f"loaded the checkpoint in {time.perf_counter() - t0:.1f} s; " if loaded else "") +
                f"{frames} frames {width}x{height} at {float(info.fps):.3f} fps" +
                (f"; {world} processes" if world > 1 else ""))
        t0 = time.perf_counter()
        # every rank runs the whole pipeline (the DiT's tokens split across them, the projector and the
        # decoder repeated on each GPU at no cost in time); rank 0 writes
        blocks = pipe.stream(video, memory_budget=budget, chunk_frames=chunk_frames, tile=tile,
                             progress=not args.no_progress and rank == 0, start=start)
        if rank != 0:
            for _ in blocks:
                pass
            return pipe
        if images_out:
            written = _write_images(args, blocks, width * s, height * s, frames, say, start, record)
        else:
            written = _write_video(args, blocks, width * s, height * s, info,
                                   _encoding(args, 8 if info is None else info.bits))
    took = time.perf_counter() - t0
    tiles = f", tiles {plan.tile[1]}x{plan.tile[0]}" if plan.tiled else ""
    if written.audio_streams:
        say(f"sound: {', '.join(written.audio_streams)}")
    say(f"wrote {args.output}: {frames - start} {'images' if images_out else 'frames'} {width * s}x{height * s} in "
        f"{took:.1f} s "
        f"(chunks of {plan.chunk_frames} frames{tiles}{f', {world} processes' if world > 1 else ''})"
        f"{' [untrained demo]' if args.demo else ''}")
    _report_conv_timing()
    return pipe


def _write_behind(blocks, write) -> None:
    """``write(block)`` for every block, on a thread of its own one block behind: the GPU restores the next
    chunk while the last one is encoded (PyAV and Pillow code without the interpreter lock), where writing
    in turn left the GPU idle for each chunk's encoding. Blocks are written in order, a frame at a time.
    The first error of either side is raised here, once the thread has stopped (an interrupt, Ctrl-C, too:
    the writer must not be closed while the thread still writes to it); after one, no further frame is
    written, and no block is restored beyond the one under way."""
    import queue
    import threading

    todo: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    failed: list[BaseException] = []

    def writer() -> None:
        while (block := todo.get()) is not None:
            if stop.is_set():
                continue  # taken and dropped, until the end mark
            try:
                for k in range(len(block)):
                    if stop.is_set():
                        break
                    write(block[k:k + 1])
            except BaseException as exc:  # to the caller, which raises it
                failed.append(exc)
                stop.set()

    thread = threading.Thread(target=writer, name="oasis-vsr-write", daemon=True)
    thread.start()
    interrupted = None
    try:
        blocks = iter(blocks)
        while not stop.is_set():  # checked before each block is restored
            block = next(blocks, None)
            if block is None:
                break
            while not stop.is_set():
                try:
                    todo.put(block, timeout=0.1)
                    break
                except queue.Full:
                    pass
    except BaseException:
        stop.set()
        raise
    finally:
        sent = False
        while thread.is_alive():  # the end mark in, the thread out: whatever interrupts the wait
            try:
                if not sent:
                    todo.put(None, timeout=0.1)
                    sent = True
                thread.join(timeout=0.1)
            except queue.Full:
                pass
            except KeyboardInterrupt as exc:
                stop.set()
                interrupted = exc
        close = getattr(blocks, "close", None)
        if close is not None:  # the restoration's generator, stopped where it stands
            close()
    if interrupted is not None:
        raise interrupted
    if failed:
        raise failed[0]


def _run_record(args, frames: int, width: int, height: int, bits: int) -> dict:
    """What an image output's frames depend on besides its chunks and tiles, kept beside them for --resume."""
    def where(path):
        return None if path is None else os.path.realpath(path) if os.path.exists(path) else os.path.abspath(path)

    return {"format": "oasis-vsr-run/1", "input": where(args.input) or "demo", "frames": frames,
            "size": [width, height], "checkpoint": where(args.checkpoint) or "demo", "routing": args.routing,
            "dtype": args.dtype, "vae": args.vae, "fps": None if args.fps is None else str(args.fps),
            "bits": bits}


def _record_path(args, width: int, height: int) -> str:
    """The run record of an image output: beside its frames, hidden (named after a pattern's name)."""
    from .images import is_numbered

    writer = _image_writer(args, width, height)
    writer._abort()
    name = f".{os.path.basename(args.output)}.oasis-vsr.json" if is_numbered(args.output) else ".oasis-vsr.json"
    return os.path.join(writer.folder, name)


def _write_record(path: str, record: dict) -> None:
    import json

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".partial", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".partial", path)


def _resumed_plan(args, record: dict, width: int, height: int) -> tuple:
    """The chunks and tiles the earlier run cut the frames into (its record), and how many frames it wrote
    in order, after checking that it restored the same input the same way: otherwise the frames there and
    the ones to come would not be one run's (other chunks blend other frames; another --max-frames moves
    every chunk)."""
    import json

    path = _record_path(args, width, height)
    try:
        with open(path) as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        raise _Exit(f"--resume: no record of how the frames in {os.path.dirname(path)} were made ({path}); remove "
                    f"them, or write elsewhere") from None
    earlier.setdefault("bits", 8)  # records written before 16-bit images
    changed = [f"{k} {earlier.get(k)!r}, now {v!r}" for k, v in record.items() if earlier.get(k) != v]
    lq_width, lq_height = record["size"]

    def cut(t):  # a tile as the frame clips it
        return None if t is None else (min(t, lq_height), min(t, lq_width))

    if args.chunk_frames is not None and args.chunk_frames != earlier.get("chunk_frames"):
        changed.append(f"chunk_frames {earlier.get('chunk_frames')!r}, now {args.chunk_frames!r}")
    if args.tile is not None and cut(args.tile) != cut(earlier.get("tile")):
        changed.append(f"tile {earlier.get('tile')!r}, now {args.tile!r}")
    if changed:
        raise _Exit(f"--resume: the frames in {os.path.dirname(path)} were made otherwise ({'; '.join(changed)}); "
                    f"give the same settings, or write elsewhere")
    return earlier.get("chunk_frames"), earlier.get("tile"), int(earlier.get("done", 0))


def _resume_point(args, frames: int, width: int, height: int) -> int:
    """The first frame whose image is not in the output yet (``frames`` when all are)."""
    writer = _image_writer(args, width, height)
    writer._abort()
    return next((k for k in range(frames) if not os.path.isfile(writer.path_of(k))), frames)


def _write_images(args, blocks, width: int, height: int, frames: int, say, start: int = 0, record=None):
    from .images import IMAGE_SUFFIXES

    with _image_writer(args, width, height) as out:
        if record is not None:  # the record says how many frames, in order, this run has put in place
            path = _record_path(args, width, height)
            out.on_written = lambda done: _write_record(path, dict(record, done=done))
        out.skip(start)
        if os.path.isdir(out.folder):  # what an earlier run left there that this one does not replace
            ours = {os.path.basename(out.path_of(k)) for k in range(frames)}
            theirs = {f.name for f in Path(out.folder).iterdir()
                      if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")}
            ours |= {f.name for f in _image_input(args).files} if _images_in(args) else set()
            if theirs - ours:
                say(f"warning: {len(theirs - ours)} other images in {out.folder} are left as they are (an earlier "
                    f"run's?): the folder will not hold this video's frames alone")
        say(f"writing {frames - start} images {width}x{height} into {out.folder}")
        _write_behind(blocks, out.write)
    return out


def _write_video(args, blocks, width: int, height: int, info, encoding: dict):
    """The restored frames into the output video, written beside it and renamed to it once complete (where
    that is safe: :func:`_partial_path`): an interrupted or failed run leaves no half-written video under
    the name (nor over an earlier one)."""
    from .video import VideoWriter

    if info is None:  # the demo's synthetic clip
        from .video import VideoInfo

        info = VideoInfo(path="", width=0, height=0, fps=24, num_frames=None, codec="", pix_fmt="rgb24",
                         color_range=None, colorspace=None)
    source = None if args.demo or _images_in(args) else args.input
    target = Path(args.output)
    partial = _partial_path(target)
    path, done = partial or target, False
    # the source's matrix where the writer has it (BT.2020 for HDR clips: players expect it with their curves)
    colorspace = info.colorspace if info.colorspace in (None, "bt709", "bt470bg", "smpte170m", "bt2020nc") else None
    try:
        with VideoWriter(path, width, height, info.fps, crf=args.crf, codec=encoding["codec"],
                         pix_fmt=encoding["pix_fmt"], color_range=info.color_range,
                         colorspace=colorspace, color_primaries=info.color_primaries, color_trc=info.color_trc,
                         rotation=info.rotation, sample_aspect_ratio=info.sample_aspect_ratio,
                         audio_from=None if args.no_audio else source, metadata_from=source,
                         frame_times=info.frame_times) as out:
            _write_behind(blocks, out.write)
        done = True
        if partial is not None:
            _move_into_place(partial, target)
    finally:
        if partial is not None and not done:
            partial.unlink(missing_ok=True)
    return out


def _partial_path(target: Path) -> Path | None:
    """Where to write the video before it is renamed to ``target``, or None to write ``target`` itself
    (as before it existed): where the rename would not do what writing does (a symbolic link, which
    writing follows; a file with other hard links; a folder the user may not write to, holding a
    file they may), or where the name would be too long. A scratch file an interrupted run left is never
    touched: the next free name is taken."""
    if target.is_symlink() or (target.exists() and (not target.is_file() or target.stat().st_nlink > 1)):
        return None
    if not os.access(target.parent, os.W_OK | os.X_OK):
        return None
    name = target.name
    ext = name[name.rfind("."):] if "." in name else ""  # (FFmpeg's file type: what follows the last dot)
    for n in range(100):  # a name no file has (one an interrupted run left is never touched)
        partial = target.with_name(f".{name}.oasis-partial{f'-{n}' if n else ''}{ext}")
        if len(partial.name.encode()) > 255:
            return None
        if not partial.exists() and not partial.is_symlink():
            return partial
    return None


def _move_into_place(partial: Path, target: Path) -> None:
    """``partial`` renamed to ``target``, keeping an existing target's permissions; where the rename fails
    (a bind-mounted file), its bytes copied in. If that fails too, the finished video stays at
    ``partial`` and the error says so."""
    import shutil

    try:
        if target.exists():
            shutil.copymode(target, partial)
        os.replace(partial, target)
    except OSError:
        try:
            shutil.copyfile(partial, target)
        except OSError as exc:
            raise _Exit(f"the finished video is {partial}: it could not be moved to {target} ({exc})") from None
        partial.unlink(missing_ok=True)


def _report_conv_timing() -> None:
    """Say what the VAE's one-off timing of cuDNN's engines cost, where it ran (docs/OASIS.md, the VAE)."""
    from . import vae_conv

    geometries, seconds = vae_conv.tuning_stats()
    if geometries:
        where = vae_conv.choices_file()
        print(f"oasis-vsr: {seconds:.1f} s of that timed cuDNN's engines for {geometries} new convolution shapes, "
              f"once per GPU and video size" + (f" (kept in {where})" if where else ""), file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """The package's own warnings as the tool's lines (``oasis-vsr: warning: ...``), not Python's form with
    a source line; others as Python shows them."""
    if os.path.dirname(os.path.abspath(filename)) == os.path.dirname(os.path.abspath(__file__)):
        print(f"oasis-vsr: warning: {message}", file=file or sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return run(args)
    except (_Exit, ValueError, MemoryError, ImportError, OSError, FloatingPointError) as exc:  # OSError: a full disk
        print(f"oasis-vsr: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc) and "out of memory" not in str(exc):
            raise  # a fault of ours: its traceback
        print(f"oasis-vsr: error: out of memory ({str(exc).splitlines()[0]}); give a --memory-budget, --tile or "
              f"--chunk-frames", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("oasis-vsr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
