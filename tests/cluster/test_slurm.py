"""The workflow through a real SLURM cluster: `snakemake --profile profiles/slurm` (issue 13).

tests/cluster/cluster.sh starts a one-node cluster on this machine (root and Debian's slurm-wlm
and munge needed; skipped with the reason otherwise). The run adds tests/cluster/profile, which
only fits the resources to this node. Checked: every rule ran as a SLURM job that completed,
the jobs carry the profile's partition, CPUs, memory, time limit and the training job's GPU,
the metrics equal those of a local `snakemake --cores 2` run with the same settings, and
`multi_gpu` training asks for two GPUs on one node and runs two processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, copy_project, make_dataset_zip

pytestmark = pytest.mark.e2e
CLUSTER = ROOT / "tests" / "cluster" / "cluster.sh"
OVERRIDE = ROOT / "tests" / "cluster" / "profile"
RULES = {"unpack", "baseline", "train", "embed", "evaluate", "plot", "charts"}
# train.accelerate: gpu asks SLURM for one GPU (the cluster has two pretend ones); with no CUDA
# visible, accelerate then trains on the CPU, as in the local run.
SETTINGS = {"datasets": ["tiny"], "train": {"accelerate": "gpu"}}


@pytest.fixture(scope="module")
def cluster():
    """The cluster of cluster.sh: started for these tests and stopped after them, unless it was
    already up (CI starts it before pytest)."""
    if shutil.which("sbatch") is None or os.geteuid() != 0:
        pytest.skip("needs root and a SLURM install: apt-get install -y slurm-wlm munge")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("needs Snakemake's SLURM executor plugin: pip install -e '.[slurm]'")
    was_up = subprocess.run([str(CLUSTER), "status"], capture_output=True).returncode == 0
    if not was_up:
        started = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
        if started.returncode != 0:
            pytest.skip(f"the test cluster did not start: {started.stderr.strip()[-500:]}")
    yield
    if not was_up:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, timeout=120)


def project_with_data(folder: Path) -> Path:
    project = copy_project(folder)
    make_dataset_zip(project / "data" / "tiny.zip", classes=3, per_split={"train": 8, "val": 4, "test": 4})
    (project / "config" / "test.yaml").write_text(yaml.safe_dump(SETTINGS))
    return project


def snakemake(project: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", *args, "--configfile", "config/config.yaml", "tests/fixtures/tiny.yaml",
           "config/test.yaml"]
    result = subprocess.run(cmd, cwd=project, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def slurm_jobs(workdir: Path) -> list[dict[str, str]]:
    """Every job slurmctld still knows (MinJobAge is an hour) that ran in `workdir`."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=True).stdout
    jobs = [dict(field.split("=", 1) for field in line.split() if "=" in field) for line in out.splitlines()]
    return [job for job in jobs if job.get("WorkDir") == str(workdir)]


def test_workflow_runs_as_slurm_jobs_with_the_profiles_resources(cluster, tmp_path):
    project = project_with_data(tmp_path / "slurm")
    run = snakemake(project, "--profile", "profiles/slurm", "--profile", str(OVERRIDE))
    assert "submitted with SLURM jobid" in run.stdout + run.stderr

    jobs = {job["Comment"].split("_wildcards_")[0].removeprefix("rule_"): job for job in slurm_jobs(project)}
    assert set(jobs) == RULES, jobs.keys()
    assert all(job["JobState"] == "COMPLETED" for job in jobs.values()), {r: j["JobState"] for r, j in jobs.items()}
    assert all(job["Partition"] == "main" for job in jobs.values())
    train, embed, unpack = jobs["train"], jobs["embed"], jobs["unpack"]
    # set-resources train (tests/cluster/profile), its threads capped by cores: 2, one GPU per process.
    assert (train["NumCPUs"], train["MinMemoryNode"], train["TimeLimit"]) == ("2", "4000M", "01:00:00")
    assert train["TresPerJob"] == "gres:gpu:1"
    assert embed["TresPerJob"] == "gres:gpu:1" and embed["NumCPUs"] == "2"
    # default-resources and the rule's own memory, no GPU.
    assert (unpack["NumCPUs"], unpack["MinMemoryNode"], unpack["TimeLimit"]) == ("1", "2000M", "00:30:00")
    assert "TresPerJob" not in unpack

    local = project_with_data(tmp_path / "local")
    snakemake(local, "--cores", "2")
    metrics = json.loads((project / "reports/tiny/metrics.json").read_text())
    assert metrics == json.loads((local / "reports/tiny/metrics.json").read_text())
    log = (project / "logs/train/tiny.log").read_text()
    assert "on cpu x1 (2 threads each)" in log  # the same threads as the local run: the same numbers

    # Several GPUs on one node: multi_gpu.yaml's 2 processes ask for --gpus=2 --nodes=1, and the
    # job starts both processes (here they find no CUDA and join on the CPU).
    (project / "config" / "test.yaml").write_text(yaml.safe_dump({**SETTINGS, "train": {"accelerate": "multi_gpu"}}))
    before = {job["JobId"] for job in slurm_jobs(project)}
    snakemake(project, "models/tiny/embedding_net.pt", "--profile", "profiles/slurm", "--profile", str(OVERRIDE))
    [train] = [job for job in slurm_jobs(project) if job["JobId"] not in before]
    assert train["Comment"].startswith("rule_train") and train["JobState"] == "COMPLETED"
    assert (train["TresPerJob"], train["NumNodes"]) == ("gres:gpu:2", "1")
    assert "on cpu x2" in (project / "logs/train/tiny.log").read_text()
