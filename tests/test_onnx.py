"""ONNX export: onnxruntime gives PyTorch's embeddings; a missing onnx fails at training start."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY_CONFIG
from imgembed.config import DEFAULT_CONFIG, load_config
from imgembed.errors import UserError
from imgembed.export import ONNX_FILE, ONNX_OPSET, export_for_config, export_onnx, require_onnx
from imgembed.model import create_embedding_net

ROOT = Path(__file__).resolve().parents[1]
MODEL_CFG = dict(backbone="test_efficientnet", pretrained=False, weights=None, embedding_dim=16, image_size=32,
                 freeze_backbone=False, freeze_batchnorm=False, head="mlp", head_hidden=[24], normalize=True)


@pytest.fixture(scope="module")
def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_embedding_net(MODEL_CFG).eval()


def test_onnxruntime_matches_pytorch(tiny_net: torch.nn.Module, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / ONNX_FILE
    entries = export_onnx(tiny_net, 32, path)
    assert entries == {"onnx_file": ONNX_FILE, "onnx_opset": ONNX_OPSET, "onnx_input": "images", "onnx_output": "embeddings"}
    model = onnx.load(str(path))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {ONNX_OPSET}
    assert [p.name for p in tmp_path.iterdir()] == [ONNX_FILE]  # no temp files left behind
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 5):  # not the export's batch of 2: the batch axis is dynamic
        x = torch.randn(batch, 3, 32, 32, generator=generator)
        got = session.run(["embeddings"], {"images": x.numpy()})[0]
        with torch.no_grad():
            want = tiny_net(x).numpy()
        assert got.shape == (batch, 16)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_export_for_config_follows_the_switch(tiny_net: torch.nn.Module, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    entries = export_for_config(tiny_net, {**MODEL_CFG, "export_onnx": True}, tmp_path)
    assert entries["onnx_opset"] == ONNX_OPSET and (tmp_path / ONNX_FILE).is_file()
    # Turned off, a file from an earlier run is removed: it would not match the new embedding_net.pt.
    assert export_for_config(tiny_net, {**MODEL_CFG, "export_onnx": False}, tmp_path) == {}
    assert not (tmp_path / ONNX_FILE).exists()
    assert export_for_config(tiny_net, MODEL_CFG, tmp_path) == {}  # a config without the key: off


def test_default_config_has_the_switch_off() -> None:
    cfg = load_config([ROOT / DEFAULT_CONFIG, TINY_CONFIG])
    assert cfg["model"]["export_onnx"] is False


def test_missing_onnx_fails_when_training_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    require_onnx({"export_onnx": False})  # off: nothing needed
    with pytest.raises(UserError, match=r"model.export_onnx is true but the onnx package is not installed; pip install"):
        require_onnx({"export_onnx": True})

    from imgembed.train import train_model

    cfg = load_config([ROOT / DEFAULT_CONFIG, TINY_CONFIG])
    cfg["model"]["export_onnx"] = True
    # The data folder does not even exist: the onnx check comes first, before any work.
    with pytest.raises(UserError, match="onnx package is not installed"):
        train_model(tmp_path / "no-data", tmp_path / "model", tmp_path / "live", cfg)
