"""Embed the test split with the exported network's weights, as a user of the model would.

Reads embedding_net.pt and model.json (not the training checkpoints), so the reported metrics
describe the shipped weights, and embeds in the precision that training validated with. The
weights run in timm's eager modules, which were faster than the TorchScript graph; a test
checks that both give the same embeddings.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from imgembed.data import ImageDataset, build_transform, load_split, resolve_num_workers
from imgembed.errors import UserError
from imgembed.files import atomic_path
from imgembed.model import eager_copy, embed_batches, prefer_channels_last

log = logging.getLogger("imgembed")


def load_exported_model(model_dir: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    model_dir = Path(model_dir)
    try:
        info = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
        net = torch.jit.load(str(model_dir / info.get("file", "embedding_net.pt")), map_location="cpu")
    except FileNotFoundError as err:
        raise UserError(f"{model_dir}: no trained model there ({Path(err.filename or '').name} missing); run the train stage first") from None
    except (json.JSONDecodeError, RuntimeError) as err:
        raise UserError(f"{model_dir}: model files are unreadable ({str(err).splitlines()[0][:200]})") from None
    return net.eval(), info


def load_embedding_net(model_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The shipped weights as an eager network (faster than the TorchScript graph under autocast);
    a model.json from before the head was recorded falls back to the TorchScript file itself."""
    scripted, info = load_exported_model(model_dir)
    if "head" not in info:
        return scripted, info
    try:
        return eager_copy(scripted, info), info
    except (RuntimeError, KeyError, ValueError) as err:  # e.g. a timm version whose modules differ
        log.warning("%s: running the TorchScript file itself (its weights do not fit timm's %s here: %s)",
                    model_dir, info["backbone"], str(err).splitlines()[0][:200])
        return scripted, info


def write_embeddings(path: Path, embeddings: np.ndarray, labels: np.ndarray, classes: list[str], paths: list[str]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # np.savez would append .npz to a bare temp name
            np.savez(handle, embeddings=embeddings.astype(np.float32), labels=labels.astype(np.int64),
                     class_names=np.array(classes, dtype=str), paths=np.array(paths, dtype=str))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embed_split(data_dir: Path, model_dir: Path, output: Path, cfg: dict[str, Any], split: str = "test") -> int:
    net, info = load_embedding_net(model_dir)
    precision = info.get("precision", "no")
    accelerator = Accelerator(mixed_precision=precision if torch.cuda.is_available() or precision != "fp16" else "no")
    split_data = load_split(data_dir, split)
    transform = build_transform(info, cfg["data"], training=False)
    dataset = ImageDataset(split_data, transform, info["image_size"], cache_bytes=0)
    loader = DataLoader(dataset, batch_size=cfg["embed"]["batch_size"], shuffle=False,
                        num_workers=resolve_num_workers(cfg["data"]["num_workers"], accelerator.device, accelerator.num_processes),
                        pin_memory=accelerator.device.type == "cuda")
    loader = accelerator.prepare(loader)
    net = net.to(accelerator.device)
    if not isinstance(net, torch.jit.ScriptModule):
        net = prefer_channels_last(net, accelerator.device)
    started = time.perf_counter()
    embeddings, labels = embed_batches(net, loader, accelerator, desc=f"embed {split}")
    elapsed = time.perf_counter() - started
    if accelerator.is_main_process:
        write_embeddings(output, l2_normalize(embeddings), labels, split_data.classes, split_data.paths)
        log.info("embedded %d %s images -> %s (%d-d, %s, %.1f img/s)", len(labels), split, output,
                 embeddings.shape[1], precision, len(labels) / max(elapsed, 1e-9))
    return len(labels)
