"""Embed the test split with the exported network's weights, as a user of the model would.

Reads embedding_net.pt and model.json (not the training checkpoints), so the reported metrics
describe the shipped weights, and embeds in the precision that training validated with. The
weights run in timm's eager modules, which were faster than the TorchScript graph; a test
checks that both give the same embeddings.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from imgembed.artifacts import l2_normalize, load_model, model_config, write_embeddings
from imgembed.data import ImageDataset, build_transform, load_split
from imgembed.model import eager_copy, embed_batches, prefer_channels_last
from imgembed.runtime import default_device, precision_on, resolve_num_workers

log = logging.getLogger("imgembed")


def load_embedding_net(model_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The shipped weights as an eager network (faster than the TorchScript graph under autocast);
    a model.json from before the head was recorded falls back to the TorchScript file itself."""
    scripted, info = load_model(model_dir)
    if "head" not in info:
        return scripted, info
    try:
        return eager_copy(scripted, model_config(info)), info
    except (RuntimeError, KeyError, ValueError) as err:  # e.g. a timm version whose modules differ
        log.warning("%s: running the TorchScript file itself (its weights do not fit timm's %s here: %s)",
                    model_dir, info["backbone"], str(err).splitlines()[0][:200])
        return scripted, info


def embed_split(data_dir: Path, model_dir: Path, output: Path, cfg: dict[str, Any], split: str = "test") -> int:
    """Reads data_dir's manifest and images of `split` and model_dir (embedding_net.pt, model.json);
    writes `output`, the embeddings file (imgembed.artifacts). Returns the number of images."""
    net, info = load_embedding_net(model_dir)
    precision = info.get("precision", "no")
    accelerator = Accelerator(mixed_precision=precision_on(default_device().type, precision))
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
