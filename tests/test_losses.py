"""Issue 16: the `train.loss` options, `train.head_epochs` and the epoch-0 candidate.

Every loss trains (tiny), resumes after an interruption to the same result as an
uninterrupted run, keeps its class weights out of the exported network, and exports a network
whose embeddings are the embed stage's. The start (epoch 0) is scored and exported when no
epoch beats it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT, TINY_CONFIG, make_dataset_zip, reset_accelerate_state

from imgembed import train as train_module
from imgembed.config import ConfigError, load_config, validate
from imgembed.data import ImageDataset, Split, build_transform, load_split
from imgembed.embed import embed_split, l2_normalize
from imgembed.objectives import CLASS_LOSSES, build_objective
from imgembed.unpack import unpack_dataset

UNPACK_CFG = {"max_uncompressed_bytes": 10**9, "max_compression_ratio": 200, "max_image_pixels": 10**8}
LOSSES = ["triplet", "multi_similarity", "arcface", "subcenter_arcface", "proxy_anchor"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    zip_path = make_dataset_zip(root / "d.zip", classes=4, per_split={"train": 8, "val": 4, "test": 4})
    unpack_dataset(zip_path, root / "d", UNPACK_CFG)
    return root / "d"


def tiny_cfg(tmp_path: Path, **train: object) -> dict:
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"train": train}))
    return load_config([ROOT / "config" / "config.yaml", TINY_CONFIG, override])


# ---- the maths ----------------------------------------------------------------------------

def test_backbone_factor_is_zero_while_the_head_trains_alone_then_warms_up_and_decays() -> None:
    cfg = {"scheduler": "cosine"}
    # 10 steps per epoch, 5 epochs, 1 warm-up epoch, 2 head epochs: the backbone starts at step 20.
    factor = [train_module.backbone_lr_factor(s, 50, 10, cfg, 10, head_steps=20) for s in range(50)]
    assert factor[:20] == [0.0] * 20
    assert factor[20] == pytest.approx(0.1) and factor[29] == pytest.approx(1.0)  # warm-up over its first epoch
    assert factor[30] == pytest.approx(1.0) and factor[40] == pytest.approx(0.5)  # cosine over the 20 steps left
    assert train_module.backbone_lr_factor(5, 50, 10, cfg, 10, head_steps=0) == train_module.lr_factor(5, 50, 10, cfg, 10)


def test_head_epochs_auto_and_its_limits() -> None:
    from imgembed import runtime

    def resolve(train: dict, model: dict) -> dict:
        return runtime.resolve_train_cfg({"loss": "triplet", "lr": 0.001, "backbone_lr": 0.0005, **train}, model)

    pretrained = {"pretrained": True, "freeze_backbone": False}
    assert resolve({"head_epochs": "auto", "epochs": 10}, pretrained)["head_epochs"] == runtime.AUTO_HEAD_EPOCHS
    assert resolve({"head_epochs": "auto", "epochs": 10}, {**pretrained, "pretrained": False})["head_epochs"] == 0
    assert resolve({"head_epochs": 3, "epochs": 10}, {**pretrained, "freeze_backbone": True})["head_epochs"] == 0
    assert resolve({"head_epochs": 30, "epochs": 10}, pretrained)["head_epochs"] == 10
    assert [train_module.is_head_epoch(e, 2) for e in range(5)] == [True, True, True, False, False]
    assert not train_module.is_head_epoch(0, 0)


def test_training_labels_are_renumbered_in_order() -> None:
    split = Split(root=Path("."), paths=["a", "b", "c", "d"], labels=np.array([4, 0, 8, 4]), classes=list("abcdefghi"))
    assert train_module.contiguous_labels(split).labels.tolist() == [1, 0, 2, 1]


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_gives_a_finite_loss_with_gradients(loss: str) -> None:
    cfg = load_config()["train"] | {"loss": loss}
    objective = build_objective(cfg, num_classes=3, embedding_dim=8)
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(12, 8), dim=1).requires_grad_()
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in fp32 whatever the caller's autocast
        value, count = objective(embeddings, labels)
    assert value.dtype == torch.float32 and torch.isfinite(value) and value.item() > 0 and count > 0
    value.backward()
    assert embeddings.grad.abs().sum() > 0
    assert (len(list(objective.parameters())) > 0) == (loss in CLASS_LOSSES)
    assert objective.has_val_loss == (loss not in CLASS_LOSSES)


# ---- the config -----------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,message", [
    ("loss", "cosface", r"train\.loss"),
    ("head_epochs", -1, r"train\.head_epochs"),
    ("head_epochs", "always", r"train\.head_epochs"),
    ("loss_lr", 0, r"train\.loss_lr"),
    ("arcface", {"margin": 28.6}, r"scale"),
    ("subcenter_arcface", {"margin": 28.6, "scale": 64, "sub_centers": 0}, r"sub_centers"),
    ("proxy_anchor", {"margin": 0.1, "alpha": 32, "beta": 1}, r"beta"),
])
def test_schema_rejects_bad_loss_settings(key: str, value: object, message: str) -> None:
    cfg = load_config()
    cfg["train"][key] = value
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_default_config_holds_the_library_defaults() -> None:
    train = load_config()["train"]
    assert train["arcface"] == {"margin": 28.6, "scale": 64}
    assert train["subcenter_arcface"] == {"margin": 28.6, "scale": 64, "sub_centers": 3}
    assert train["proxy_anchor"] == {"margin": 0.1, "alpha": 32}
    assert train["multi_similarity"] == {"alpha": 2, "beta": 50, "base": 0.5, "miner_epsilon": 0.1}


# ---- training runs --------------------------------------------------------------------------

def exported_embeddings(model_dir: Path, data_dir: Path, cfg: dict) -> np.ndarray:
    info = json.loads((model_dir / "model.json").read_text())
    scripted = torch.jit.load(str(model_dir / "embedding_net.pt")).eval()
    split = load_split(data_dir, "test")
    dataset = ImageDataset(split, build_transform(info, cfg["data"], training=False), info["image_size"])
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.inference_mode():
        return l2_normalize(scripted(images).float().numpy())


@pytest.mark.parametrize("loss,head_epochs", [(name, 0) for name in LOSSES] + [("arcface", 1), ("triplet", 1)])
def test_loss_trains_resumes_and_exports_the_net_alone(tmp_path: Path, data_dir: Path, loss: str, head_epochs: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted in epoch 2 (after epoch 1's checkpoint; with head_epochs 1, right after the
    switch to fine-tuning), the rerun resumes and ends exactly where an uninterrupted run ends."""
    cfg = tiny_cfg(tmp_path, loss=loss, head_epochs=head_epochs, epochs=3, mixed_precision="no")
    reference = train_module.train_model(data_dir, tmp_path / "reference", tmp_path / "live_ref", cfg)
    assert [r["epoch"] for r in reference["history"]] == [0, 1, 2, 3]
    assert all(np.isfinite(r["train/loss"]) for r in reference["history"][1:])
    assert ("val/loss" in reference["history"][1]) == (loss not in CLASS_LOSSES)

    original = train_module.run_epoch

    def killed_in_epoch_2(epoch, *args, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt  # stands in for a kill: the last checkpoint is epoch 1's
        return original(epoch, *args, **kwargs)

    reset_accelerate_state()
    monkeypatch.setattr(train_module, "run_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_module.train_model(data_dir, tmp_path / "victim", tmp_path / "live_victim", cfg)
    monkeypatch.setattr(train_module, "run_epoch", original)
    reset_accelerate_state()
    resumed = train_module.train_model(data_dir, tmp_path / "victim", tmp_path / "live_victim", cfg)

    strip = [{k: v for k, v in r.items() if k != "train/images_per_s"} for r in resumed["history"]]
    assert strip == [{k: v for k, v in r.items() if k != "train/images_per_s"} for r in reference["history"]]
    a = torch.load(tmp_path / "reference/checkpoints/best.pt", weights_only=True)
    b = torch.load(tmp_path / "victim/checkpoints/best.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The class weights are checkpointed (a second prepared model) but are not in the exported net.
    saved_models = sorted(p.name for p in (tmp_path / "victim/checkpoints/last").iterdir() if p.name.startswith("model"))
    assert len(saved_models) == (2 if loss in CLASS_LOSSES else 1), saved_models
    scripted = torch.jit.load(str(tmp_path / "victim/embedding_net.pt"))
    assert not any("loss" in k or "W" == k.split(".")[-1] for k in scripted.state_dict())
    info = json.loads((tmp_path / "victim/model.json").read_text())
    assert (info["loss"], info["head_epochs"]) == (loss, head_epochs)
    # The embed stage's embeddings are the exported network's.
    embed_split(data_dir, tmp_path / "victim", tmp_path / "test.npz", cfg)
    ours = np.load(tmp_path / "test.npz")["embeddings"]
    np.testing.assert_allclose(ours, exported_embeddings(tmp_path / "victim", data_dir, cfg), atol=1e-5)


def test_the_start_is_exported_when_no_epoch_beats_it(tmp_path: Path, data_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """Training that only makes things worse (here: every epoch zeroes the head) exports the start."""
    cfg = tiny_cfg(tmp_path, epochs=2, mixed_precision="no")
    original = train_module.run_epoch
    start_weights = {}

    def ruinous(epoch, model, *args, **kwargs):
        net = model.net if hasattr(model, "net") else model
        if not start_weights:
            start_weights.update({k: v.clone() for k, v in net.state_dict().items()})
        result = original(epoch, model, *args, **kwargs)
        with torch.no_grad():
            for p in net.head.parameters():
                p.zero_()  # every embedding the same: retrieval at chance
        return result

    monkeypatch.setattr(train_module, "run_epoch", ruinous)
    with caplog.at_level(logging.INFO, logger="imgembed"):
        state = train_module.train_model(data_dir, tmp_path / "model", tmp_path / "live", cfg)
    assert state["best_epoch"] == 0 and state["history"][0]["epoch"] == 0
    assert state["best_map_at_5"] == state["history"][0]["val/map_at_5"]
    assert all(r["val/map_at_5"] < state["best_map_at_5"] for r in state["history"][1:])
    assert f"no epoch beat the starting weights (val mP@5 {state['best_map_at_5']:.3f}); exporting the start" in caplog.text
    info = json.loads((tmp_path / "model/model.json").read_text())
    assert info["best_epoch"] == 0 and info["start_val_map_at_5"] == info["best_val_map_at_5"]
    best = torch.load(tmp_path / "model/checkpoints/best.pt", weights_only=True)
    assert all(torch.equal(best[k], start_weights[k]) for k in start_weights)
    # DVCLive: the val curve starts at step 0 (the start), the train curve at step 1.
    val_rows = (tmp_path / "live/plots/metrics/val/map_at_5.tsv").read_text().splitlines()[1:]
    train_rows = (tmp_path / "live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    assert [r.split("\t")[0] for r in val_rows] == ["0", "1", "2"] and [r.split("\t")[0] for r in train_rows] == ["1", "2"]


def test_an_epoch_that_beats_the_start_is_exported(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Val mP@5 0.2 at the start, then 0.5 and 0.4: epoch 1 is the best, and its weights are exported."""
    cfg = tiny_cfg(tmp_path, epochs=2, mixed_precision="no")
    scores = iter([0.2, 0.5, 0.4])
    original = train_module.evaluate_embeddings
    monkeypatch.setattr(train_module, "evaluate_embeddings",
                        lambda *a, **k: original(*a, **k) | {"map_at_5": next(scores)})
    original_epoch, after_epoch_1 = train_module.run_epoch, {}

    def recording(epoch, model, *args, **kwargs):
        result = original_epoch(epoch, model, *args, **kwargs)
        if epoch == 1:
            after_epoch_1.update({k: v.clone() for k, v in model.state_dict().items()})
        return result

    monkeypatch.setattr(train_module, "run_epoch", recording)
    state = train_module.train_model(data_dir, tmp_path / "model", tmp_path / "live", cfg)
    assert (state["best_epoch"], state["best_map_at_5"]) == (1, 0.5)
    assert [r["val/map_at_5"] for r in state["history"]] == [0.2, 0.5, 0.4]
    best = torch.load(tmp_path / "model/checkpoints/best.pt", weights_only=True)
    assert all(torch.equal(best[k], after_epoch_1[k]) for k in best)


def test_unseen_class_zip(tmp_path: Path) -> None:
    """bench/unseen_classes.py: even classes train, odd ones split between val and test."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from unseen_classes import write_unseen_zip

    source = make_dataset_zip(tmp_path / "d.zip", classes=5, per_split={"train": 4, "val": 2, "test": 2})
    counts = write_unseen_zip(source, tmp_path / "u.zip")
    assert counts == {"train": (3, 24), "val": (2, 8), "test": (2, 8)}
    unpack_dataset(tmp_path / "u.zip", tmp_path / "u", UNPACK_CFG)
    splits = {s: load_split(tmp_path / "u", s) for s in ("train", "val", "test")}
    classes = {s: {split.classes[i] for i in split.labels} for s, split in splits.items()}
    assert classes["train"] == {"class_0", "class_2", "class_4"} and classes["val"] == classes["test"] == {"class_1", "class_3"}
    assert not set(splits["val"].paths) & set(splits["test"].paths)
    again = write_unseen_zip(source, tmp_path / "u2.zip")
    assert again == counts and (tmp_path / "u.zip").read_bytes() == (tmp_path / "u2.zip").read_bytes()
