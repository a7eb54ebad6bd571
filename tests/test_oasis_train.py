"""oasis-train on the CPU: the tiny demo's loss goes down, exact resume, configs, data (tiny sizes)."""

import json
import os

import pytest
import torch

pytest.importorskip("av")

from oasis.data import ClipSpec, PairDataset, SyntheticVideos, VideoFolder  # noqa: E402
from oasis.degrade import Degradation  # noqa: E402
from oasis.train import DEGRADE_WORKER_BYTES, DEMO, Trainer, TrainConfig, main  # noqa: E402


def demo_config(tmp_path, **kw):
    return TrainConfig(**{**DEMO, "out": str(tmp_path / "run"), "progress": False, **kw})


def test_demo_loss_goes_down_on_a_fixed_batch(tmp_path):
    t = Trainer(demo_config(tmp_path))
    before = t.evaluate(0)
    history = t.run()
    assert len(history) == 12 and [r["stage"] for r in history] == [1] * 6 + [2] * 6
    assert all(r["total"] > 0 for r in history)
    assert t.evaluate(0) < 0.95 * before
    assert (tmp_path / "run" / "step_12" / "model" / "oasis.json").is_file()
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 12 and {"latent", "mse", "total", "clips_per_s"} <= set(json.loads(lines[0]))


def test_resume_gives_the_same_next_losses(tmp_path):
    straight = Trainer(demo_config(tmp_path, stage1_steps=2, stage2_steps=2, out=str(tmp_path / "a")))
    want = [r["total"] for r in straight.run()]
    first = Trainer(demo_config(tmp_path, stage1_steps=2, stage2_steps=2, out=str(tmp_path / "b")))
    first.run(steps=3)
    path = first.save()
    # as a checkpoint written before the trainer's AdamW was fused has it: resumed fused all the same
    state = torch.load(path / "trainer.pt", weights_only=False)
    for group in state["optimizer"]["param_groups"]:
        group.update(fused=None, foreach=None)
    torch.save(state, path / "trainer.pt")
    again = Trainer(demo_config(tmp_path, stage1_steps=2, stage2_steps=2, out=str(tmp_path / "b")), resume=path)
    assert again.step == 3 and all(g["fused"] for g in again.optimizer.param_groups)
    got = [r["total"] for r in again.run()]
    assert got[:3] == want[:3]  # the history travels with the checkpoint
    assert got[3] == pytest.approx(want[3], rel=1e-6, abs=1e-7)
    # a run saved before the degradations' version was written (version 1) degraded otherwise: refused
    del state["config"]["degradations"]
    torch.save(state, path / "trainer.pt")
    from oasis.degrade import VERSION

    with pytest.raises(ValueError, match=f"degradations' random draws: version 1 -> {VERSION}"):
        Trainer(demo_config(tmp_path, stage1_steps=2, stage2_steps=2, out=str(tmp_path / "b")), resume=path)


def test_configs_and_cli_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="checkpoint is required"):
        TrainConfig(videos="x")
    with pytest.raises(ValueError, match="unknown settings \\['lerning_rate'\\]"):
        TrainConfig.from_dict({"demo": True, "lerning_rate": 1})
    with pytest.raises(ValueError, match="batch"):
        TrainConfig(demo=True, batch=0)
    cfg = tmp_path / "c.toml"
    cfg.write_text('demo = true\ndevice = "cpu"\nframes = 5\nheight = 32\nwidth = 64\nstage1_steps = 1\n'
                   'stage2_steps = 0\nprogress = false\n')
    loaded = TrainConfig.from_file(cfg)
    assert loaded.frames == 5 and loaded.stage(0) == 1 and loaded.steps == 1
    (tmp_path / "bad.toml").write_text("demo = [")
    assert main([str(tmp_path / "bad.toml")]) == 2
    assert "cannot parse" in capsys.readouterr().err
    assert main([]) == 2
    assert main([str(tmp_path / "missing.toml")]) == 2
    with pytest.raises(ValueError, match="frames must be 4k\\+1"):
        ClipSpec(frames=6)
    # a setting of the wrong kind is named (a config's "false" is a string, which Python takes as true)
    for setting, says in (({"demo": "false"}, "demo must be true or false"),
                          ({"progress": "no"}, "progress must be true or false"),
                          ({"memory_fraction": "0.9"}, "memory_fraction must be a number"),
                          ({"calibrate_rho": "x"}, "calibrate_rho must be a number"),
                          ({"betas": 0.9}, "betas must be two numbers"),
                          ({"videos": 5}, "videos must be a path"),
                          ({"checkpoint": 7}, "checkpoint must be a path"),
                          ({"out": 3}, "out must be a path")):
        with pytest.raises(ValueError, match=says):
            TrainConfig(**{"demo": True, **setting})
    from pathlib import Path

    assert TrainConfig(demo=True, out=Path(tmp_path)).out == Path(tmp_path)  # a path as the others take it


