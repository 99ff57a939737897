"""Rewrite a dataset zip into an unseen-class zip: val/test classes never appear in train.

    python bench/unseen_classes.py /work/shared/data/grocery.zip -o data/grocery_unseen.zip

How metric learning is measured (CUB-200, Stanford Online Products): train on some classes,
retrieve among others. All images of a class (from every split of the input) are pooled; with
the class names sorted, class i goes to train when i is even, else to val and test, whose
images are split half and half (seeded), so val and test share their classes with each other
but never with train. An embedding that only learnt to separate its training classes shows
here, where the ordinary split (every class in every split) cannot show it.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # byte-identical output for the same input and seed


def class_images(archive: zipfile.ZipFile) -> dict[str, list[str]]:
    """{class name: sorted entry names} over every split; one wrapping top folder is allowed."""
    by_class: dict[str, list[str]] = {}
    for name in archive.namelist():
        parts = PurePosixPath(name).parts
        if parts and parts[0] not in SPLITS and len(parts) > 3:
            parts = parts[1:]  # zip/<top>/train/class/img
        if len(parts) != 3 or parts[0] not in SPLITS or PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        by_class.setdefault(parts[1], []).append(name)
    return {cls: sorted(names) for cls, names in sorted(by_class.items())}


def assign_unseen(by_class: dict[str, list[str]], seed: int) -> dict[str, list[tuple[str, str]]]:
    """{split: [(class, entry)]}: even-numbered classes -> train, odd ones -> half val, half test."""
    rng = np.random.RandomState(seed)
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for index, (cls, names) in enumerate(sorted(by_class.items())):
        if index % 2 == 0:
            out["train"] += [(cls, n) for n in names]
            continue
        order = rng.permutation(len(names))
        half = (len(names) + 1) // 2
        out["val"] += [(cls, names[i]) for i in sorted(order[:half])]
        out["test"] += [(cls, names[i]) for i in sorted(order[half:])]
    return out


def write_unseen_zip(source: Path, output: Path, seed: int = 0) -> dict[str, tuple[int, int]]:
    """Write the unseen-class zip; returns {split: (classes, images)}."""
    with zipfile.ZipFile(source) as archive:
        by_class = class_images(archive)
        if len(by_class) < 4:
            raise SystemExit(f"unseen_classes: {source}: {len(by_class)} classes found; need at least 4 "
                             "(2 to train on, 2 to retrieve among)")
        splits = assign_unseen(by_class, seed)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(output.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as out:
            for split, items in splits.items():
                for cls, name in items:
                    # the old split in the file name keeps train/x.png and val/x.png apart
                    old_split = PurePosixPath(name).parts[-3]
                    info = zipfile.ZipInfo(f"{split}/{cls}/{old_split}_{PurePosixPath(name).name}", date_time=FIXED_TIME)
                    out.writestr(info, archive.read(name))
        tmp.replace(output)
    return {s: (len({c for c, _ in items}), len(items)) for s, items in splits.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("zip", type=Path, help="dataset zip (train/ val/ test/ with one folder per class)")
    p.add_argument("-o", "--output", type=Path, required=True, help="unseen-class zip to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the val/test halves (default: %(default)s)")
    args = p.parse_args(argv)
    if not args.zip.is_file():
        raise SystemExit(f"unseen_classes: {args.zip}: file not found")
    counts = write_unseen_zip(args.zip, args.output, args.seed)
    print(f"wrote {args.output}: " + ", ".join(f"{s} {n} images of {c} classes" for s, (c, n) in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
