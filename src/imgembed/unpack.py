"""Unpack a dataset zip safely and atomically into data/D/ with a manifest.

The zip comes from elsewhere and is treated as untrusted: paths that escape the target,
links, case-folding collisions and zip bombs are refused before anything is written; bad
images are skipped and reported. Extraction goes to a temporary folder that is renamed
into place only when everything is valid, so a failed unpack leaves no half-dataset.
"""

from __future__ import annotations

import logging
import lzma
import shutil
import stat
import unicodedata
import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image
from tqdm import tqdm

from imgembed.data import IMAGE_SUFFIXES, MANIFEST, SPLITS, to_rgb
from imgembed.errors import UserError
from imgembed.files import FolderSwap, write_json

log = logging.getLogger("imgembed")

_RATIO_MIN_BYTES = 1 << 20  # tiny files compress extremely well for innocent reasons
_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
# What a damaged archive raises while an entry is read: bad CRC, bad deflate/bzip2/lzma stream, short read.
_CORRUPT = (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, ValueError)


def entry_name(info: zipfile.ZipInfo) -> str:
    """The entry's name as its author meant it: UTF-8 even when the zip forgot the UTF-8 flag."""
    name = info.filename
    if not info.flag_bits & 0x800:
        try:
            name = name.encode("cp437").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
    return unicodedata.normalize("NFC", name)


def check_entry_path(zip_path: Path, name: str) -> PurePosixPath:
    """Refuse names that would land outside the target folder (zip-slip)."""
    unified = name.replace("\\", "/")
    path = PurePosixPath(unified)
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":") or ".." in path.parts:
        raise UserError(f"{zip_path}: entry '{name}' points outside the dataset folder (unsafe path); refusing to unpack")
    return PurePosixPath(*[p for p in path.parts if p not in ("", ".")])


def is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def check_readable(zip_path: Path, info: zipfile.ZipInfo) -> None:
    """Refuse encrypted entries and compression methods Python cannot read, before extracting."""
    if info.flag_bits & 0x1:
        raise UserError(f"{zip_path}: entry '{info.filename}' is encrypted; unpack needs a zip without a password")
    if info.compress_type not in _METHODS:
        method = zipfile.compressor_names.get(info.compress_type, f"method {info.compress_type}")
        raise UserError(
            f"{zip_path}: entry '{info.filename}' uses {method} compression, which Python's zipfile cannot read; "
            "re-create the zip with deflate (e.g. `zip -r`)"
        )


def ignored_reason(path: PurePosixPath) -> str | None:
    """Why a file is not part of the dataset, or None if it is an image to keep."""
    if path.parts[0] == "__MACOSX":
        return "macOS metadata (__MACOSX)"
    if any(part.startswith(".") for part in path.parts):
        return "hidden file"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return "not an image file"
    return None


def strip_wrapping_folder(paths: list[PurePosixPath]) -> int:
    """How many leading folders to drop: `baseline_split/train/...` is accepted like `train/...`."""
    top = {p.parts[0] for p in paths if len(p.parts) > 1 and p.parts[0] != "__MACOSX"}
    if top & set(SPLITS) or len(top) != 1:
        return 0
    inner = {p.parts[1] for p in paths if len(p.parts) > 2 and p.parts[0] in top}
    return 1 if inner & set(SPLITS) else 0


def check_sizes(zip_path: Path, infos: list[zipfile.ZipInfo], unpack_cfg: dict[str, Any]) -> None:
    """Zip-bomb guard on declared sizes; extraction also counts the bytes it really writes."""
    total = sum(i.file_size for i in infos)
    limit = unpack_cfg["max_uncompressed_bytes"]
    if total > limit:
        raise UserError(f"{zip_path}: declares {total} uncompressed bytes, over unpack.max_uncompressed_bytes={limit}")
    ratio_limit = unpack_cfg["max_compression_ratio"]
    for info in infos:
        if info.file_size > _RATIO_MIN_BYTES and info.file_size > ratio_limit * max(info.compress_size, 1):
            raise UserError(
                f"{zip_path}: entry '{info.filename}' expands {info.file_size / max(info.compress_size, 1):.0f}x, "
                f"over unpack.max_compression_ratio={ratio_limit} (zip bomb?)"
            )
    packed = sum(i.compress_size for i in infos)
    if total > _RATIO_MIN_BYTES and total > ratio_limit * max(packed, 1):
        raise UserError(f"{zip_path}: expands {total / max(packed, 1):.0f}x in total, over unpack.max_compression_ratio={ratio_limit}")


