"""End to end: the real `snakemake` on a generated dataset with timm's test_efficientnet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml

from helpers import TINY_CONFIG, copy_project, make_dataset_zip

pytestmark = pytest.mark.e2e
METRIC_KEYS = ("precision_at_1", "map_at_5", "map_at_r", "recall_at_1", "recall_at_5", "recall_at_10")


def snakemake(project: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    result = subprocess.run(cmd, cwd=project, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def write_override(project: Path, name: str, data: dict) -> str:
    path = project / "config" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path.relative_to(project))


def check_outputs(project: Path, dataset: str, classes: int, test_images: int, embedding_dim: int,
                  val_loss: bool = True) -> dict:
    """Every output of a finished run; `val_loss` False for a classification loss (ArcFace...), which logs none."""
    manifest = json.loads((project / f"data/{dataset}/manifest.json").read_text())
    assert len(manifest["classes"]) == classes
    assert sum(manifest["counts"]["test"].values()) == test_images

    model_dir = project / f"models/{dataset}"
    info = json.loads((model_dir / "model.json").read_text())
    assert info["embedding_dim"] == embedding_dim and info["image_size"] > 0
    assert len(info["mean"]) == 3 and len(info["std"]) == 3
    net = torch.jit.load(str(model_dir / "embedding_net.pt"))
    out = net(torch.zeros(3, 3, info["image_size"], info["image_size"]))
    assert out.shape == (3, embedding_dim)
    # A plain fp32 graph: accelerate's autocast wrapper must not be traced into the export.
    assert "bfloat16" not in str(net.inlined_graph)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    assert (model_dir / "checkpoints" / "best.pt").is_file()

    with np.load(project / f"embeddings/{dataset}/test.npz") as npz:
        emb, labels, names, paths = npz["embeddings"], npz["labels"], npz["class_names"], npz["paths"]
    assert emb.dtype == np.float32 and emb.shape == (test_images, embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert labels.dtype == np.int64 and len(names) == classes
    assert all((project / f"data/{dataset}" / p).is_file() for p in paths)

    metrics = json.loads((project / f"reports/{dataset}/metrics.json").read_text())
    for key in METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
    per_class = json.loads((project / f"reports/{dataset}/per_class.json").read_text())
    assert set(per_class) == set(str(n) for n in names)
    # The rows without training beside the trained model, so the report shows whether training helped.
    comparison = json.loads((project / f"reports/{dataset}/baseline_comparison.json").read_text())
    assert list(comparison) == ["trained", "raw_pixels", "backbone", "backbone_pca"]
    assert comparison["trained"]["map_at_5"] == metrics["map_at_5"]
    assert all(0.0 <= row[key] <= 1.0 for row in comparison.values() for key in ("precision_at_1", "map_at_5", "map_at_r"))

    live = project / f"reports/{dataset}/train"
    for name in ("train/loss", "val/loss", "val/precision_at_1", "val/map_at_5", "train/lr"):
        assert (live / "plots" / "metrics" / f"{name}.tsv").is_file() == (val_loss or name != "val/loss"), name
    assert (live / "params.yaml").is_file()
    for name in ("embedding.png", "retrievals.png"):
        png = project / f"reports/{dataset}/plots/{name}"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for rule in ("unpack", "baseline", "train", "embed", "evaluate", "plot"):
        assert (project / f"logs/{rule}/{dataset}.log").stat().st_size > 0, rule
    return metrics


def test_snakemake_end_to_end(tmp_path):
    project = copy_project(tmp_path / "project")
    make_dataset_zip(project / "data" / "tiny.zip", classes=3, per_split={"train": 8, "val": 4, "test": 4})
    override = write_override(project, "test", {"datasets": ["tiny"]})
    configs = ["--configfile", "config/config.yaml", str(TINY_CONFIG.relative_to(TINY_CONFIG.parents[2])), override]
    snakemake(project, *configs)
    check_outputs(project, "tiny", classes=3, test_images=12, embedding_dim=16)

    # Nothing changed: a second run does no work.
    again = snakemake(project, *configs, "--dry-run")
    assert "Nothing to be done" in again.stdout + again.stderr

    # Changing a plotting setting reruns only the plot rule.
    plots = write_override(project, "test", {"datasets": ["tiny"], "plots": {"method": "pca"}})
    dry = snakemake(project, *configs[:-1], plots, "--dry-run", "--quiet", "rules")
    ran = dry.stdout + dry.stderr
    assert "plot" in ran and not any(f"{rule} " in ran for rule in ("train", "unpack", "embed", "evaluate"))


def test_snakemake_with_local_weights_file(tmp_path):
    project = copy_project(tmp_path / "project")
    make_dataset_zip(project / "data" / "tiny.zip", classes=2, per_split={"train": 6, "val": 3, "test": 3})
    weights = project / "weights.pth"
    reference = timm.create_model("test_efficientnet", pretrained=False)
    torch.save(reference.state_dict(), weights)
    override = write_override(project, "test", {
        "datasets": ["tiny"],
        "model": {"pretrained": True, "weights": str(weights), "freeze_backbone": True},
        "data": {"augment": False, "classes_per_batch": 2},
        "train": {"epochs": 1},
    })
    snakemake(project, "--configfile", "config/config.yaml", "tests/fixtures/tiny.yaml", override)
    check_outputs(project, "tiny", classes=2, test_images=6, embedding_dim=16, val_loss=False)  # pretrained: ArcFace
    info = json.loads((project / "models/tiny/model.json").read_text())
    assert info["pretrained"] is True and info["weights"] == str(weights)
    # The frozen backbone inside the exported net is exactly the weights file.
    state = torch.load(project / "models/tiny/checkpoints/best.pt", weights_only=True)
    for key, value in reference.state_dict().items():
        if not key.startswith("classifier"):
            assert torch.equal(state[f"backbone.{key}"], value), key


def test_snakemake_default_recipe_from_pretrained_weights_is_arcface_head_first(tmp_path):
    """The `auto` recipe a real user gets (issue 16): ArcFace, the head alone on cached features,
    then the backbone at 1e-4; model.json and the log say what `auto` chose."""
    project = copy_project(tmp_path / "project")
    make_dataset_zip(project / "data" / "tiny.zip", classes=3, per_split={"train": 8, "val": 4, "test": 4})
    weights = project / "weights.pth"
    torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), weights)
    override = write_override(project, "test", {
        "datasets": ["tiny"], "model": {"pretrained": True, "weights": str(weights)}, "train": {"epochs": 3}})
    snakemake(project, "--configfile", "config/config.yaml", "tests/fixtures/tiny.yaml", override)
    check_outputs(project, "tiny", classes=3, test_images=12, embedding_dim=16, val_loss=False)
    info = json.loads((project / "models/tiny/model.json").read_text())
    assert (info["loss"], info["head_epochs"]) == ("arcface", 2)
    log = (project / "logs" / "train" / "tiny.log").read_text()
    assert "loss arcface, lr 0.0003 (backbone 0.0001), 3 epochs (the first 2 on the head alone), cached backbone features" in log
    assert "now fine-tuning the backbone too" in log
    # The training curves without a val loss (ArcFace knows only the training classes).
    assert (project / "reports/tiny/plots/training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_dataset_zip_stops_with_dvc_hint(tmp_path):
    project = copy_project(tmp_path / "project")
    (project / "data" / "baseline_split.zip.dvc").write_text("outs:\n- path: baseline_split.zip\n")
    override = write_override(project, "test", {"datasets": ["baseline_split"]})
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-n", "--configfile",
                             "config/config.yaml", override], cwd=project, capture_output=True, text=True)
    assert result.returncode != 0
    assert "data/baseline_split.zip is missing" in result.stderr and "dvc pull" in result.stderr
