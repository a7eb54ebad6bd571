#!/usr/bin/env bash
# libx264's round trip repeated in one process (tests/test_oasis_degrade.py::test_video_roundtrip_is_the_same_every_time,
# after the file's other round-trip tests, as CI runs them): 6 runs of the tree as it is (mbtree=0), and 6 of a
# copy whose video_roundtrip keeps x264's macroblock tree; then valgrind on a bare encode loop with and without it.
# Run from the repository root with its .venv; prints one line per variant and the valgrind counts.
set -uo pipefail
tree=$(mktemp -d); git archive HEAD | tar -x -C "$tree"
sed -i 's/options={"x264-params": "mbtree=0"} if codec == "libx264" else {}/options={}/' "$tree/oasis/degrade.py"
for variant in ".:without the macroblock tree (mbtree=0)" "$tree:with x264's macroblock tree"; do
    where=${variant%%:*}; passed=0
    for i in 1 2 3 4 5 6; do
        (cd "$where" && PYTHONPATH=$PWD "$OLDPWD/.venv/bin/python" -m pytest -q -p no:cacheprovider \
            tests/test_oasis_degrade.py -k roundtrip > /dev/null 2>&1) && passed=$((passed + 1))
    done
    echo "${variant#*:}: the round-trip tests passed in $passed of 6 runs"
done
cat > "$tree/vg.py" <<'PY'
import io, os, av, numpy as np
def rt(frames, codec, bitrate, opts):
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4" if codec == "libx264" else "avi") as out:
        s = out.add_stream(codec, rate=25, options=opts if codec == "libx264" else {})
        s.width, s.height, s.pix_fmt, s.bit_rate = frames.shape[2], frames.shape[1], "yuv420p", bitrate
        s.codec_context.thread_count = 1
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")): out.mux(p)
        for p in s.encode(): out.mux(p)
opts = {"x264-params": os.environ["X264P"]} if os.environ.get("X264P") else {}
rng = np.random.default_rng(1)
pre = rng.integers(0, 255, (4, 30, 46, 3), dtype=np.uint8); clip = rng.integers(0, 255, (5, 20, 40, 3), dtype=np.uint8)
rt(pre, "libx264", 5000, opts); rt(pre, "mpeg4", 5000, opts); rt(clip, "libx264", 20000, opts); rt(clip, "libx264", 20000, opts)
PY
for p in "" "mbtree=0"; do
    X264P="$p" valgrind --tool=memcheck --error-limit=no .venv/bin/python "$tree/vg.py" > "$tree/vg.log" 2>&1
    echo "valgrind, x264-params '${p:-(defaults)}': $(grep -c 'Use of uninitialised\|Conditional jump' "$tree/vg.log") reports of uninitialised values, $(grep -c 'libx264' "$tree/vg.log") stack lines in libx264"
done
rm -rf "$tree"
