"""The built-in sample dataset: scikit-learn's bundled handwritten digits as a dataset zip.

Real labelled images that ship inside a PyPI package, so the whole workflow runs on a fresh
machine with no download. The zip is byte-for-byte reproducible for a given seed.
"""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from imgembed.files import atomic_path

log = logging.getLogger("imgembed")

_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified train/val/test split: every class appears in every split."""
    rng = np.random.RandomState(seed)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_val, n_test = round(len(idx) * val_fraction), round(len(idx) * test_fraction)
        parts["val"] += idx[:n_val].tolist()
        parts["test"] += idx[n_val : n_val + n_test].tolist()
        parts["train"] += idx[n_val + n_test :].tolist()
    return {name: np.array(sorted(values)) for name, values in parts.items()}


def digit_png(pixels: np.ndarray, upscale: int) -> bytes:
    """8x8 digit with values 0..16 -> greyscale PNG, enlarged by `upscale` (nearest)."""
    image = Image.fromarray((pixels * (255 / 16)).round().astype(np.uint8), mode="L")
    image = image.resize((8 * upscale, 8 * upscale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def build_sample_zip(output: Path, sample_cfg: dict[str, Any]) -> dict[str, int]:
    """Reads scikit-learn's bundled digits; writes `output`, a dataset zip (split/class/image.png)
    as `unpack` takes it, split by sample_cfg. Returns the number of images per split."""
    digits = load_digits()
    splits = split_indices(digits.target, sample_cfg["val_fraction"], sample_cfg["test_fraction"], sample_cfg["seed"])
    counts = {}
    with atomic_path(output) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for split, indices in splits.items():
            for index in indices:
                label = int(digits.target[index])
                info = zipfile.ZipInfo(f"{split}/digit_{label}/{index:04d}.png", date_time=_FIXED_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, digit_png(digits.images[index], sample_cfg["upscale"]))
            counts[split] = len(indices)
    log.info("wrote %s: %s images from scikit-learn's digits", output, ", ".join(f"{n} {s}" for s, n in counts.items()))
    return counts
