"""Datasets, the class-balanced sampler and transforms, shared by train and embed.

Images are read through the manifest that `unpack` wrote, so every stage sees exactly the
files that passed validation, in the same order.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from pytorch_metric_learning.samplers import MPerClassSampler
from timm.data import create_transform
from torch.utils.data import Dataset
from tqdm import tqdm

from imgembed.errors import UserError

log = logging.getLogger("imgembed")

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"  # written by unpack into the dataset folder, read here
# The files a dataset may hold (unpack keeps them) are the files an index may hold (search).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Split:
    """One split of an unpacked dataset: image paths relative to the dataset root, and labels."""

    root: Path
    paths: list[str]
    labels: np.ndarray
    classes: list[str]


def read_manifest(data_dir: Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; run the unpack stage first") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def load_split(data_dir: Path, split: str) -> Split:
    manifest = read_manifest(data_dir)
    items = manifest["splits"][split]
    return Split(
        root=Path(data_dir),
        paths=[item["path"] for item in items],
        labels=np.array([item["label"] for item in items], dtype=np.int64),
        classes=list(manifest["classes"]),
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB from any PIL mode: EXIF rotation, 16-bit, palette, alpha, CMYK."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max(initial=0)
        if image.mode.startswith("I;16"):
            top = 65535.0
        elif image.mode == "F" and peak <= 1.0:
            top = 1.0  # float images (TIFF) in [0, 1]
        else:  # 32-bit int or float: 8-bit or 16-bit data, or beyond
            top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
        image = Image.fromarray(np.rint(np.clip(array / top * 255.0, 0, 255)).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def load_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def shrink_to(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (never enlarge): what every transform starts from."""
    short = min(image.size)
    if short <= size:
        return image
    scale = size / short
    new = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    return image.resize(new, Image.Resampling.BICUBIC)


# Interpolations a model.json may name (timm's and torchvision's names).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def build_transform(model_info: dict[str, Any], data_cfg: dict[str, Any] | None, training: bool) -> Callable:
    """timm's transforms with the backbone's own normalisation (never a second /255).

    The one place a model's description (model.json's image_size, mean, std, interpolation)
    becomes its preprocessing, as timm's resolve_model_data_config -> create_transform does;
    for training (with data_cfg's augmentation), embedding and search alike.
    """
    interpolation = str(model_info.get("interpolation", "bicubic"))
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"model.json: unknown interpolation '{interpolation}'; expected one of {', '.join(INTERPOLATIONS)}")
    kwargs: dict[str, Any] = dict(
        input_size=(3, model_info["image_size"], model_info["image_size"]),
        mean=tuple(model_info["mean"]),
        std=tuple(model_info["std"]),
        interpolation=interpolation,
        crop_pct=1.0,
    )
    if training:
        assert data_cfg is not None and data_cfg["augment"] != "auto", "resolve data.augment first (imgembed.runtime.resolve_data_cfg)"
    if training and data_cfg["augment"]:
        return create_transform(
            is_training=True,
            scale=tuple(data_cfg["augment_scale"]),
            ratio=(3 / 4, 4 / 3),
            hflip=data_cfg["hflip"],
            vflip=0.0,
            color_jitter=data_cfg["color_jitter"] or None,
            auto_augment=None,
            re_prob=0.0,
            **kwargs,
        )
    return create_transform(is_training=False, **kwargs)


def eval_image_transform(model_info: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """Decoded RGB image of any size -> the tensor the model embeds: shrink_to, then the
    evaluation transform, exactly as ImageDataset serves it to the embed stage."""
    return functools.partial(_shrink_then, int(model_info["image_size"]), build_transform(model_info, None, training=False))


def _shrink_then(size: int, transform: Callable, image: Image.Image) -> torch.Tensor:
    return transform(shrink_to(image, size))


class ImageDataset(Dataset):
    """(image tensor, label) pairs of one split; optionally served from decoded images in memory.

    Small images are decoded once and kept at the training size when they fit the memory budget
    (`data.cache_bytes`), so epochs after the first never touch the disk or the decoder.
    """

    def __init__(self, split: Split, transform: Callable, image_size: int, cache_bytes: int = 0) -> None:
        self.split = split
        self.transform = transform
        self.image_size = image_size
        self.cache: list[Image.Image] | None = None
        estimate = len(split.paths) * image_size * image_size * 3 * 2  # aspect ratios up to 2:1
        if cache_bytes and estimate <= cache_bytes:
            self.cache = [
                self._decode(i) for i in tqdm(range(len(split.paths)), desc="cache images", leave=False, mininterval=1)
            ]

    def __len__(self) -> int:
        return len(self.split.paths)

    def _decode(self, index: int) -> Image.Image:
        return shrink_to(load_image(self.split.root / self.split.paths[index]), self.image_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.cache[index] if self.cache is not None else self._decode(index)
        return self.transform(image), int(self.split.labels[index])


def class_balanced_sampler(labels: np.ndarray, classes_per_batch: int, samples_per_class: int) -> MPerClassSampler:
    """P x K batches: P classes, K images each, so every anchor has positives and negatives."""
    n_classes = len(np.unique(labels))
    if n_classes < classes_per_batch:
        raise UserError(
            f"data.classes_per_batch is {classes_per_batch} but the training split has only "
            f"{n_classes} classes; set it to at most {n_classes}"
        )
    batch_size = classes_per_batch * samples_per_class
    return MPerClassSampler(
        labels, m=samples_per_class, batch_size=batch_size, length_before_new_iter=max(len(labels), batch_size)
    )