def test_the_output_folder_is_checked_before_any_work(tmp_path, capsys):
    """A folder under a file, or one holding an earlier run without --resume: one line, exit 2, nothing
    trained; --demo without --out takes a fresh folder each time."""
    (tmp_path / "file").write_text("x")
    cfg = tmp_path / "c.toml"
    for out, says in ((tmp_path / "file" / "run", "the folder cannot be made"), (tmp_path / "file", "is a file")):
        cfg.write_text(f'demo = true\ndevice = "cpu"\nframes = 5\nheight = 32\nwidth = 64\nstage1_steps = 1\n'
                       f'stage2_steps = 0\nprogress = false\nworkers = 0\nout = "{out}"\n')
        assert main([str(cfg)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    run = tmp_path / "run"
    cfg.write_text(f'demo = true\ndevice = "cpu"\nframes = 5\nheight = 32\nwidth = 64\nstage1_steps = 1\n'
                   f'stage2_steps = 0\nprogress = false\nworkers = 0\nsave_every = 1\nout = "{run}"\n')
    assert main([str(cfg)]) == 0
    capsys.readouterr()
    assert main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run (log.jsonl, step_1)" in err and "--resume" in err, err
    assert len((run / "log.jsonl").read_text().splitlines()) == 1  # the earlier run's log alone
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        from oasis.train import _unused_folder

        (tmp_path / "runs" / "oasis-demo").mkdir(parents=True)
        assert _unused_folder("runs/oasis-demo") == "runs/oasis-demo"  # empty: used as it is
        (tmp_path / "runs" / "oasis-demo" / "log.jsonl").write_text("")
        assert _unused_folder("runs/oasis-demo") == "runs/oasis-demo-2"
    finally:
        os.chdir(old)


def test_data_is_a_function_of_seed_and_index(tmp_path):
    spec = ClipSpec(5, 32, 64)
    ds = PairDataset(SyntheticVideos(spec, seed=1), Degradation(), seed=1)
    (lq, hq), (lq2, hq2) = ds[5], ds[5]
    assert torch.equal(lq, lq2) and torch.equal(hq, hq2)
    assert lq.shape == (3, 5, 8, 16) and hq.shape == (3, 5, 32, 64)
    assert not torch.equal(ds[6][1], hq)
    from oasis.video import synthetic_clip, write_video

    write_video(tmp_path / "a.mp4", synthetic_clip(12, 48, 96, seed=2), fps=25)
    write_video(tmp_path / "small.mp4", synthetic_clip(12, 16, 16, seed=2), fps=25)
    write_video(tmp_path / "b.mkv", synthetic_clip(30, 48, 96, seed=3), fps=25)  # Matroska declares no count
    folder = VideoFolder(tmp_path, spec, seed=0)
    assert len(folder) == 2 and len(folder.skipped) == 1
    assert sorted(info.num_frames for _, info in folder.videos) == [12, 30]
    clip = folder.clip(3)
    assert clip.shape == (3, 5, 32, 64) and torch.equal(clip, folder.clip(3))
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no videos"):
        VideoFolder(tmp_path / "none", spec)


def test_folders_of_images_are_videos_too(tmp_path):
    """A folder of frames (REDS' layout: one folder per clip) is one training video: its crops are the
    images' pixels in natural order at the drawn frames, rows and columns; too short or too small ones are
    left out as videos are; videos and folders mix."""
    from PIL import Image

    from oasis.video import synthetic_clip, write_video

    spec = ClipSpec(5, 32, 64, stride=2)
    frames = synthetic_clip(12, 40, 72, seed=4)
    for name, clip in (("000", frames), ("001", frames[:6])):  # 001: fewer than the crop's 9 frames
        (tmp_path / "train" / name).mkdir(parents=True)
        for k, frame in enumerate(clip):
            Image.fromarray(frame.numpy()).save(tmp_path / "train" / name / f"{k}.png")
    write_video(tmp_path / "train" / "v.mp4", synthetic_clip(12, 48, 96, seed=2), fps=25)
    (tmp_path / "train" / ".cache" / "thumbs").mkdir(parents=True)  # hidden: no training video
    for k, frame in enumerate(frames):
        Image.fromarray(frame.numpy()).save(tmp_path / "train" / ".cache" / "thumbs" / f"{k}.png")
    folder = VideoFolder(tmp_path / "train", spec, seed=1)
    assert [p.name for p, _ in folder.videos] == ["000", "v.mp4"] and [p.name for p, _ in folder.skipped] == ["001"]
    seen = 0
    for index in range(12):
        path, start, top, left = folder._draw(index)
        if path.name != "000":
            continue
        seen += 1
        want = frames[start:start + 9:2, top:top + 32, left:left + 64].permute(3, 0, 1, 2)
        crop = folder.frames(index)
        assert torch.equal(crop, want) and torch.equal(folder.frames_from_start(index), want)
        assert crop.untyped_storage().nbytes() == crop.numel()  # the crop alone, not the frames it was cut from
    assert seen
    images_only = VideoFolder(tmp_path / "train" / "000", spec)  # the folder itself holds the frames
    assert len(images_only) == 1 and images_only.clip(0).shape == (3, 5, 32, 64)


def _write_gop_video(path, frames, codec, gop, bframes=0):
    """uint8 [F, H, W, 3] -> a video with a keyframe every ``gop`` frames (and B-frames, for libx264)."""
    import av

    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"x264-params": f"keyint={gop}:min-keyint={gop}:bframes={bframes}:scenecut=0", "crf": "20"}
        for f in frames.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.parametrize("name, codec, bframes", [("a.mp4", "libx264", 2), ("b.mkv", "libx264", 0),
                                                   ("c.avi", "mpeg4", 0)])
def test_video_crops_from_the_nearest_keyframe_are_the_decoded_frames(tmp_path, name, codec, bframes):
    """VideoFolder starts decoding at the keyframe before the crop (its packet index): the same frames
    as decoding the video from its start, for MP4 with B-frames, Matroska and AVI, strides 1 and 2;
    and it does skip (the keyframe path serves crops past the first group of pictures)."""
    from oasis.video import synthetic_clip

    _write_gop_video(tmp_path / name, synthetic_clip(40, 48, 96, seed=5), codec, gop=6, bframes=bframes)
    for stride in (1, 2):
        folder = VideoFolder(tmp_path, ClipSpec(5, 32, 64, stride=stride), seed=stride)
        skipped = 0
        for i in range(12):
            path, start, top, left = folder._draw(i)
            skipped += folder._decode_from_keyframe(path, start, top, left) is not None
            got = folder.frames(i)
            assert got.dtype == torch.uint8 and torch.equal(got, folder.frames_from_start(i)), (i, start)
        assert skipped >= 6, skipped  # crops start in frames 0..32 (stride 1) or 0..31: most after frame 6
    # a stream cut after its first keyframe opens on pictures the decoder drops: the index would number
    # frames otherwise than the decoder, so such a video is decoded from its start
    import av

    cut = tmp_path / "cut"
    cut.mkdir()
    with av.open(str(tmp_path / name)) as src, av.open(str(cut / "cut.mkv"), "w") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for n, packet in enumerate(p for p in src.demux(src.streams.video[0]) if p.size):
            if n >= 3:
                packet.stream = stream
                dst.mux(packet)
    folder = VideoFolder(cut, ClipSpec(5, 32, 64), seed=0)
    assert folder._packet_index(cut / "cut.mkv") is None
    # its container counts 37 frames; FFmpeg's H.264 decoder gives fewer (it drops the pictures before the
    # first keyframe; its MPEG-4 decoder shows them): crops near the end end at the last frame
    assert all(torch.equal(folder.frames(i), folder.frames_from_start(i)) for i in range(12))
    if codec == "libx264":
        assert folder._decodable[cut / "cut.mkv"] < 37
    # oasis.video's writer places keyframes as asked (what the bench's videos rely on)
    from oasis.video import VideoError, write_video

    write_video(tmp_path / "k.mp4", synthetic_clip(20, 32, 64, seed=1), 25, keyframe_interval=4)
    times, keys = VideoFolder(tmp_path, ClipSpec(5, 32, 64))._packet_index(tmp_path / "k.mp4")
    assert len(times) == 20 and len(keys) >= 5
    with pytest.raises(VideoError, match="keyframe_interval"):
        write_video(tmp_path / "bad.mp4", synthetic_clip(2, 32, 64), 25, keyframe_interval=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_uint8_clips_become_the_same_floats_on_a_gpu():
    """The loader's uint8 clips made floats on the GPU (oasis.data._unit) are the CPU's floats bit for bit:
    a division by a Python scalar on CUDA multiplies by its reciprocal, one unit off for 126 of 256 values."""
    from oasis.data import _unit

    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 16, 16)
    assert torch.equal(_unit(x.cuda()).cpu(), x.float() / 255.0)


def test_routing_calibration_before_training(tmp_path):
    t = Trainer(demo_config(tmp_path, calibrate_videos=2, calibrate_rho=0.34, stage1_steps=1, stage2_steps=1))
    assert (tmp_path / "run" / "routing.json").is_file()
    modes = [[m.name.lower() for m in layer] for layer in t.pipe.dit.routing]
    assert sum(layer.count("global") for layer in modes) == 3  # Algorithm 1: ceil(0.34 x 6 heads) global in all
    assert t.routing.videos == 2
    t.run()
    resumed = Trainer(demo_config(tmp_path, stage1_steps=1, stage2_steps=1), resume=tmp_path / "run" / "step_2")
    assert [[m.name.lower() for m in layer] for layer in resumed.pipe.dit.routing] == modes
    with pytest.raises(ValueError, match="not both"):
        demo_config(tmp_path, calibrate_videos=2, routing="r.json")


def test_the_warp_term_with_a_flow_model(tmp_path):
    """With flows (here a stand-in returning zero motion in RAFT's list form) the warp loss joins the total."""
    from oasis.losses import clip_flows, load_raft

    t = Trainer(demo_config(tmp_path, stage1_steps=1, stage2_steps=0))
    t.flow_model = lambda a, b: [torch.zeros(a.shape[0], 2, *a.shape[-2:])]
    record = t.run()[-1]
    assert record["warp"] > 0
    video = torch.rand(2, 3, 4, 8, 8)
    to_next, to_prev = clip_flows(lambda a, b: [torch.ones(a.shape[0], 2, 8, 8)], video)
    assert to_next.shape == to_prev.shape == (2, 3, 2, 8, 8)
    with pytest.raises(FileNotFoundError, match="without the warp loss"):
        load_raft(tmp_path / "raft.pth")


def test_worker_processes_load_the_same_batches(tmp_path):
    one = Trainer(demo_config(tmp_path, stage1_steps=2, stage2_steps=1, accumulate=2, out=str(tmp_path / "a")))
    two = Trainer(demo_config(tmp_path, stage1_steps=2, stage2_steps=1, accumulate=2, workers=2,
                              out=str(tmp_path / "b")))
    # the same samples; the workers run torch single-threaded, whose summation order can move a degraded
    # value across an 8-bit step, so the losses agree closely rather than bit for bit
    assert [r["total"] for r in one.run()] == pytest.approx([r["total"] for r in two.run()], rel=1e-3)
    assert one.samples(1) == [[2], [3]]  # micro-batches of a step never share a sample


def test_resume_refuses_changed_data_settings_and_keeps_an_all_global_run_global(tmp_path):
    t = Trainer(demo_config(tmp_path, stage1_steps=1, stage2_steps=1, routing=None, calibrate_videos=1,
                            calibrate_rho=1.0))
    assert all(m.name == "GLOBAL" for layer in t.pipe.dit.routing for m in layer)
    t.run()
    path = tmp_path / "run" / "step_2"
    again = Trainer(demo_config(tmp_path, stage1_steps=1, stage2_steps=1), resume=path)
    assert all(m.name == "GLOBAL" for layer in again.pipe.dit.routing for m in layer)
    with pytest.raises(ValueError, match="batch: 1 -> 2"):
        Trainer(demo_config(tmp_path, stage1_steps=1, stage2_steps=1, batch=2), resume=path)
    for bad in (dict(grad_clip=-1.0), dict(dtype="float16"), dict(device="gpu"), dict(warp_weight=-0.1),
                dict(activation_checkpointing=-1), dict(activation_checkpointing="all"), dict(compile="whole"),
                dict(compile="model"), dict(compile="graphs", sequence_parallel=2)):
        with pytest.raises(ValueError):
            demo_config(tmp_path, **bad)


def test_training_benchmarks_run(tmp_path, capsys):
    """benchmarks/train_bench.py and degrade_bench.py on tiny sizes (the code runs; numbers on the GPU)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import degrade_bench
    import train_bench

    assert train_bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--batches", "1", "--checkpoint-blocks",
                             "0", "2", "--adamw", "foreach", "fused", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "train_bench.json").read_text())
    settings = [(r["adamw"], r["checkpointed_blocks"], r["mode"]) for r in res["rows"]]
    assert settings == [(a, k, m) for a in ("foreach", "fused") for k in (0, 2) for m in ("routed", "all-global")]
    assert all(r["optimizer_s"] > 0 for r in res["rows"]) and len(res["routed_speedup_batch1"]) == 4
    with pytest.raises(SystemExit) as exc:  # refused as a command-line error, before the model is built
        train_bench.main(["--tiny", "--device", "cpu", "--checkpoint-blocks", "3"])
    assert exc.value.code == 2 and "a number of blocks in 0..2" in capsys.readouterr().err
    assert degrade_bench.main(["--clips", "1", "--workers", "0", "--size", "5", "32", "64", "--out",
                               str(tmp_path)]) == 0
    assert len(json.loads((tmp_path / "degrade_bench.json").read_text())["rows"]) == 2
    assert degrade_bench.main(["--clips", "2", "--workers", "0", "--device", "cpu", "--threads", "0", "2", "--coders",
                               "2", "--size", "5", "32", "64", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "degrade_bench.json").read_text())
    assert [r["threads"] for r in res["rows"]] == [0, 2, 0, 2] and len(res["coders"]) == 3
    assert [r["threads"] for r in res["memory_rows"]] == [0, 2, 0, 2] and res["source_ms_per_clip"] > 0
    # workers decoding real files: videos written first, read by a VideoFolder
    assert degrade_bench.main(["--clips", "1", "--workers", "0", "--make-videos", "2", "--video-size", "7", "40", "72",
                               "--videos", str(tmp_path / "videos"), "--size", "5", "32", "64", "--out",
                               str(tmp_path)]) == 0
    res = json.loads((tmp_path / "degrade_bench.json").read_text())
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 2 and res["source"].startswith("2 libx264 videos")
    assert res["source_from_start_ms_per_clip"] > 0


def _sequence_parallel_step(rank, world, port, out_dir):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    t = Trainer(TrainConfig(**{**DEMO, "out": str(out_dir / "sp"), "progress": False, "sequence_parallel": world}))
    real = t._sum_sequence_parallel_gradients
    t._sum_sequence_parallel_gradients = lambda: real(bucket_bytes=4096)  # many buckets, one tensor in some
    try:
        parts = t.train_step()
        torch.save({"parts": parts, "params": [p.detach().clone() for p in t.params],
                    "grads": [p.grad.clone() for p in t.params]}, out_dir / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two interpreters start; ~15 s on 2 cores
def test_sequence_parallel_training_step_equals_one_process(tmp_path):
    """sequence_parallel = 2 over 2 gloo processes: each splits the DiT's latent frames, the gradients are
    summed (the residual's counted once, WanDiT.own_frames_gradient): the step's losses, the gradients and
    the updated weights equal one process's, on both ranks. The weights are compared where the gradient
    is well above AdamW's eps: its first step moves a weight by lr * g / (|g| + eps), so a gradient of
    rounding size (the ranks add in another order; the demo's odd global heads run gathered, on SDPA)
    moves its weight visibly without being wrong."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.manual_seed(0)
    one = Trainer(demo_config(tmp_path, out=str(tmp_path / "one")))
    want = one.train_step()
    mp.spawn(_sequence_parallel_step, args=(2, port, tmp_path), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["parts"]["total"] == pytest.approx(want["total"], rel=1e-5)
        assert got["parts"]["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        eps = one.optimizer.param_groups[0]["eps"]
        for p, g, q in zip(got["params"], got["grads"], one.params):
            torch.testing.assert_close(g, q.grad, rtol=1e-4, atol=1e-5 * float(q.grad.abs().max()))
            clear = q.grad.abs() > 100 * eps
            assert clear.float().mean() > 0.5  # most of each tensor is compared
            torch.testing.assert_close(p[clear], q.detach()[clear], rtol=1e-5, atol=1e-6)


def test_sequence_parallel_settings_are_checked():
    with pytest.raises(ValueError, match="fewer than sequence_parallel = 3"):
        TrainConfig(**{**DEMO, "sequence_parallel": 3})  # 5 frames: 2 latent frames
    with pytest.raises(ValueError, match="sequence_parallel must be a positive int"):
        TrainConfig(**{**DEMO, "sequence_parallel": 0})
    with pytest.raises(ValueError, match="does not divide the 1 ranks"):
        Trainer(TrainConfig(**{**DEMO, "sequence_parallel": 2, "progress": False}))


def test_degradations_on_the_device_give_the_same_batches(tmp_path):
    """degrade_on = "device": the loader brings HQ clips, the trainer degrades them on its device; on
    the CPU the pairs equal the workers' bit for bit (the same code on the same device), with and
    without loader processes."""
    base = demo_config(tmp_path, stage1_steps=2, stage2_steps=1, accumulate=2)
    workers = Trainer(base)
    device = Trainer(demo_config(tmp_path, stage1_steps=2, stage2_steps=1, accumulate=2, degrade_on="device"))
    # the default, "auto", degrades in the workers on the CPU (on the device on CUDA)
    assert base.degrade_on == "auto" and not workers.degrades_on_device and device.degrades_on_device
    for step in (0, 2):  # stage 1 (consistent) and stage 2 (inconsistent)
        for (lq_a, hq_a), (lq_b, hq_b) in zip(workers.micro_batches(step), device.micro_batches(step)):
            assert torch.equal(lq_a, lq_b) and torch.equal(hq_a, hq_b)
    # the loader's path: degradation threads a step ahead (0 and 3 threads), loader processes or none
    serial = list(Trainer(demo_config(tmp_path, stage1_steps=2, stage2_steps=1, accumulate=2, degrade_on="device",
                                      degrade_threads=0))._loader(0, 3))
    threaded = list(Trainer(demo_config(tmp_path, stage1_steps=2, stage2_steps=1, accumulate=2, degrade_on="device",
                                        workers=2, degrade_threads=3))._loader(0, 3))
    on_workers = list(workers._loader(0, 3))
    # "workers-device": each loader process degrades on the trainer's device (here the CPU), or the main one
    in_workers = Trainer(demo_config(tmp_path, stage1_steps=2, stage2_steps=1, accumulate=2,
                                     degrade_on="workers-device", workers=2))
    assert not in_workers.degrades_on_device and in_workers._degrade_place("workers-device", "cuda") == "device"
    # "auto": in the workers on CUDA where there are workers, in the trainer's process without; the CPU's workers
    assert in_workers._degrades_in_workers() and not device._degrades_in_workers()
    auto_2 = Trainer(demo_config(tmp_path, stage1_steps=2, stage2_steps=1, accumulate=2, workers=2))
    assert auto_2._degrades_in_workers("cuda") and not auto_2._degrades_in_workers()
    assert base.workers == 0 and not workers._degrades_in_workers("cuda")  # no workers: the trainer's process
    # the checkpointing budget leaves room for workers that degrade on the GPU (there: in_workers' two)
    gib = 1 << 30
    assert workers._memory_budget(80 * gib) == int(0.9 * 80 * gib)
    assert in_workers._memory_budget(80 * gib) == int(0.9 * 80 * gib) - 2 * DEGRADE_WORKER_BYTES
    in_workers_0 = Trainer(demo_config(tmp_path, stage1_steps=2, stage2_steps=1, accumulate=2,
                                       degrade_on="workers-device", workers=0))
    others = [list(in_workers._loader(0, 3)), list(in_workers_0._loader(0, 3))]
    assert len(serial) == len(threaded) == len(on_workers) == len(others[0]) == len(others[1]) == 6
    for (lq_a, hq_a), *rest in zip(on_workers, serial, threaded, *others):
        for lq_b, hq_b in rest:
            assert torch.equal(hq_a, hq_b) and torch.equal(lq_a, lq_b)
    with pytest.raises(ValueError, match="degrade_on must be"):
        demo_config(tmp_path, degrade_on="gpu")
    with pytest.raises(ValueError, match="degrade_threads must be a non-negative int"):
        demo_config(tmp_path, degrade_threads=-1)


@pytest.mark.parametrize("jpeg", ["pil", "torch"])  # torch: what clips on a GPU take
def test_device_degrader_threads_give_the_pairs_in_order(jpeg):
    """DeviceDegrader: clips degraded by several threads come back in the order submitted, equal to
    PairDataset.degrade one by one; bad arguments are refused before any work."""
    from oasis.data import DeviceDegrader

    spec = ClipSpec(5, 32, 64)
    data = PairDataset(SyntheticVideos(spec), Degradation(jpeg_impl=jpeg), "inconsistent", seed=3)
    numbers = [7, 2, 11, 5]
    hq = torch.stack([data.source.clip(n) for n in numbers])
    want = torch.stack([data.degrade(clip, n) for clip, n in zip(hq, numbers)])
    with DeviceDegrader("cpu", 3) as degrader:
        pending = [degrader.submit(data, numbers[:2], hq[:2]), degrader.submit(data, numbers[2:], hq[2:])]
        lq = torch.cat([p.result()[0] for p in pending])
        assert lq.shape == (4, 3, 5, 8, 16) and torch.equal(lq, want)
        # the loader's uint8 clips (HQClips) give the same pairs, and the float HQ clips
        hq8 = torch.stack([data.hq_only()[n][1] for n in numbers])
        assert hq8.dtype == torch.uint8 and torch.equal(hq8.float() / 255, hq)
        lq8, hq_back = degrader.submit(data, numbers, hq8).result()
        assert torch.equal(lq8, want) and torch.equal(hq_back, hq)
        with pytest.raises(ValueError, match=r"hq must be \[B, 3, F, H, W\] with B = 3"):
            degrader.submit(data, [1, 2, 3], hq[:2])
        with pytest.raises(ValueError, match="hq must be uint8 or float"):
            degrader.submit(data, numbers, hq8.to(torch.int32))
    with pytest.raises(ValueError, match="threads must be a non-negative int, got 1.5"):
        DeviceDegrader("cpu", 1.5)


def test_pairs_degraded_in_spawned_workers():
    """WorkerDevicePairs in a spawned worker (how CUDA workers start): the pairs PairDataset makes, the LQ
    on the CPU in [0, 1], the HQ clip uint8 as the source gives it."""
    spec = ClipSpec(5, 32, 64)
    data = PairDataset(SyntheticVideos(spec), Degradation(), "inconsistent", seed=4)
    numbers = [3, 9]
    loader = torch.utils.data.DataLoader(data.on_device_in_workers("cpu"), batch_sampler=[numbers], num_workers=1,
                                         multiprocessing_context="spawn")
    (lq, hq), = list(loader)
    assert lq.dtype == torch.float32 and lq.shape == (2, 3, 5, 8, 16) and hq.dtype == torch.uint8
    for i, n in enumerate(numbers):
        want_lq, want_hq = data[n]
        assert torch.equal(lq[i] * 2 - 1, want_lq) and torch.equal(hq[i].float() / 255 * 2 - 1, want_hq)


def test_checkpointing_fit_from_probe_peaks():
    """activation_checkpointing = "auto": the fewest checkpointed blocks whose step fits the budget, from
    the probe's peak with every block checkpointed and the activations one kept block holds."""
    from oasis.train import blocks_to_checkpoint

    GiB = 2**30
    # 1 GiB per block kept, 20 GiB with all checkpointed, 10 GiB of moments still to come: 10 blocks fit
    assert blocks_to_checkpoint(30, 20 * GiB, GiB, 10 * GiB, 40 * GiB) == 20
    assert blocks_to_checkpoint(30, 20 * GiB, GiB, 0, 80 * GiB) == 0  # everything fits
    assert blocks_to_checkpoint(30, 20 * GiB, GiB, 25 * GiB, 40 * GiB) == 30  # nothing does
    assert blocks_to_checkpoint(30, 20 * GiB, 0, 0, 80 * GiB) == 30  # a probe that saw nothing decides nothing
    assert blocks_to_checkpoint(30, 20 * GiB, GiB + 1, 0, 30 * GiB) == 21  # rounds towards fitting


def test_checkpointing_over_budget_says_what_makes_room():
    """A step that does not fit even with every block checkpointed gets a warning naming what to change, and
    the loader workers' share where they degrade on the GPU (DEGRADE_WORKER_BYTES each, outside the budget)."""
    from oasis.train import over_budget_note

    GiB = 2**30
    assert over_budget_note(30 * GiB, 30 * GiB, 16) is None  # fits
    note = over_budget_note(40 * GiB, 32 * GiB, 16)
    assert note.startswith("a step checkpointing every block peaks at 40.0 GiB, above the budget of 32.0 GiB")
    assert "16 loader workers degrading on it at 2.5 GiB each" in note and 'degrade_on = "device"' in note
    plain = over_budget_note(40 * GiB, 32 * GiB, 0)
    assert "workers" not in plain and plain.endswith("a smaller batch or shorter clips make room")


def test_checkpointing_auto_settings(tmp_path):
    assert TrainConfig.__dataclass_fields__["activation_checkpointing"].default == "auto"
    t = Trainer(demo_config(tmp_path, activation_checkpointing="auto"))
    assert t.pipe.dit.activation_checkpointing == len(t.pipe.dit.blocks)  # every block until measured
    assert t.fit_checkpointing() == len(t.pipe.dit.blocks)  # on the CPU: all of them
    # where a run degraded, "auto" by the device it ran on (a resume compares these)
    assert t._degrade_place("auto", "cuda") == "device" and t._degrade_place("auto") == "workers"
    demo_config(tmp_path, activation_checkpointing="auto", compile="graphs")  # every block, no probe
    for bad in (dict(activation_checkpointing="some"), dict(memory_fraction=0.0), dict(memory_fraction=1.5)):
        with pytest.raises(ValueError):
            demo_config(tmp_path, **bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpointing_auto_on_a_gpu(tmp_path):
    """On CUDA the probes pick the count (the tiny model fits whole: none), and training runs with it."""
    t = Trainer(demo_config(tmp_path, device="cuda", activation_checkpointing="auto", stage1_steps=1, stage2_steps=1))
    history = t.run()
    assert t.pipe.dit.activation_checkpointing == 0 and len(history) == 2
