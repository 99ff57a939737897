"""What crosses stage boundaries: the model folder and the embeddings file, one reader each.

* The model folder (models/D/): ``embedding_net.pt`` (TorchScript, fp32), ``model.json`` (what
  the network expects and was trained with: `describe_model`) and, with model.export_onnx,
  ``embedding_net.onnx`` (imgembed.export). `write_model_folder` is the one writer (train) and
  `load_model` the one reader (embed, search and index), with one set of checks.
* The embeddings file (embeddings/D/test.npz, or an index of `imgembed index`): L2-normalised
  float32 embeddings with their labels, class names and image paths, plus the folder the paths
  start from when known. `write_embeddings` is its one writer (embed, index, bench_evaluate) and
  `read_embeddings` its one reader (evaluate, plots, search), with one validation.

No stage logic lives here, so every stage can import it without importing another stage.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgembed.errors import UserError
from imgembed.export import export_for_config
from imgembed.files import atomic_path, write_json

MODEL_FILE = "embedding_net.pt"
MODEL_INFO_FILE = "model.json"
# model.json keys every reader relies on (preprocessing and the embedding size).
MODEL_INFO_REQUIRED = ("image_size", "mean", "std", "embedding_dim")
# Arrays of an embeddings file; ROOT_KEY is optional (indexes built from a folder record it).
EMBEDDING_KEYS = ("embeddings", "labels", "class_names", "paths")
ROOT_KEY = "root"


# ---- the model folder ------------------------------------------------------------------------

def describe_model(model_cfg: dict[str, Any], backbone_features: int, preprocessing: dict[str, Any],
                   precision: str) -> dict[str, Any]:
    """What model.json records about the network: enough to use embedding_net.pt without this
    project's code. `preprocessing` is model.preprocessing's image_size, mean, std, interpolation;
    `precision` the one training validated with."""
    return {
        "format": "torchscript",
        "file": MODEL_FILE,
        "backbone": model_cfg["backbone"],
        "backbone_features": int(backbone_features),
        "pretrained": bool(model_cfg["pretrained"]),
        "weights": model_cfg["weights"],
        "embedding_dim": int(model_cfg["embedding_dim"]),
        "normalized": bool(model_cfg["normalize"]),
        "head": model_cfg["head"],
        "head_hidden": [int(v) for v in model_cfg["head_hidden"]] if model_cfg["head"] == "mlp" else [],
        **preprocessing,
        "input": "float32 NCHW RGB, values scaled to [0, 1], then (x - mean) / std; resize the "
                 "shorter side to image_size and centre-crop",
        "precision": precision,
    }


def write_model_folder(model_dir: Path, net: torch.nn.Module, model_cfg: dict[str, Any], description: dict[str, Any],
                       training: dict[str, Any] | None = None) -> None:
    """Export `net` into model_dir: embedding_net.pt, the ONNX file model.export_onnx asks for
    (an old one is removed when it is off), then model.json, written last: the network's
    `description` (describe_model), the ONNX entries and what `training` records (best epoch,
    timings). Each file is written atomically."""
    model_dir = Path(model_dir)
    export_torchscript(net, int(description["image_size"]), model_dir / MODEL_FILE)
    onnx_entries = export_for_config(net, model_cfg, model_dir)
    write_json(model_dir / MODEL_INFO_FILE, {**description, **onnx_entries, **(training or {})})


def export_torchscript(net: torch.nn.Module, image_size: int, path: Path) -> None:
    """Trace in fp32 on the CPU so the file loads anywhere with plain PyTorch."""
    net = net.eval().float().cpu().to(memory_format=torch.contiguous_format)  # plain NCHW weights in the file
    example = torch.zeros(2, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but TorchScript is the original pipeline's format.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(net, example)
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp))


def load_model(model_dir: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The exported network (eval mode, on the CPU) and its model.json, or a one-line UserError."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such model folder; train one first (or pass --model models/<dataset>)")
    info = read_model_info(model_dir)
    net_file = model_dir / str(info.get("file", MODEL_FILE))
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated, but TorchScript is the exported format
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(net_file), map_location="cpu")
    except ValueError:  # torch.jit.load's "does not exist" for a missing file
        raise UserError(f"{model_dir}: no trained model there ({net_file.name} missing); run the train stage first") from None
    except RuntimeError as err:
        raise UserError(f"{net_file}: not a TorchScript model ({str(err).strip().splitlines()[0][:200]})") from None
    return net.eval(), info


def read_model_info(model_dir: Path) -> dict[str, Any]:
    """model.json, checked for the keys every reader needs."""
    info_file = Path(model_dir) / MODEL_INFO_FILE
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{model_dir}: no trained model there ({MODEL_INFO_FILE} missing); run the train stage first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{info_file}: not valid JSON ({err})") from None
    missing = [key for key in MODEL_INFO_REQUIRED if not isinstance(info, dict) or key not in info]
    if missing:
        raise UserError(f"{info_file}: not an imgembed model description (missing {', '.join(missing)})")
    return info


def model_config(info: dict[str, Any]) -> dict[str, Any]:
    """The `model` config section that rebuilds the exported network's modules (random weights):
    the inverse of describe_model, for loading the exported weights into eager modules."""
    return {
        "backbone": info["backbone"], "pretrained": False, "weights": None,
        "embedding_dim": int(info["embedding_dim"]), "head": info["head"], "head_hidden": list(info["head_hidden"]),
        "normalize": bool(info["normalized"]), "freeze_backbone": False, "freeze_batchnorm": False,
        "image_size": int(info["image_size"]),
    }


# ---- the embeddings file ---------------------------------------------------------------------

def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): how every embeddings file stores vectors."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Embeddings:
    """The contents of an embeddings file."""

    embeddings: np.ndarray  # N x D float32, L2-normalised
    labels: np.ndarray  # N int64, positions in class_names
    class_names: list[str]
    paths: list[str]  # relative to root (POSIX separators)
    root: Path | None = None  # where the paths start; None when unknown

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def class_of(self, i: int) -> str:
        label = int(self.labels[i])
        return self.class_names[label] if 0 <= label < len(self.class_names) else ""


def write_embeddings(path: Path, embeddings: np.ndarray, labels: np.ndarray, class_names: list[str],
                     paths: list[str], root: Path | None = None) -> None:
    """Atomically; `root` is recorded when given."""
    arrays: dict[str, np.ndarray] = dict(
        embeddings=np.asarray(embeddings).astype(np.float32), labels=np.asarray(labels).astype(np.int64),
        class_names=np.array(class_names, dtype=str), paths=np.array(paths, dtype=str),
    )
    if root is not None:
        arrays[ROOT_KEY] = np.array(str(root))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # np.savez would append .npz to a bare temp name
            np.savez(handle, **arrays)


def read_embeddings(path: Path, if_missing: str = "file not found; run the embed stage first",
                    kind: str = "embeddings file") -> Embeddings:
    """An embeddings file, checked; `if_missing` (the missing-file error) and `kind` (the file's
    name in errors) say it as the calling command's user knows it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in EMBEDDING_KEYS if key not in data.files]
            if missing:
                raise UserError(f"{path}: not an embeddings index (missing {', '.join(missing)}); "
                                "make one with `imgembed index FOLDER` or the embed stage")
            found = Embeddings(
                embeddings=np.asarray(data["embeddings"], dtype=np.float32),
                labels=np.asarray(data["labels"], dtype=np.int64),
                class_names=[str(c) for c in data["class_names"]],
                paths=[str(p) for p in data["paths"]],
                root=Path(str(data[ROOT_KEY])) if ROOT_KEY in data.files else None,
            )
    except FileNotFoundError:
        raise UserError(f"{path}: {if_missing}") from None
    except (OSError, ValueError, EOFError) as err:  # not a zip / truncated / pickled objects
        raise UserError(f"{path}: not a readable {kind} ({str(err).strip().splitlines()[0][:200]})") from None
    if found.embeddings.ndim != 2 or len(found.labels) != len(found.embeddings) or len(found.paths) != len(found.embeddings):
        raise UserError(f"{path}: inconsistent embeddings file (embeddings {found.embeddings.shape}, "
                        f"{len(found.labels)} labels, {len(found.paths)} paths)")
    return found
