"""End to end: a first small dataset (5 classes) trains with the default batch layout, and
`snakemake --report` after that --configfile run gives a page with every section."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import TINY_CONFIG, copy_project, make_dataset_zip

pytestmark = pytest.mark.e2e

# What the report must show for each dataset: the figure labels given to report() in
# workflow/rules/, and a phrase of each caption (workflow/report/*.rst).
SECTIONS = {
    "test metrics": "Test metrics of the trained model",
    "did training help?": "Did training help on",
    "training curves": "The dotted vertical line marks the best epoch",
    "embedding map": "coloured by class",
    "retrieval gallery": "same class as the query",
    "per-class P@1": "worst class at the top",
}


def run(project: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=project, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_report_of_a_five_class_run(tmp_path):
    project = copy_project(tmp_path / "project")
    make_dataset_zip(project / "data" / "five.zip", classes=5, per_split={"train": 6, "val": 3, "test": 3})
    # tiny.yaml fixes the batch layout for speed; this run goes back to the default (auto).
    (project / "config" / "five.yaml").write_text(yaml.safe_dump({
        "datasets": ["five"], "data": {"classes_per_batch": "auto", "samples_per_class": "auto"}}))
    configs = ["--configfile", "config/config.yaml", str(TINY_CONFIG.relative_to(TINY_CONFIG.parents[2])),
               "config/five.yaml"]
    run(project, "--cores", "2", *configs)
    train_log = (project / "logs/train/five.log").read_text()
    assert "data.classes_per_batch auto: 5" in train_log and "data.samples_per_class auto: 4" in train_log

    run(project, "--report", "report.html", *configs)  # cores come from the default profile
    page = (project / "report.html").read_text(encoding="utf-8")
    for label, caption in SECTIONS.items():
        assert label in page, label
        assert caption in page, caption
    for name in ("training.png", "comparison.png", "per_class.png", "embedding.png", "retrievals.png", "metrics.html"):
        assert name in page, name
    assert "five" in page  # the dataset's category


def test_unlock_works_as_snakemake_tells_it(tmp_path):
    """A snakemake run killed outright leaves its lock; the next run says to use `--unlock`, and
    that exact command works (without --cores: rules that use every core count one then)."""
    project = copy_project(tmp_path / "project")
    target = "data/sample.zip"
    started = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1", target], cwd=project,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (project / "logs" / "sample.log").exists():  # the job runs: the lock is taken
        assert started.poll() is None and time.monotonic() < deadline, "the sample job did not start"
        time.sleep(0.2)
    os.killpg(started.pid, signal.SIGKILL)  # power loss, OOM killer, CI timeout
    started.wait()

    locked = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", target], cwd=project, capture_output=True,
                            text=True, timeout=300)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    run(project, "--unlock")
    run(project, "--cores", "1", target)
    assert (project / target).is_file()
