"""imgembed.artifacts: the model folder's one writer and one reader agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from imgembed.artifacts import (MODEL_FILE, MODEL_INFO_FILE, describe_model, load_model, model_config,
                                write_model_folder)
from imgembed.export import ONNX_FILE
from imgembed.model import create_embedding_net, preprocessing

MODEL_CFG = dict(backbone="test_efficientnet", pretrained=False, weights=None, embedding_dim=8, image_size=32,
                 freeze_backbone=False, freeze_batchnorm=False, head="mlp", head_hidden=[12], normalize=True,
                 export_onnx=False)


def test_describe_model_takes_plain_inputs() -> None:
    prep = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    info = describe_model(MODEL_CFG, 40, prep, "bf16")
    assert info["file"] == MODEL_FILE and info["format"] == "torchscript"
    assert (info["backbone_features"], info["embedding_dim"], info["head_hidden"], info["precision"]) == (40, 8, [12], "bf16")
    assert {key: info[key] for key in prep} == prep
    assert describe_model({**MODEL_CFG, "head": "linear"}, 40, prep, "no")["head_hidden"] == []  # unused by a linear head


def test_write_model_folder_round_trips_through_load_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = create_embedding_net(MODEL_CFG).eval()
    (tmp_path / ONNX_FILE).write_bytes(b"from an earlier run")  # export_onnx is off: it must go
    description = describe_model(MODEL_CFG, net.backbone.num_features, preprocessing(net.backbone, 32), "no")
    write_model_folder(tmp_path, net, MODEL_CFG, description, {"best_epoch": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MODEL_FILE, MODEL_INFO_FILE])
    written = json.loads((tmp_path / MODEL_INFO_FILE).read_text())
    assert written == {**description, "best_epoch": 3}
    assert list(written)[-1] == "best_epoch"  # the network's description first, then how it was trained

    loaded, info = load_model(tmp_path)
    assert info == written
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), net(images), atol=1e-5, rtol=1e-5)
    rebuilt = model_config(info)  # the inverse of describe_model rebuilds the same modules
    assert {key: rebuilt[key] for key in ("backbone", "embedding_dim", "head", "head_hidden", "normalize", "image_size")} == \
        {key: MODEL_CFG[key] for key in ("backbone", "embedding_dim", "head", "head_hidden", "normalize", "image_size")}


def test_load_model_names_the_missing_file(tmp_path: Path) -> None:
    from imgembed.errors import UserError

    with pytest.raises(UserError, match=MODEL_INFO_FILE):
        load_model(tmp_path)
