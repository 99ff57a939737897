"""The embed stage runs the exported weights eagerly: same embeddings as the TorchScript file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_dataset_zip

from imgembed.config import load_config
from imgembed.data import ImageDataset, build_transform, load_split
from imgembed.artifacts import l2_normalize
from imgembed.embed import embed_split, load_embedding_net
from imgembed.files import write_json
from imgembed.artifacts import describe_model, export_torchscript, write_model_folder
from imgembed.model import create_embedding_net, preprocessing
from imgembed.unpack import unpack_dataset

MODEL_CFG = dict(backbone="test_efficientnet", pretrained=False, weights=None, embedding_dim=8, image_size=32,
                 freeze_backbone=False, freeze_batchnorm=False, head="linear", head_hidden=[], normalize=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    zip_path = make_dataset_zip(root / "d.zip", classes=3, per_split={"train": 2, "val": 2, "test": 5}, size=40)
    unpack_dataset(zip_path, root / "d", load_config()["unpack"])
    return root / "d"


def export(folder: Path, precision: str, **overrides: object) -> Path:
    torch.manual_seed(0)
    cfg = {**MODEL_CFG, **overrides}
    net = create_embedding_net(cfg)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so they must be carried over
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    folder.mkdir(parents=True, exist_ok=True)
    description = describe_model(cfg, net.backbone.num_features, preprocessing(net.backbone, cfg["image_size"]), precision)
    write_model_folder(folder, net, cfg, description)
    return folder


def torchscript_embeddings(model_dir: Path, data_dir: Path, precision: str) -> np.ndarray:
    info = json.loads((model_dir / "model.json").read_text())
    scripted = torch.jit.load(str(model_dir / "embedding_net.pt")).eval()
    split = load_split(data_dir, "test")
    dataset = ImageDataset(split, build_transform(info, load_config()["data"], training=False), info["image_size"])
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        return l2_normalize(scripted(images).float().numpy())


@pytest.mark.parametrize("precision,head,tolerance", [("no", "linear", 1e-5), ("no", "mlp", 1e-5),
                                                      ("bf16", "linear", 5e-3), ("bf16", "mlp", 5e-3)])
def test_embed_stage_matches_the_torchscript_file(tmp_path: Path, data_dir: Path, precision: str, head: str,
                                                   tolerance: float, fresh_accelerate_state: None) -> None:
    model_dir = export(tmp_path / "model", precision, head=head, head_hidden=[12] if head == "mlp" else [])
    cfg = load_config()
    cfg["data"]["num_workers"] = 0
    embed_split(data_dir, model_dir, tmp_path / "test.npz", cfg)
    ours = np.load(tmp_path / "test.npz")["embeddings"]
    theirs = torchscript_embeddings(model_dir, data_dir, precision)
    assert ours.shape == theirs.shape == (15, 8)
    np.testing.assert_allclose(ours, theirs, atol=tolerance)
    if precision == "no":  # fp32: bit-identical (bf16 differs by about 1e-3: the order of rounding); same neighbours, to the last bit of the ranking
        assert np.array_equal(np.argsort(-ours @ ours.T, 1, kind="stable"), np.argsort(-theirs @ theirs.T, 1, kind="stable"))


def test_eager_copy_is_used_and_old_model_json_falls_back(tmp_path: Path) -> None:
    model_dir = export(tmp_path / "model", "no")
    net, _ = load_embedding_net(model_dir)
    assert not isinstance(net, torch.jit.ScriptModule)
    info = json.loads((model_dir / "model.json").read_text())
    del info["head"], info["head_hidden"]  # written before the head was recorded
    write_json(model_dir / "model.json", info)
    net, _ = load_embedding_net(model_dir)
    assert isinstance(net, torch.jit.ScriptModule)


def test_channels_last_only_on_cuda_and_never_in_the_exported_file(tmp_path: Path) -> None:
    from imgembed.model import prefer_channels_last

    net = create_embedding_net(MODEL_CFG).eval()
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    prefer_channels_last(net, torch.device("cpu"))
    assert all(w.is_contiguous() for w in convs)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = net(images)
    prefer_channels_last(net, torch.device("cuda"))  # only the layout changes; no GPU needed for that
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # 1x1 and depthwise kernels look contiguous either way
    with torch.no_grad():
        torch.testing.assert_close(net(images), before, atol=1e-5, rtol=1e-5)
    export_torchscript(net, 32, tmp_path / "net.pt")
    scripted = torch.jit.load(str(tmp_path / "net.pt"))
    assert all(t.is_contiguous() for t in scripted.state_dict().values())
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), before, atol=1e-5, rtol=1e-5)


def test_weights_that_do_not_fit_timm_fall_back_to_the_torchscript_file(tmp_path: Path, caplog) -> None:
    model_dir = export(tmp_path / "model", "no")
    info = json.loads((model_dir / "model.json").read_text())
    write_json(model_dir / "model.json", {**info, "embedding_dim": 9})  # as if timm's modules had changed
    net, _ = load_embedding_net(model_dir)
    assert isinstance(net, torch.jit.ScriptModule)
    assert "running the TorchScript file itself" in caplog.text


def test_search_embeds_exactly_like_the_embed_stage(tmp_path: Path, data_dir: Path, fresh_accelerate_state: None) -> None:
    """`imgembed search`/`index` build their preprocessing from model.json through the same
    data.build_transform as the embed stage: with the same network, the same bits."""
    from imgembed.artifacts import read_embeddings
    from imgembed.search import embed_files

    model_dir = export(tmp_path / "model", "no")
    cfg = load_config()
    cfg["data"]["num_workers"] = 0
    embed_split(data_dir, model_dir, tmp_path / "test.npz", cfg)
    stage = read_embeddings(tmp_path / "test.npz")
    net, info = load_embedding_net(model_dir)
    ours, kept = embed_files(net, info, [data_dir / p for p in stage.paths], batch_size=cfg["embed"]["batch_size"],
                             device="cpu", progress=False)
    assert kept == list(range(len(stage.paths))) and ours.dtype == stage.embeddings.dtype
    assert np.array_equal(ours, stage.embeddings)
