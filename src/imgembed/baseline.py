"""Baseline rows: what retrieval looks like *without* training, so a report shows what training added.

Three rows, each evaluated exactly like a trained model (leave-one-out on the L2-normalised
vectors of one split, with imgembed.metrics):

* ``raw_pixels``: the images themselves, resized to a small square and flattened;
* ``backbone``: the pooled features of the backbone before our training: its pretrained
  (e.g. ImageNet) weights when model.pretrained is true, else its random initialisation;
* ``backbone_pca``: the same features reduced to model.embedding_dim with a PCA fitted on the
  training split, i.e. what a trained head of that size has to beat.

Each row carries a ``label`` that says which of these it is in words, for the log and the report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.decomposition import PCA
from torch.utils.data import DataLoader
from tqdm import tqdm

from imgembed.artifacts import l2_normalize
from imgembed.data import ImageDataset, Split, build_transform, load_image, load_split
from imgembed.files import write_json
from imgembed.metrics import evaluate_embeddings
from imgembed.model import create_backbone, preprocessing
from imgembed.runtime import autocast, default_device, resolve_num_workers

log = logging.getLogger("imgembed")

RAW_PIXEL_SIZE = 32  # side of the square the raw-pixel row compares (digits are 8x8 upscaled to 32)
METRIC_KEYS = ("precision_at_1", "map_at_5", "map_at_r", "recall_at_1", "recall_at_5", "recall_at_10")


def row_label(name: str, pretrained: bool, dim: int | None = None) -> str:
    """The words for a baseline row: "backbone before training" alone would mean a random
    network in one run and pretrained weights in another, so the label says which."""
    start = "pretrained weights" if pretrained else "random init"
    return {
        "raw_pixels": "raw pixels (no network)",
        "backbone": f"backbone before training ({start})",
        "backbone_pca": f"backbone before training ({start}) + PCA to {dim}-d",
    }[name]


def raw_pixels(split: Split, size: int = RAW_PIXEL_SIZE) -> np.ndarray:
    """N x (size*size*3) float vectors in [0, 1]: each image resized (bicubic) to size x size."""
    rows = []
    for path in tqdm(split.paths, desc="raw pixels", unit="img", mininterval=1):
        image = load_image(split.root / path).resize((size, size), Image.Resampling.BICUBIC)
        rows.append(np.asarray(image, dtype=np.float32).reshape(-1) / 255.0)
    return np.stack(rows) if rows else np.zeros((0, size * size * 3), np.float32)


def backbone_features(splits: dict[str, Split], cfg: dict[str, Any], precision: str | None = None) -> dict[str, np.ndarray]:
    """Pooled features of the backbone before training, for each split, with the eval transform.

    Runs in train.mixed_precision like the trained model's embeddings (fp16 only on a GPU).
    Plain PyTorch rather than an Accelerator, so it can run beside training code in one process.
    """
    model_cfg, data_cfg = cfg["model"], cfg["data"]
    precision = precision or cfg["train"]["mixed_precision"]
    device = default_device()
    torch.manual_seed(cfg["train"]["seed"])  # a random-init backbone is then the one training starts from
    backbone = create_backbone(model_cfg).eval().to(device)
    transform = build_transform(preprocessing(backbone, model_cfg["image_size"]), data_cfg, training=False)
    out = {}
    for name, split in splits.items():
        dataset = ImageDataset(split, transform, model_cfg["image_size"], cache_bytes=0)
        loader = DataLoader(dataset, batch_size=cfg["embed"]["batch_size"], shuffle=False,
                            num_workers=resolve_num_workers(data_cfg["num_workers"], device))
        chunks = []
        with torch.no_grad(), autocast(precision, device.type):
            for images, _ in tqdm(loader, desc=f"backbone features ({name})", unit="batch", mininterval=1):
                chunks.append(backbone(images.to(device)).float().cpu())
        out[name] = torch.cat(chunks).numpy() if chunks else np.zeros((0, backbone.num_features), np.float32)
    return out


def pca_reduce(train: np.ndarray, query: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """`query` projected on the first `dim` principal components of `train` (fewer if train is small)."""
    dim = max(1, min(dim, train.shape[0], train.shape[1]))
    pca = PCA(n_components=dim, random_state=seed).fit(train.astype(np.float64))
    return pca.transform(query.astype(np.float64)).astype(np.float32)


def score(vectors: np.ndarray, labels: np.ndarray, chunk_size: int = 1024) -> dict[str, float]:
    """Leave-one-out retrieval metrics of L2-normalised vectors, as the evaluate stage computes them."""
    metrics = evaluate_embeddings(l2_normalize(np.asarray(vectors, dtype=np.float32)), labels, chunk_size)
    return {key: float(metrics[key]) for key in METRIC_KEYS} | {"num_queries": int(metrics["num_queries"])}


def baseline_rows(data_dir: Path, cfg: dict[str, Any], split: str = "test",
                  rows: tuple[str, ...] = ("raw_pixels", "backbone", "backbone_pca")) -> dict[str, dict[str, Any]]:
    """{row name: metrics} on `split`; the PCA is fitted on the training split."""
    data_dir = Path(data_dir)
    query = load_split(data_dir, split)
    chunk = cfg["evaluate"]["chunk_size"]
    result: dict[str, dict[str, Any]] = {}
    if "raw_pixels" in rows:
        started = time.perf_counter()
        result["raw_pixels"] = score(raw_pixels(query), query.labels, chunk)
        result["raw_pixels"]["seconds"] = time.perf_counter() - started
    if "backbone" in rows or "backbone_pca" in rows:
        started = time.perf_counter()
        wanted = {split: query} | ({"train": load_split(data_dir, "train")} if "backbone_pca" in rows else {})
        features = backbone_features(wanted, cfg)
        seconds = time.perf_counter() - started
        what = {"backbone": cfg["model"]["backbone"], "pretrained": bool(cfg["model"]["pretrained"]),
                "features": int(features[split].shape[1])}
        if "backbone" in rows:
            result["backbone"] = score(features[split], query.labels, chunk) | what | {"seconds": seconds}
        if "backbone_pca" in rows:
            reduced = pca_reduce(features["train"], features[split], cfg["model"]["embedding_dim"])
            result["backbone_pca"] = score(reduced, query.labels, chunk) | what | {"dim": int(reduced.shape[1])}
    for name, metrics in result.items():
        metrics["label"] = row_label(name, bool(cfg["model"]["pretrained"]), metrics.get("dim"))
        log.info("baseline %s on %s: P@1 %.3f, mP@5 %.3f, MAP@R %.3f", metrics["label"], split,
                 metrics["precision_at_1"], metrics["map_at_5"], metrics["map_at_r"])
    return result


def write_baseline(data_dir: Path, output: Path, cfg: dict[str, Any], split: str = "test") -> dict[str, dict[str, Any]]:
    """Reads data_dir's manifest and the images of `split` (and of train, for the PCA); writes
    `output`, the baseline rows as JSON, which evaluate compares the trained model with."""
    rows = baseline_rows(data_dir, cfg, split)
    write_json(Path(output), rows)
    return rows
