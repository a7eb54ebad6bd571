"""The documents cite what is in the repository; the recorded runs are named by date, card and
commit; the default test run leaves out the slow tests and pytest does not collect benchmarks/."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "ANCHORS.md",
        *sorted(RESULTS.glob("**/README.md"))]
# a repository path in backquotes or a markdown link target: benchmarks/results/x/, docs/PERF.md, ...
_PATH = re.compile(r"(?:`|\]\()((?:benchmarks|docs|tests|scripts|csrc|oasis_kernels|oasis)/[^`)\s*{}]*)")


def test_cited_paths_exist():
    missing = []
    for doc in DOCS:
        for cited in _PATH.findall(doc.read_text()):
            cited = cited.rstrip(".,;:")
            if not (ROOT / cited).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {cited}")
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


def test_anchors_are_in_the_repository():
    assert (ROOT / "benchmarks" / "ANCHORS.md").is_file()
    for doc in [*DOCS, ROOT / "benchmarks" / "attn_bench.py", ROOT / "tests" / "tolerance.py"]:
        text = doc.read_text()
        assert "shared/ANCHORS" not in text, f"{doc.relative_to(ROOT)} cites an anchors file outside the repository"
    assert "benchmarks/ANCHORS.md" in (ROOT / "README.md").read_text()
    assert "benchmarks/ANCHORS.md" in (ROOT / "benchmarks" / "attn_bench.py").read_text()


def test_result_folders_are_named_by_date_card_and_commit():
    index = (RESULTS / "README.md").read_text()
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_[a-z0-9]+_[0-9a-f]{7}", folder.name), folder.name
        assert f"`{folder.name}/`" in index, f"{folder.name} is not listed in benchmarks/results/README.md"


def test_pytest_collects_tests_only():
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert options["testpaths"] == ["tests"]
    assert all(not p.startswith("bench") for p in options["python_files"])


def test_slow_tests_are_left_out_unless_asked_for():
    def collect(*args):
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               "tests/test_sm90_compile.py", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        ids = [line for line in proc.stdout.splitlines() if "::" in line]
        return ids, proc.stdout

    ids, out = collect()
    assert not ids and "deselected" in out, out
    ids, out = collect("--runslow")
    assert len(ids) >= 2, out
