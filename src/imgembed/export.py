"""ONNX export of the embedding network, beside the TorchScript file (model.export_onnx).

Uses PyTorch's TorchScript-based exporter, which needs only the `onnx` package (the newer
torch.export-based one also needs onnxscript). The file takes float32 NCHW `images` with a
dynamic batch axis and gives `embeddings`; model.json records the file, opset and names.
Whether onnx is installed is checked when training starts, not after hours of training.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgembed.errors import UserError
from imgembed.files import atomic_path

log = logging.getLogger("imgembed")

ONNX_FILE = "embedding_net.onnx"
ONNX_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"


def onnx_enabled(model_cfg: dict[str, Any]) -> bool:
    return bool(model_cfg.get("export_onnx", False))


def require_onnx(model_cfg: dict[str, Any]) -> None:
    """Fail at once, with the fix, when the export is asked for but cannot happen."""
    if not onnx_enabled(model_cfg):
        return
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError(
            "model.export_onnx is true but the onnx package is not installed; "
            "pip install 'imgembed[search]' (or onnx), or set model.export_onnx: false"
        ) from None


def export_onnx(net: nn.Module, image_size: int, path: Path, opset: int = ONNX_OPSET) -> dict[str, Any]:
    """Write `net` (fp32, CPU, eval) as ONNX with a dynamic batch axis; return model.json's entries."""
    require_onnx({"export_onnx": True})
    net = net.eval().float().cpu()
    example = torch.zeros(2, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy (TorchScript-based) exporter
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            net, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
        import onnx

        onnx.checker.check_model(str(tmp))
        _verify(net, tmp, image_size)
    return {"onnx_file": Path(path).name, "onnx_opset": opset, "onnx_input": INPUT_NAME, "onnx_output": OUTPUT_NAME}


def _verify(net: nn.Module, path: Path, image_size: int) -> None:
    """With onnxruntime installed, warn if the file disagrees with PyTorch on a random batch."""
    if importlib.util.find_spec("onnxruntime") is None:
        return
    import onnxruntime

    x = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    with torch.no_grad():
        want = net(x).numpy()
    diff = float(np.abs(got - want).max())
    if diff > 1e-4:
        log.warning("ONNX export: onnxruntime differs from PyTorch by up to %.2g on a random batch", diff)


def export_for_config(net: nn.Module, model_cfg: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """The export that model.export_onnx asks for; when off, remove an ONNX file left by an earlier run
    (it would not match the new embedding_net.pt). Returns the entries to add to model.json."""
    path = Path(model_dir) / ONNX_FILE
    if not onnx_enabled(model_cfg):
        path.unlink(missing_ok=True)
        return {}
    entries = export_onnx(net, int(model_cfg["image_size"]), path)
    log.info("ONNX export: %s (opset %d, dynamic batch)", path, entries["onnx_opset"])
    return entries
