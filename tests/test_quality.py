"""The siamese-triplet preset, the baseline rows and the quality bench (tiny settings, CPU, about a minute)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, TINY_CONFIG, make_dataset_zip
from imgembed.baseline import baseline_rows, pca_reduce, raw_pixels, score
from imgembed.config import load_config
from imgembed.data import load_split
from imgembed.evaluate import compare_with_baseline
from imgembed.unpack import unpack_dataset

CONFIG = ROOT / "config" / "config.yaml"


def test_siamese_triplet_preset_validates_and_is_that_recipe():
    cfg = load_config([CONFIG, ROOT / "config" / "siamese_triplet.yaml"])
    model, data, train = cfg["model"], cfg["data"], cfg["train"]
    assert model["freeze_backbone"] and model["head"] == "mlp" and model["head_hidden"] == [712, 256]
    assert model["normalize"] is False and data["augment"] is False
    assert train["loss"] == "triplet" and train["miner"] == "random" and train["loss_margin"] == 5.0 and train["distance"] == "squared_euclidean"
    assert train["optimizer"] == "adam" and train["lr"] == 0.001 and train["scheduler"] == "step"


def test_default_recipe_is_the_tuned_one():
    from imgembed.runtime import resolve_train_cfg

    cfg = load_config([CONFIG])
    assert cfg["model"]["normalize"] and not cfg["model"]["freeze_backbone"] and cfg["model"]["embedding_dim"] == 256
    assert cfg["train"]["miner"] in ("semihard", "hard") and cfg["train"]["loss_margin"] < 1
    for pretrained, loss in ((True, "arcface"), (False, "triplet")):  # bench/README.md, "Unseen classes"
        train = resolve_train_cfg(cfg["train"], {**cfg["model"], "pretrained": pretrained})
        assert train["loss"] == loss and 0 < train["backbone_lr"] < train["lr"]
    assert cfg["train"]["warmup_epochs"] >= 1
    assert cfg["train"]["max_seconds"] == 0 and cfg["model"]["freeze_batchnorm"] == "auto"


def test_freeze_batchnorm_auto_follows_pretrained():
    from imgembed.runtime import resolve_model_cfg

    model = load_config([CONFIG])["model"]
    assert resolve_model_cfg({**model, "pretrained": True})["freeze_batchnorm"] is True
    assert resolve_model_cfg({**model, "pretrained": False})["freeze_batchnorm"] is False
    assert resolve_model_cfg({**model, "pretrained": True, "freeze_batchnorm": False})["freeze_batchnorm"] is False


def test_guie_preset_validates_alone_and_with_siamese_triplet():
    cfg = load_config([CONFIG, ROOT / "config" / "guie.yaml", ROOT / "config" / "siamese_triplet.yaml"])
    assert cfg["datasets"] == ["baseline_split"] and cfg["model"]["backbone"] == "efficientnet_b3"
    assert cfg["model"]["pretrained"] and cfg["model"]["image_size"] == 224 and cfg["model"]["embedding_dim"] == 64
    assert load_config([CONFIG, ROOT / "config" / "guie.yaml"])["train"]["miner"] != "random"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("quality")
    zip_path = make_dataset_zip(tmp / "tiny.zip", classes=4, per_split={"train": 8, "val": 4, "test": 4})
    unpack_dataset(zip_path, tmp / "data", load_config([CONFIG])["unpack"])
    return tmp / "data"


def test_raw_pixels_and_score(tiny_data):
    split = load_split(tiny_data, "test")
    x = raw_pixels(split, size=8)
    assert x.shape == (16, 8 * 8 * 3) and 0 <= x.min() and x.max() <= 1
    metrics = score(x, split.labels)
    assert metrics["num_queries"] == 16 and metrics["map_at_5"] > 0.9  # the generated classes differ in colour


def test_score_is_exact_on_separated_vectors():
    labels = np.repeat(np.arange(3), 4)
    vectors = np.eye(3)[labels] + 0.01 * np.random.RandomState(0).randn(12, 3)
    assert score(vectors, labels)["map_at_r"] == pytest.approx(1.0)


def test_pca_reduce_fits_on_train_and_caps_the_dimension():
    rng = np.random.RandomState(0)
    train, query = rng.randn(20, 10), rng.randn(5, 10)
    assert pca_reduce(train, query, 4).shape == (5, 4)
    assert pca_reduce(train[:3], query, 8).shape == (5, 3)


def test_baseline_rows_on_a_tiny_dataset(tiny_data):
    cfg = load_config([CONFIG, TINY_CONFIG])
    rows = baseline_rows(tiny_data, cfg)
    assert set(rows) == {"raw_pixels", "backbone", "backbone_pca"}
    assert rows["backbone"]["features"] > rows["backbone_pca"]["dim"] or rows["backbone_pca"]["dim"] == 16
    for metrics in rows.values():
        assert 0 <= metrics["map_at_5"] <= 1 and metrics["num_queries"] == 16
    again = baseline_rows(tiny_data, cfg, rows=("backbone",))  # a random-init backbone is seeded
    assert again["backbone"]["map_at_r"] == rows["backbone"]["map_at_r"]


def test_evaluate_compares_with_baseline(tmp_path):
    (tmp_path / "baseline.json").write_text(json.dumps({"raw_pixels": {"precision_at_1": 0.5, "map_at_5": 0.4, "map_at_r": 0.3}}))
    rows = compare_with_baseline({"precision_at_1": 0.9, "map_at_5": 0.8, "map_at_r": 0.7}, tmp_path / "baseline.json")
    assert list(rows) == ["trained", "raw_pixels"] and rows["raw_pixels"]["map_at_5"] == 0.4


def test_bench_quality_end_to_end(tmp_path):
    """Both recipes and the baselines on a tiny zip; a 1 ms budget is spent in any case by the end of epoch 1."""
    zip_path = make_dataset_zip(tmp_path / "tiny.zip", classes=4, per_split={"train": 8, "val": 4, "test": 4})
    cmd = [sys.executable, str(ROOT / "bench" / "bench_quality.py"), "--zip", str(zip_path), "--backbone", "test_efficientnet",
           "--budget-seconds", "0.001", "--image-size", "32", "--configfile", str(TINY_CONFIG), "--no-probe",
           "--json", str(tmp_path / "rows.json")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("RATIO quality ")
    float(lines[-1].split()[-1])
    rows = {row["row"]: row for row in json.loads((tmp_path / "rows.json").read_text())}
    assert set(rows) == {"raw_pixels", "backbone", "backbone_pca", "siamese_triplet", "default"}
    assert rows["siamese_triplet"]["epochs"] == 1 and rows["default"]["epochs"] == 1  # train.max_seconds stopped both
    assert all(0 <= row["map_at_5"] <= 1 for row in rows.values())


def test_bench_quality_unseen_classes_with_seeds(tmp_path):
    """--unseen trains on half the classes and tests on the others; --seeds gives mean and spread."""
    zip_path = make_dataset_zip(tmp_path / "tiny.zip", classes=6, per_split={"train": 6, "val": 3, "test": 3})
    cmd = [sys.executable, str(ROOT / "bench" / "bench_quality.py"), "--zip", str(zip_path), "--backbone", "test_efficientnet",
           "--budget-seconds", "0.001", "--image-size", "32", "--configfile", str(TINY_CONFIG), "--no-probe",
           "--only", "default", "--unseen", "--seeds", "1", "2", "--workdir", str(tmp_path / "work"),
           "--json", str(tmp_path / "rows.json")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(unseen classes)" in result.stdout and "vs untrained" in result.stdout
    manifest = json.loads((tmp_path / "work/data/manifest.json").read_text())
    train_labels = {item["label"] for item in manifest["splits"]["train"]}
    test_labels = {item["label"] for item in manifest["splits"]["test"]}
    assert train_labels and test_labels and not train_labels & test_labels
    rows = {row["row"]: row for row in json.loads((tmp_path / "rows.json").read_text())}
    default = rows["default"]
    assert default["seeds"] == [1, 2] and len(default["runs"]) == 2
    assert default["map_at_5"] == pytest.approx(sum(r["map_at_5"] for r in default["runs"]) / 2)
    assert default["map_at_5_spread"] == pytest.approx(abs(default["runs"][0]["map_at_5"] - default["runs"][1]["map_at_5"]))


def test_augment_auto_follows_pretrained():
    from imgembed.runtime import resolve_data_cfg

    data, labels = load_config()["data"], np.repeat(np.arange(10), 5)
    assert data["augment"] is False  # the default recipes were measured without crops (bench/README.md)
    data = {**data, "augment": "auto"}
    assert resolve_data_cfg(data, {"pretrained": True}, labels)["augment"] is True
    assert resolve_data_cfg(data, {"pretrained": False}, labels)["augment"] is False
    assert resolve_data_cfg({**data, "augment": True}, {"pretrained": False}, labels)["augment"] is True


@pytest.mark.parametrize(("class_sizes", "expected"), [
    ([100] * 10, (8, 4)),  # the sample digits: the 8 x 4 batches it always had
    ([30] * 5, (5, 4)),  # a first small dataset of 5 classes
    ([30, 30, 3], (3, 3)),  # the smallest class fills only 3 places without repeating an image
    ([2, 50], (2, 2)),
])
def test_batch_layout_auto_adapts_to_the_training_split(class_sizes, expected):
    from imgembed.runtime import resolve_data_cfg

    labels = np.repeat(np.arange(len(class_sizes)), class_sizes)
    data = resolve_data_cfg(load_config()["data"], {"pretrained": False}, labels)
    assert (data["classes_per_batch"], data["samples_per_class"]) == expected


def test_explicit_batch_layout_is_kept():
    from imgembed.runtime import resolve_data_cfg

    data = {**load_config()["data"], "classes_per_batch": 3, "samples_per_class": 6}
    resolved = resolve_data_cfg(data, {"pretrained": False}, np.repeat(np.arange(5), 4))
    assert (resolved["classes_per_batch"], resolved["samples_per_class"]) == (3, 6)


def test_transform_refuses_unresolved_augment():
    from imgembed.data import build_transform

    info = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(AssertionError, match="resolve data.augment"):
        build_transform(info, {**load_config()["data"], "augment": "auto"}, training=True)
