"""benchmarks/gpu_check.sh --dry-run on this machine: the plumbing of the one-call GPU check
(stages in order, a verdict per stage in summary.txt, the log, at most 6 files, the deadline)
without a GPU or a build."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["env", "build", "smoke", "memcheck", "racecheck", "synccheck", "bench", "tests"]
MAX_FILES = 6  # what one device call brings back, with room to spare (at most 8)


def dry_run(out, *args, **env):
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env})


def verdicts(out):
    """(stage, verdict text) per line of summary.txt that is a verdict (details are indented)."""
    lines = (out / "summary.txt").read_text().splitlines()
    return [re.match(r"\[(\w+)\] (.*)", line).groups() for line in lines if not line.startswith("  ")]


def test_dry_run_gives_every_stage_a_verdict_in_order(tmp_path):
    result = dry_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= MAX_FILES and {"summary.txt", "gpu_check.log"} <= set(files), files
    stages = verdicts(tmp_path)
    assert [name for name, _ in stages] == STAGES
    assert stages[0][1].startswith("PASS"), stages[0]  # env runs for real, GPU or not
    for name, text in stages[1:]:  # every other stage takes its skip path and says why
        assert re.fullmatch(r"SKIPPED \(.+\)", text), (name, text)
        assert "out of time" not in text, (name, text)
    # The log holds everything printed, and the summary is printed last.
    summary = (tmp_path / "summary.txt").read_text()
    assert result.stdout.endswith(summary)
    assert (tmp_path / "gpu_check.log").read_text() == result.stdout + result.stderr


def test_a_tiny_deadline_skips_the_later_stages_out_of_time(tmp_path):
    result = dry_run(tmp_path, DEADLINE="30")
    assert result.returncode == 1, "a stage that did not run for lack of time is no pass"
    stages = verdicts(tmp_path)
    assert [name for name, _ in stages] == STAGES
    assert stages[0][1].startswith("PASS"), stages[0]
    for name, text in stages[1:]:
        assert text.startswith("SKIPPED (out of time"), (name, text)
        limit, needs = map(int, re.search(r"(\d+)s left for it, needs (\d+)s", text).groups())
        assert limit < needs, (name, text)


def test_stages_after_a_failed_build_skip_with_that_reason(tmp_path):
    """A real run (not dry) whose build cannot even configure (a build folder that cannot exist):
    the build fails, every later stage says why it did not run, and the command fails. An nvcc
    stand-in on PATH makes the build start where no CUDA toolkit is installed."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    (bin_dir / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "nvcc").chmod(0o755)
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OUT": str(out), "PYTHON": sys.executable,
                                 "BUILD_DIR": "/dev/null/build", "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 1, result.stdout
    stages = verdicts(out)
    assert [name for name, _ in stages] == STAGES
    assert stages[1][1].startswith("FAIL"), stages[1]
    for name, text in stages[2:]:
        assert text.startswith("SKIPPED (the build did not pass: FAIL"), (name, text)


def test_a_stage_not_selected_says_so(tmp_path):
    result = dry_run(tmp_path, STAGES="env bench")
    assert result.returncode == 0, result.stdout + result.stderr
    stages = dict(verdicts(tmp_path))
    assert stages["env"].startswith("PASS") and "not selected" not in stages["bench"]
    assert all(stages[name] == "SKIPPED (not selected)" for name in STAGES if name not in ("env", "bench"))


def test_bad_arguments_exit_2(tmp_path):
    assert dry_run(tmp_path, "--bogus").returncode == 2
    assert dry_run(tmp_path, DEADLINE="soon").returncode == 2


def test_smoke_table_on_the_cpu_core(tmp_path):
    """benchmarks/gpu_smoke.py's table on the CPU (its --device cpu self-check): one line per case
    of the cpu core, both shapes, padded and packed, causal and not, each within docs/design.md
    §8's rule (error / tolerance ≤ 1), the same lines in --out, and a summary that counts them."""
    table = tmp_path / "smoke.txt"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--device", "cpu",
                             "--cores", "cpu", "--out", str(table)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("cpu ")]
    assert len(lines) == 2 * 2 * 2  # shapes x layouts x causal
    for shape in ("(192,128)", "(96,64)"):
        for layout in ("padded", "packed"):
            for causal in (0, 1):
                assert sum(f"{shape} {layout} causal={causal}" in line for line in lines) == 1
    for line in lines:
        ratio = float(re.search(r"= (\S+)\s+PASS$", line).group(1))
        assert ratio <= 1, line
    assert table.read_text().splitlines() == result.stdout.splitlines()
    assert f"smoke {len(lines)} pass, 0 fail, 0 declined" in result.stdout.splitlines()[-1]
