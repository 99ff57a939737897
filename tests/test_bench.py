"""Every speed benchmark in bench/ runs on tiny settings and ends with its `RATIO` line.

Only that they run and report is checked here; the figures themselves are measured by running
the scripts alone on a quiet machine (bench/README.md) and never asserted in tests.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.e2e  # each script runs the real stages (about 90 s for all six)

TINY_TRAINING = ["--backbone", "test_efficientnet", "--image-size", "32", "--classes", "3", "--classes-per-batch", "3",
                 "--samples-per-class", "2", "--train-per-class", "4", "--val-per-class", "2", "--num-workers", "0"]
CASES = {
    "train": [*TINY_TRAINING, "--epochs", "2"],
    "loader": [*TINY_TRAINING, "--epochs", "2", "--loader-seconds", "0.1"],
    "frozen": [*TINY_TRAINING, "--epochs", "2"],
    "embed": ["--backbone", "test_efficientnet", "--image-size", "32", "--classes", "3", "--test-per-class", "4",
              "--batch-size", "8", "--num-workers", "0", "--repeats", "2"],
    "evaluate": ["--num", "5000", "--per-class", "10", "--reference-queries", "256"],
    "overhead": ["--repeats", "1"],
}
VALUES = {"train": 1, "loader": 1, "frozen": 1, "embed": 1, "evaluate": 2, "overhead": 2}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_and_reports(name, tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / f"bench_{name}.py"), *CASES[name], "--workdir", str(tmp_path / "work")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1].split()
    assert last[:2] == ["RATIO", name] and len(last) == 2 + VALUES[name], last
    values = [float(v) for v in last[2:]]
    assert all(v > 0 for v in values), values  # a rate, a time or a memory figure: never zero
