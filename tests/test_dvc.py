"""DVC runs the pipeline: `dvc repro` in a fresh git + DVC clone, then an experiment.

The fast tests check the declarations (the baseline import file, metrics and plots); the e2e
test runs the real `dvc` commands that README's "Versioning with DVC" shows, on a generated
dataset with the tiny model settings of tests/fixtures/tiny.yaml.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import ROOT, copy_clone, make_dataset_zip

METRIC_KEYS = ("precision_at_1", "map_at_5", "map_at_r", "recall_at_1", "recall_at_5", "recall_at_10")
LIVE_METRICS = ("train/loss", "val/loss", "val/precision_at_1", "val/map_at_5", "train/lr")
PIPELINE = ("unpack", "baseline", "train", "embed", "evaluate", "plot", "charts")
IMPORT_FILE = "data/baseline_split.zip.dvc"


def dvc_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python, accelerate
    env.update(DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site-cache"),
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    return env


def execute(project: Path, env: dict[str, str], *cmd: str) -> subprocess.CompletedProcess:
    if cmd[0] == "dvc":
        cmd = (sys.executable, "-m", "dvc", *cmd[1:])
    result = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def run(project: Path, env: dict[str, str], *cmd: str) -> str:
    result = execute(project, env, *cmd)
    return result.stdout + result.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def dvc_json(project: Path, env: dict[str, str], *args: str):
    return json.loads(execute(project, env, "dvc", *args, "--json").stdout)


# ---- declarations (fast) --------------------------------------------------------------------

def test_baseline_import_file_is_what_dvc_import_writes(tmp_path):
    """The committed import file loads as a frozen repo import, its stage checksum matches,
    and DVC writes it back byte for byte (the format `dvc import` produces)."""
    from dvc.repo import Repo

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    shutil.copy2(ROOT / IMPORT_FILE, project / IMPORT_FILE)
    Repo.init(str(project), no_scm=True)
    with Repo(str(project)) as repo:
        (stage,) = repo.stage.collect(str(project / IMPORT_FILE))
        assert stage.is_repo_import and stage.frozen
        assert stage.md5 == stage.compute_md5()  # else DVC reports "changed checksum"
        dep, out = stage.deps[0], stage.outs[0]
        assert dep.def_path == "data/baseline_split.zip"
        assert dep.def_repo == {"url": "https://github.com/iterative/google-kaggle-competition-data-pipeline",
                                "rev_lock": "f0951bbc7820ff43b583f9a9ba5ec7a30def870d"}
        assert (out.def_path, out.hash_info.value, out.meta.size) == (
            "baseline_split.zip", "a10dceec1b22b1b3f4bc08e549ddf978", 292752584)
        before = (project / IMPORT_FILE).read_bytes()
        stage.dump()
        assert (project / IMPORT_FILE).read_bytes() == before


def test_dvc_yaml_declares_metrics_and_plots():
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = dvc_yaml["stages"]
    assert all(stages[name]["foreach"] == "${datasets}" for name in PIPELINE)
    assert stages["evaluate"]["do"]["metrics"] == [{"reports/${item}/metrics.json": {"cache": False}}]
    assert stages["train"]["do"]["plots"] == [{"reports/${item}/train/plots/metrics": {"x": "step"}}]
    assert stages["plot"]["do"]["plots"] == ["reports/${item}/plots/embedding.png", "reports/${item}/plots/retrievals.png"]
    assert stages["charts"]["do"]["plots"] == [f"reports/${{item}}/plots/{name}.png" for name in ("training", "comparison", "per_class")]
    # Top-level plots draw train and val curves together (DVCLive writes them to separate files).
    combined = {name: spec for entry in dvc_yaml["plots"] for name, spec in entry.items()}
    assert list(combined["loss (train and val)"]["y"]) == [
        "reports/${datasets[0]}/train/plots/metrics/train/loss.tsv", "reports/${datasets[0]}/train/plots/metrics/val/loss.tsv"]
    declared = json.dumps(stages)
    assert "checkpoints" not in declared  # left to train.py, so they survive a failed run
    assert "${train.accelerate}" in stages["train"]["do"]["cmd"]


# ---- the real thing (minutes) ---------------------------------------------------------------

def make_clone(tmp_path: Path, env: dict[str, str]) -> tuple[Path, dict]:
    """A git + DVC repository as a user's clone has it, with a tiny dataset and the tiny settings
    written into config/config.yaml (the DVC commands read only that file)."""
    project = tmp_path / "project"
    config = copy_clone(project)
    classes = max(3, config["data"]["classes_per_batch"])
    run(project, env, "git", "init", "-q")
    run(project, env, "git", "add", "-A")
    run(project, env, "git", "commit", "-qm", "the project")
    run(project, env, "dvc", "init", "-q")
    run(project, env, "git", "add", "-A")
    run(project, env, "git", "commit", "-qm", "dvc init")
    return project, {"classes": classes, "test_images": classes * 4, "dim": config["model"]["embedding_dim"]}


def check_outputs(project: Path, env: dict[str, str], shape: dict) -> None:
    import torch

    manifest = json.loads((project / "data/tiny/manifest.json").read_text())
    assert len(manifest["classes"]) == shape["classes"]
    info = json.loads((project / "models/tiny/model.json").read_text())
    net = torch.jit.load(str(project / "models/tiny/embedding_net.pt"))
    assert net(torch.zeros(2, 3, info["image_size"], info["image_size"])).shape == (2, shape["dim"])
    assert (project / "models/tiny/checkpoints/state.json").is_file()  # undeclared, kept for resuming
    with np.load(project / "embeddings/tiny/test.npz") as npz:
        assert npz["embeddings"].shape == (shape["test_images"], shape["dim"])
        assert npz["labels"].shape == (shape["test_images"],)
    metrics = json.loads((project / "reports/tiny/metrics.json").read_text())
    for key in METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert json.loads((project / "reports/tiny/per_class.json").read_text())
    comparison = json.loads((project / "reports/tiny/baseline_comparison.json").read_text())
    assert list(comparison) == ["trained", "raw_pixels", "backbone", "backbone_pca"]
    for name in ("embedding.png", "retrievals.png"):
        png = (project / "reports/tiny/plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000, name
    live = project / "reports/tiny/train"
    for name in LIVE_METRICS:
        assert (live / "plots/metrics" / f"{name}.tsv").is_file(), name

    # DVC tracks everything DVCLive wrote into Snakemake's directory output reports/tiny/train.
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = [o["path"] for o in lock["stages"]["train@tiny"]["outs"]]
    for path in live.rglob("*"):
        rel = path.relative_to(project).as_posix()
        assert path.is_dir() or any(rel == o or rel.startswith(o + "/") for o in outs), rel

    # `dvc metrics show` and `dvc plots show`: the test metrics, the curves and both pictures.
    shown = dvc_json(project, env, "metrics", "show")
    assert set(shown[""]["data"]["reports/tiny/metrics.json"]["data"]) >= set(METRIC_KEYS)
    plots = dvc_json(project, env, "plots", "show", "-o", str(project.parent / "dvc_plots"))
    assert not plots.get("errors"), plots.get("errors")
    drawn = set(plots["data"])
    assert {f"reports/tiny/train/plots/metrics/{name}.tsv" for name in LIVE_METRICS} <= drawn
    assert {"reports/tiny/plots/embedding.png", "reports/tiny/plots/retrievals.png"} <= drawn
    assert {f"reports/tiny/plots/{name}.png" for name in ("training", "comparison", "per_class")} <= drawn
    # The combined definitions: train and val loss of the run in one plot.
    files = {row["filename"] for row in plots["data"]["loss (train and val)"][0]["content"]["data"]["values"]}
    assert files == {"train/loss.tsv", "val/loss.tsv"}


def check_up_to_date(project: Path, env: dict[str, str]) -> None:
    assert dvc_json(project, env, "status", "dvc.yaml") == {}
    # The baseline import is not fetched; `dvc status` says so instead of failing (--no-updates:
    # without it DVC asks the import's source repo for updates, which needs internet).
    assert dvc_json(project, env, "status", "--no-updates") == {
        IMPORT_FILE: [{"changed outs": {"data/baseline_split.zip": "not in cache"}}]}
    assert dvc_json(project, env, "data", "status")["not_in_cache"] == ["data/baseline_split.zip"]


@pytest.mark.e2e
def test_dvc_repro_and_experiment(tmp_path):
    env = dvc_env(tmp_path)
    project, shape = make_clone(tmp_path, env)
    dvc_yaml = (project / "dvc.yaml").read_bytes()
    # Your own dataset: the zip in data/, tracked by DVC (config/config.yaml lists it already).
    make_dataset_zip(project / "data" / "tiny.zip", classes=shape["classes"], per_split={"train": 8, "val": 4, "test": 4})
    run(project, env, "dvc", "add", "data/tiny.zip")
    run(project, env, "git", "add", "data/tiny.zip.dvc")
    run(project, env, "git", "commit", "-qm", "tiny dataset")
    assert not run(project, env, "git", "status", "--porcelain").strip()  # the zip itself is git-ignored

    first = run(project, env, "dvc", "repro")
    assert ran_stages(first) == {"sample", *(f"{name}@tiny" for name in PIPELINE)}
    check_outputs(project, env, shape)
    check_up_to_date(project, env)
    # DVCLive inside `dvc repro`: no experiment, no edits to dvc.yaml.
    assert run(project, env, "dvc", "exp", "list", "--name-only").strip() == ""
    assert (project / "dvc.yaml").read_bytes() == dvc_yaml

    again = run(project, env, "dvc", "repro")
    assert ran_stages(again) == set() and "Data and pipelines are up to date" in again

    run(project, env, "git", "add", "dvc.lock", "reports/tiny/metrics.json")
    run(project, env, "git", "commit", "-qm", "tiny run")
    assert not run(project, env, "git", "status", "--porcelain").strip()  # outputs are ignored or committed
    untouched = {p: (project / p).stat().st_mtime_ns for p in ("data/sample.zip", "data/tiny/manifest.json")}

    # One training setting changed: train and everything after it reruns; sample, unpack and
    # the no-training baseline (which reads only train.seed and train.mixed_precision) don't.
    untouched["reports/tiny/baseline.json"] = (project / "reports/tiny/baseline.json").stat().st_mtime_ns
    embeddings_before = (project / "embeddings/tiny/test.npz").read_bytes()
    exp = run(project, env, "dvc", "exp", "run", "-S", "config/config.yaml:train.lr=0.002", "dvc.yaml")
    # train, embed and charts (the curves) rerun; evaluate and plot rerun when the embeddings
    # changed: on this easy data the start (epoch 0) can win again, and then the exported net and
    # its embeddings are byte-identical, so DVC rightly leaves what reads only them.
    downstream = {"evaluate", "plot"} if (project / "embeddings/tiny/test.npz").read_bytes() != embeddings_before else set()
    assert ran_stages(exp) == {f"{name}@tiny" for name in ("train", "embed", "charts", *downstream)}
    assert {p: (project / p).stat().st_mtime_ns for p in untouched} == untouched
    assert (project / "dvc.yaml").read_bytes() == dvc_yaml
    assert len(run(project, env, "dvc", "exp", "list", "--name-only").split()) == 1  # just this one
    changed = dvc_json(project, env, "params", "diff")
    assert list(changed) == ["config/config.yaml"] and list(changed["config/config.yaml"]) == ["train.lr"]
    assert changed["config/config.yaml"]["train.lr"]["new"] == 0.002
    check_outputs(project, env, shape)
    assert dvc_json(project, env, "status", "dvc.yaml") == {}
    # The experiment keeps its metrics (git-tracked, cache: false), so `dvc exp show` compares them.
    (baseline,) = [row for row in dvc_json(project, env, "exp", "show") if row["rev"] != "workspace"]
    (experiment,) = baseline["experiments"]
    metrics = experiment["revs"][0]["data"]["metrics"]["reports/tiny/metrics.json"]["data"]
    assert set(metrics) >= set(METRIC_KEYS)
    # `dvc plots diff` overlays the committed run and the experiment's curves.
    name = run(project, env, "dvc", "exp", "list", "--name-only").split()[0]
    diff = dvc_json(project, env, "plots", "diff", "HEAD", name)  # (--targets fails on the directory plot: DVC 3.67)
    revs = {row["rev"] for row in diff["data"]["loss (train and val)"][0]["content"]["data"]["values"]}
    assert revs == {"HEAD", name}