def check_image(path: Path, max_pixels: int) -> str | None:
    """Decode the whole image once here, so training never meets a broken file."""
    if path.stat().st_size == 0:
        return "empty file"
    try:
        with warnings.catch_warnings():
            # The pixel limit is unpack.max_image_pixels, checked below, not Pillow's warning; Pillow's
            # other warnings (odd EXIF, palette transparency) would only clutter the log.
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                if image.width * image.height > max_pixels:
                    return f"{image.width}x{image.height} pixels, over unpack.max_image_pixels={max_pixels}"
                image.load()
                to_rgb(image)
    except Image.DecompressionBombError:  # over twice Image.MAX_IMAGE_PIXELS: Pillow will not open it at all
        return f"too many pixels (decompression bomb): over Pillow's hard limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels"
    except Exception as err:  # PIL raises many types for broken files
        return f"unreadable image ({type(err).__name__}: {str(err)[:120]})"
    return None


def _extract(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: list[int], zip_path: Path) -> None:
    """Copy one entry, counting the bytes really written: zipfile stops at the declared size and
    then fails the CRC check, so data larger than declared ends as a corrupt-zip error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(info) as src, open(target, "wb") as dst:
        while chunk := src.read(1 << 20):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise UserError(f"{zip_path}: expands past unpack.max_uncompressed_bytes while extracting (zip bomb?)")
            dst.write(chunk)


def unpack_dataset(zip_path: Path, output: Path, unpack_cfg: dict[str, Any]) -> dict[str, Any]:
    """Reads the dataset zip; writes `output` (the images and manifest.json), replaced only on
    success, and returns the manifest."""
    zip_path, output = Path(zip_path), Path(output)
    swap = dataset_swap(output)
    if output.parent.is_dir():
        swap.recover()
    if not zip_path.is_file():
        raise UserError(f"{zip_path}: file not found")
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as err:
        raise UserError(f"{zip_path}: not a valid zip file ({err}); it may be truncated or not a zip") from None
    tmp = swap.make_staging()
    try:
        with archive:
            manifest = _unpack_into(archive, zip_path, tmp, unpack_cfg)
        write_json(tmp / MANIFEST, manifest)  # written last: a staging folder with a manifest is whole
        swap.swap(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = {s: sum(manifest["counts"][s].values()) for s in SPLITS}
    log.info(
        "unpacked %s -> %s: %d classes, %s images, %d skipped",
        zip_path, output, len(manifest["classes"]), "/".join(str(counts[s]) for s in SPLITS), len(manifest["skipped"]),
    )
    return manifest


def dataset_swap(output: Path) -> FolderSwap:
    """How data/D is replaced: extracted into .D.unpack-*, swapped in once manifest.json is written."""
    return FolderSwap(output, MANIFEST, staging_prefix=f".{output.name}.unpack-", old_prefix=f".{output.name}.old-")


def _checked_entries(archive: zipfile.ZipFile, zip_path: Path,
                     unpack_cfg: dict[str, Any]) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The zip's file entries with their safe relative paths, once every check on names,
    links, encryption, compression and declared sizes passed."""
    try:
        infos = [i for i in archive.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{zip_path}: corrupt zip ({err})") from None
    if not infos:
        raise UserError(f"{zip_path}: the zip is empty; expected train/, val/ and test/ folders of class folders")
    named: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    for info in infos:
        path = check_entry_path(zip_path, entry_name(info))
        if is_symlink(info):
            raise UserError(f"{zip_path}: entry '{info.filename}' is a symbolic link; refusing to unpack")
        check_readable(zip_path, info)
        if path.parts:
            named.append((info, path))
    folded = Counter(str(p).casefold() for _, p in named)
    clashes = sorted({str(p) for _, p in named if folded[str(p).casefold()] > 1})
    if clashes:
        raise UserError(
            f"{zip_path}: entries {clashes[:4]} have the same name when letter case is ignored and would overwrite "
            "each other (on macOS/Windows, or in the zip itself); rename them"
        )
    folders = {str(parent).casefold() for _, p in named for parent in p.parents}
    blocked = sorted(str(p) for _, p in named if str(p).casefold() in folders)
    if blocked:
        raise UserError(f"{zip_path}: entries {blocked[:4]} are both a file and a folder in the zip; rename them")
    check_sizes(zip_path, [i for i, _ in named], unpack_cfg)
    return named


def _unpack_into(archive: zipfile.ZipFile, zip_path: Path, tmp: Path, unpack_cfg: dict[str, Any]) -> dict[str, Any]:
    named = _checked_entries(archive, zip_path, unpack_cfg)
    drop = strip_wrapping_folder([p for _, p in named])
    skipped: list[dict[str, str]] = []
    keep: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    for info, path in named:
        rel = PurePosixPath(*path.parts[drop:]) if len(path.parts) > drop else path
        reason = ignored_reason(path)
        if reason is None and (len(rel.parts) < 3 or rel.parts[0] not in SPLITS):
            reason = "not inside <split>/<class>/ (split is one of train, val, test)"
        if reason:
            skipped.append({"entry": str(path), "reason": reason})
        else:
            keep.append((info, rel))

    present = {rel.parts[0] for _, rel in keep}
    missing = [s for s in SPLITS if s not in present]
    if missing:
        tops = sorted({p.parts[0] + "/" for _, p in named if len(p.parts) > 1 and ignored_reason(p) != "macOS metadata (__MACOSX)"})
        found = f" (top-level folders found: {', '.join(tops[:6])})" if tops else ""
        raise UserError(
            f"{zip_path}: no images in {', '.join(m + '/' for m in missing)}; the zip needs train/, val/ and test/, "
            f"each with one folder per class, at the top or inside one wrapping folder{found}"
        )

    budget = [unpack_cfg["max_uncompressed_bytes"]]
    images: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    # No progress bar in logs (non-TTY): a failed unpack then prints its one error line and nothing else.
    for info, rel in tqdm(keep, desc="unpack", unit="img", mininterval=1, disable=None):
        target = tmp.joinpath(*rel.parts)
        try:
            _extract(archive, info, target, budget, zip_path)
        except _CORRUPT as err:
            raise UserError(f"{zip_path}: corrupt or truncated zip at entry '{info.filename}' ({err})") from None
        except OSError as err:
            raise UserError(f"{zip_path}: could not extract '{info.filename}': {err.strerror or err}") from None
        reason = check_image(target, unpack_cfg["max_image_pixels"])
        if reason:
            target.unlink()
            skipped.append({"entry": str(rel), "reason": reason})
        else:
            images[rel.parts[0]].append((rel.parts[1], str(rel)))
    return build_manifest(zip_path, images, skipped)


def build_manifest(zip_path: Path, images: dict[str, list[tuple[str, str]]], skipped: list[dict[str, str]]) -> dict[str, Any]:
    """Check the split/class structure and index every image by split and class."""
    def why_skipped(prefix: str) -> str:
        """The images of a split or class that were skipped: the manifest that lists them is never written."""
        mine = [s for s in skipped if s["entry"].startswith(prefix) and s["reason"] != "hidden file"]
        if not mine:
            return ""
        return f" ({len(mine)} skipped, e.g. {mine[0]['entry']}: {mine[0]['reason']})"

    for split in SPLITS:
        if not images[split]:
            raise UserError(f"{zip_path}: {split}/ has no readable images{why_skipped(split + '/')}")
    train_counts = Counter(cls for cls, _ in images["train"])
    if len(train_counts) < 2:
        raise UserError(f"{zip_path}: train/ has {len(train_counts)} class; triplet training needs at least 2 classes")
    single = sorted(c for c, n in train_counts.items() if n < 2)
    if single:
        raise UserError(
            f"{zip_path}: train/ class(es) {', '.join(single[:5])} have a single image; a triplet needs at least 2 "
            f"images per training class (add images or remove the class){why_skipped(f'train/{single[0]}/')}"
        )
    classes = sorted({cls for split in SPLITS for cls, _ in images[split]})
    label = {cls: i for i, cls in enumerate(classes)}
    manifest: dict[str, Any] = {
        "source": zip_path.name,
        "classes": classes,
        "train_classes": sorted(train_counts),
        "unseen_classes": {s: sorted({c for c, _ in images[s]} - set(train_counts)) for s in ("val", "test")},
        "counts": {s: dict(sorted(Counter(c for c, _ in images[s]).items())) for s in SPLITS},
        "splits": {s: [{"path": p, "label": label[c]} for c, p in sorted(images[s], key=lambda x: x[1])] for s in SPLITS},
        "skipped": sorted(skipped, key=lambda x: x["entry"]),
    }
    for split, unseen in manifest["unseen_classes"].items():
        if unseen:
            log.warning("%s/ has %d class(es) not in train/ (kept: retrieval works on unseen classes): %s",
                        split, len(unseen), ", ".join(unseen[:5]))
    return manifest
