"""Generated datasets and throw-away copies of the project, shared by the benchmarks and the tests.

bench/ needs nothing from tests/: the tests import these through tests/helpers.py.
"""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "tests" / "fixtures" / "tiny.yaml"
PROJECT_FILES = ("Snakefile", "config", "workflow", "envs", "profiles", "dvc.yaml", "tests/fixtures", "src/imgembed/schemas")
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
# What a git + DVC clone needs besides the workflow files: git/DVC ignore rules, the baseline
# import and the code that dvc.yaml lists as dependencies.
CLONE_FILES = (".gitignore", ".dvcignore", "data/baseline_split.zip.dvc", "src/imgembed")


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def class_image(label: int, index: int, size: int = 24, seed: int = 0) -> Image.Image:
    """A small image whose colour and stripe direction depend on the class, plus noise."""
    rng = np.random.RandomState(seed * 100003 + label * 1009 + index)
    hue = np.array([(label * 97) % 255, (label * 57 + 80) % 255, (label * 131 + 160) % 255], dtype=np.float64)
    grid = np.indices((size, size)).sum(0) if label % 2 else np.indices((size, size))[0]
    stripes = ((grid // (2 + label % 3)) % 2)[..., None] * 60.0
    pixels = np.clip(hue[None, None, :] * 0.7 + stripes + rng.normal(0, 12, (size, size, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


def make_dataset_zip(
    path: Path,
    classes: int = 3,
    per_split: dict[str, int] | None = None,
    size: int = 24,
    top: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a valid dataset zip in the ImageFolder layout: split/class_k/img_i.png."""
    per_split = per_split or {"train": 8, "val": 4, "test": 4}
    prefix = f"{top}/" if top else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for split, count in per_split.items():
            for label in range(classes):
                for i in range(count):
                    image = class_image(label, i + 1000 * SPLIT_INDEX[split], size, seed)
                    archive.writestr(f"{prefix}{split}/class_{label}/img_{i:03d}.png", png_bytes(image))
    return path


def copy_project(target: Path) -> Path:
    """The workflow files (not outputs) in a fresh folder, as a user's clone would have them."""
    target.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, target / name, dirs_exist_ok=True)
        elif src.exists():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target / name)
    (target / "data").mkdir(exist_ok=True)
    return target


def copy_clone(target: Path, dataset: str = "tiny") -> dict:
    """copy_project plus CLONE_FILES, with the tiny settings and `datasets: [dataset]` written into
    config/config.yaml (DVC commands read only that file); git and DVC are left to the caller.
    Returns the merged config."""
    import yaml

    from imgembed.config import merge

    project = copy_project(target)
    for name in CLONE_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, project / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, project / name)
    tiny = yaml.safe_load(TINY_CONFIG.read_text())
    config = merge(yaml.safe_load((project / "config" / "config.yaml").read_text()), {**tiny, "datasets": [dataset]})
    (project / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return config
