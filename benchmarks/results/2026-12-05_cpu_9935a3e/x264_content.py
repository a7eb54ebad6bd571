"""x264's pace on what it is given (the development machine: 2 cores, no GPU): 48 frames of 720p written
by oasis.video.VideoWriter (libx264, crf 18, its thread settings), uniform noise (what a random-weight
model restores) against a smooth moving gradient (what restored video is like); median of two rounds.
The figures behind docs/PERF.md entry 22's outcome."""
import json, os, statistics, sys, time

import numpy as np

from oasis.video import VideoWriter

rng = np.random.default_rng(0)
noise = rng.integers(0, 256, (48, 720, 1280, 3), dtype=np.uint8)
yy, xx = np.mgrid[0:720, 0:1280]
smooth = np.stack([np.stack([(xx + 4 * t) % 256, (yy + 2 * t) % 256, (xx + yy + 8 * t) % 256], -1).astype(np.uint8)
                   for t in range(48)])
res = {"commit": os.environ.get("OASIS_COMMIT"), "cpus": os.cpu_count(), "frames": 48, "size": [1280, 720], "crf": 18}
for name, frames in (("noise", noise), ("smooth gradient", smooth)):
    runs = []
    for _ in range(2):
        start = time.perf_counter()
        with VideoWriter("/tmp/x264_content.mp4", 1280, 720, 24, crf=18) as out:
            out.write(frames)
        runs.append(time.perf_counter() - start)
    res[name] = {"s": statistics.median(runs), "runs_s": runs, "frames_per_s": 48 / statistics.median(runs)}
json.dump(res, sys.stdout, indent=1)
