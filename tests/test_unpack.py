"""Bad and unusual dataset zips (issue 5).

Every fatal case raises UserError with one line naming the problem and leaves nothing behind:
no data/D/ when there was none, the previous data/D/ untouched when there was one, and no
temporary folders beside it. Every non-fatal case (junk files, broken images) is skipped and
listed in manifest["skipped"] with its reason.
"""

from __future__ import annotations

import io
import json
import logging
import stat
import struct
import unicodedata
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from helpers import class_image, make_dataset_zip, png_bytes
from PIL import Image

from imgembed import unpack as unpack_module
from imgembed.data import load_image, load_split
from imgembed.artifacts import write_embeddings
from imgembed.errors import UserError
from imgembed.evaluate import evaluate_file
from imgembed.unpack import unpack_dataset

UNPACK_CFG = {"max_uncompressed_bytes": 20_000_000_000, "max_compression_ratio": 200, "max_image_pixels": 89_478_485}
EVAL_CFG = {"evaluate": {"chunk_size": 1024}}


# ---- building zips ------------------------------------------------------------------------

Entry = tuple["str | zipfile.ZipInfo", bytes]


def good_entries(classes: int = 3, per_split: dict[str, int] | None = None, prefix: str = "") -> list[Entry]:
    """A valid split/class_k/img_i.png layout, as (name, bytes) pairs."""
    per_split = per_split or {"train": 3, "val": 2, "test": 2}
    offset = {"train": 0, "val": 100, "test": 200}
    return [
        (f"{prefix}{split}/class_{c}/img_{i}.png", png_bytes(class_image(c, offset[split] + i, 16)))
        for split, n in per_split.items()
        for c in range(classes)
        for i in range(n)
    ]


def write_zip(path: Path, entries: list[Entry], compression: int = zipfile.ZIP_STORED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about duplicate names
        with zipfile.ZipFile(path, "w", compression=compression) as archive:
            for name, data in entries:
                archive.writestr(name, data)
    return path


class NoUtf8FlagInfo(zipfile.ZipInfo):
    """A zip entry whose UTF-8 name is stored without the UTF-8 flag, as old zip tools do."""

    __slots__ = ()

    def _encodeFilenameFlags(self):  # noqa: N802 (zipfile's name)
        return self.filename.encode("utf-8"), self.flag_bits & ~0x800


def central_headers(data: bytes) -> dict[str, int]:
    """Offsets of each entry's central-directory record, by name."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        start = archive.start_dir
    out, pos = {}, start
    while data[pos : pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack("<HHH", data[pos + 28 : pos + 34])
        out[data[pos + 46 : pos + 46 + n].decode("utf-8")] = pos
        pos += 46 + n + m + k
    return out


def patch_header(path: Path, name: str, local_field: int, central_field: int, fmt: str, value: int) -> None:
    """Overwrite one field of an entry in both its local header and its central-directory record."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        local = archive.getinfo(name).header_offset
    central = central_headers(bytes(data))[name]
    struct.pack_into(fmt, data, local + local_field, value)
    struct.pack_into(fmt, data, central + central_field, value)
    path.write_bytes(bytes(data))


def png_with_size(width: int, height: int) -> bytes:
    """A PNG header claiming width x height pixels, with almost no data: a decompression bomb."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# ---- the fatal cases ----------------------------------------------------------------------
# name -> (build the zip at path, unpack config overrides, regex the one-line error must match)


def _not_a_zip(p: Path) -> None:
    p.write_bytes(b"this is a text file, not a zip\n" * 10)


def _truncated(p: Path) -> None:
    make_dataset_zip(p, classes=3, per_split={"train": 3, "val": 2, "test": 2}, size=16)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _corrupt_data(p: Path) -> None:
    """Central directory intact, compressed bytes of one entry damaged (bad sector, bad copy)."""
    write_zip(p, good_entries(), compression=zipfile.ZIP_DEFLATED)
    data = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as archive:
        info = archive.infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start : start + 40] = bytes(range(7, 47))
    p.write_bytes(bytes(data))


def _empty(p: Path) -> None:
    write_zip(p, [])


def _only_folders(p: Path) -> None:
    write_zip(p, [("train/", b""), ("val/", b""), ("test/", b"")])


def _dotdot(p: Path) -> None:
    write_zip(p, [*good_entries(), ("train/class_0/../../../evil.png", b"x")])


def _dotdot_backslash(p: Path) -> None:
    write_zip(p, [*good_entries(), ("..\\..\\evil.png", b"x")])


def _absolute(p: Path) -> None:
    write_zip(p, [*good_entries(), ("/tmp/evil.png", b"x")])


def _drive_letter(p: Path) -> None:
    write_zip(p, [*good_entries(), ("C:/Windows/evil.png", b"x")])


def _symlink(p: Path) -> None:
    link = zipfile.ZipInfo("train/class_0/link.png")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    write_zip(p, [*good_entries(), (link, b"/etc/passwd")])


def _case_clash(p: Path) -> None:
    write_zip(p, [*good_entries(), ("train/Class_0/img_0.png", png_bytes(class_image(0, 9, 16)))])


def _duplicate_name(p: Path) -> None:
    write_zip(p, [*good_entries(), ("train/class_0/img_0.png", png_bytes(class_image(0, 9, 16)))])


def _file_and_folder(p: Path) -> None:
    write_zip(p, [*good_entries(), ("train/class_0/img_0.png/inner.png", png_bytes(class_image(0, 9, 16)))])


def _declared_too_big(p: Path) -> None:
    write_zip(p, good_entries())


def _ratio_entry(p: Path) -> None:
    write_zip(p, [*good_entries(), ("train/class_0/zeros.bmp", bytes(3 << 20))], compression=zipfile.ZIP_DEFLATED)


def _ratio_total(p: Path) -> None:
    # each entry under the 1 MiB per-entry threshold, together far over it
    zeros = [(f"train/class_0/zeros_{i}.bmp", bytes(900_000)) for i in range(12)]
    write_zip(p, [*good_entries(), *zeros], compression=zipfile.ZIP_DEFLATED)


def _actual_bigger_than_declared(p: Path) -> None:
    """The central directory and local header say 100 bytes; the data inflates to 3 KB."""
    name = "train/class_0/img_0.png"
    write_zip(p, good_entries(), compression=zipfile.ZIP_DEFLATED)
    patch_header(p, name, local_field=22, central_field=24, fmt="<I", value=100)


def _encrypted(p: Path) -> None:
    write_zip(p, good_entries())
    patch_header(p, "train/class_0/img_0.png", local_field=6, central_field=8, fmt="<H", value=0x1)


def _deflate64(p: Path) -> None:
    write_zip(p, good_entries())
    patch_header(p, "train/class_0/img_0.png", local_field=8, central_field=10, fmt="<H", value=9)


def _no_train(p: Path) -> None:
    write_zip(p, [e for e in good_entries() if not e[0].startswith("train/")])


def _no_val_test(p: Path) -> None:
    write_zip(p, [e for e in good_entries() if e[0].startswith("train/")])


def _double_wrapped(p: Path) -> None:
    write_zip(p, good_entries(prefix="outer/inner/"))


def _only_junk(p: Path) -> None:
    write_zip(p, [("README.md", b"hi"), ("train/class_0/notes.txt", b"x"), ("val/.DS_Store", b"x")])


def _val_unreadable(p: Path) -> None:
    entries = [e for e in good_entries() if not e[0].startswith("val/")]
    write_zip(p, [*entries, ("val/class_0/a.png", b"garbage"), ("val/class_1/b.png", b"")])


def _one_class(p: Path) -> None:
    write_zip(p, good_entries(classes=1))


def _single_image_class(p: Path) -> None:
    write_zip(p, [e for e in good_entries() if not (e[0].startswith("train/class_2/") and not e[0].endswith("img_0.png"))])


def _single_after_skips(p: Path) -> None:
    keep = [e for e in good_entries() if not (e[0].startswith("train/class_1/") and not e[0].endswith("img_0.png"))]
    write_zip(p, [*keep, ("train/class_1/broken.png", b"\x89PNG\r\n\x1a\nbroken"), ("train/class_1/empty.jpg", b"")])


FATAL: dict[str, tuple[Callable[[Path], None], dict, str]] = {
    "not a zip": (_not_a_zip, {}, r"not a valid zip file"),
    "truncated zip": (_truncated, {}, r"not a valid zip file .*truncated"),
    "corrupt entry data": (_corrupt_data, {}, r"corrupt or truncated zip at entry 'train/class_0/img_0\.png'"),
    "empty zip": (_empty, {}, r"the zip is empty"),
    "zip of empty folders": (_only_folders, {}, r"the zip is empty"),
    "zip-slip ../": (_dotdot, {}, r"'train/class_0/\.\./\.\./\.\./evil\.png' points outside .*unsafe path"),
    "zip-slip ..\\": (_dotdot_backslash, {}, r"points outside the dataset folder"),
    "absolute path": (_absolute, {}, r"'/tmp/evil\.png' points outside"),
    "drive letter": (_drive_letter, {}, r"'C:/Windows/evil\.png' points outside"),
    "symlink entry": (_symlink, {}, r"'train/class_0/link\.png' is a symbolic link"),
    "case-folding clash": (_case_clash, {}, r"Class_0/img_0\.png.*class_0/img_0\.png.*letter case is ignored"),
    "duplicate name": (_duplicate_name, {}, r"would overwrite each other"),
    "file and folder": (_file_and_folder, {}, r"both a file and a folder"),
    "declared size over limit": (_declared_too_big, {"max_uncompressed_bytes": 5000},
                                 r"declares \d+ uncompressed bytes, over unpack\.max_uncompressed_bytes=5000"),
    "entry compression ratio": (_ratio_entry, {}, r"'train/class_0/zeros\.bmp' expands \d+x, over unpack\.max_compression_ratio=200"),
    "total compression ratio": (_ratio_total, {}, r"expands \d+x in total, over unpack\.max_compression_ratio=200"),
    "data bigger than declared": (_actual_bigger_than_declared, {}, r"corrupt or truncated zip .*Bad CRC-32"),
    "encrypted entry": (_encrypted, {}, r"'train/class_0/img_0\.png' is encrypted"),
    "unsupported compression": (_deflate64, {}, r"uses deflate64 compression"),
    "missing train/": (_no_train, {}, r"no images in train/;"),
    "missing val/ and test/": (_no_val_test, {}, r"no images in val/, test/;"),
    "folder wrapped twice": (_double_wrapped, {}, r"no images in train/, val/, test/.*top-level folders found: outer/"),
    "only non-image files": (_only_junk, {}, r"no images in train/, val/, test/"),
    "split without readable images": (_val_unreadable, {}, r"val/ has no readable images \(2 skipped, e\.g\. val/class_0/a\.png: unreadable"),
    "fewer than 2 classes": (_one_class, {}, r"train/ has 1 class; triplet training needs at least 2"),
    "class with one image": (_single_image_class, {}, r"train/ class\(es\) class_2 have a single image"),
    "class with one image after skips": (_single_after_skips, {}, r"train/ class\(es\) class_1 have a single image.*\(2 skipped, e\.g\. train/class_1/broken\.png: unreadable"),
}


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture
def zip_path(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    return tmp_path / "data" / "D.zip"


@pytest.mark.parametrize("case", list(FATAL))
def test_fatal_zip_leaves_no_output(case: str, zip_path: Path) -> None:
    build, overrides, message = FATAL[case]
    build(zip_path)
    output = zip_path.with_suffix("")
    with pytest.raises(UserError, match=message) as caught:
        unpack_dataset(zip_path, output, {**UNPACK_CFG, **overrides})
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(str(zip_path))
    assert not output.exists()
    assert sorted(p.name for p in zip_path.parent.iterdir()) == ["D.zip"]


@pytest.mark.parametrize("case", list(FATAL))
def test_fatal_zip_keeps_previous_dataset(case: str, zip_path: Path) -> None:
    output = zip_path.with_suffix("")
    write_zip(zip_path, good_entries())
    unpack_dataset(zip_path, output, UNPACK_CFG)
    before = {str(p.relative_to(output)): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    build, overrides, message = FATAL[case]
    build(zip_path)
    with pytest.raises(UserError, match=message):
        unpack_dataset(zip_path, output, {**UNPACK_CFG, **overrides})
    after = {str(p.relative_to(output)): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    assert after == before
    assert leftovers(zip_path.parent, "D") == []


def test_missing_zip(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.zip: file not found"):
        unpack_dataset(tmp_path / "nope.zip", tmp_path / "nope", UNPACK_CFG)
    assert list(tmp_path.iterdir()) == []


def test_extraction_counts_real_bytes(zip_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Second line of defence: even if the declared sizes lied, extraction stops at the byte budget."""
    write_zip(zip_path, good_entries())
    monkeypatch.setattr(unpack_module, "check_sizes", lambda *args: None)
    with pytest.raises(UserError, match=r"expands past unpack\.max_uncompressed_bytes while extracting"):
        unpack_dataset(zip_path, zip_path.with_suffix(""), {**UNPACK_CFG, "max_uncompressed_bytes": 3000})
    assert sorted(p.name for p in zip_path.parent.iterdir()) == ["D.zip"]


def test_interrupted_unpack_keeps_previous_dataset(zip_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or any crash) in the middle of extraction: temp folder removed, old dataset intact."""
    output = zip_path.with_suffix("")
    write_zip(zip_path, good_entries())
    unpack_dataset(zip_path, output, UNPACK_CFG)
    manifest = (output / "manifest.json").read_text()
    calls = []

    def crash(path: Path, max_pixels: int) -> None:
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return None

    monkeypatch.setattr(unpack_module, "check_image", crash)
    write_zip(zip_path, good_entries(classes=4))
    with pytest.raises(KeyboardInterrupt):
        unpack_dataset(zip_path, output, UNPACK_CFG)
    assert (output / "manifest.json").read_text() == manifest
    assert leftovers(zip_path.parent, "D") == []


def test_leftovers_of_a_killed_unpack_are_cleaned(zip_path: Path) -> None:
    """SIGKILL cannot run cleanup: the next unpack removes the temp folder and restores a swapped-out dataset."""
    output = zip_path.with_suffix("")
    write_zip(zip_path, good_entries())
    unpack_dataset(zip_path, output, UNPACK_CFG)
    output.rename(zip_path.parent / ".D.old-abcdefgh")  # killed between the two renames of the swap
    (zip_path.parent / ".D.unpack-12345678" / "train").mkdir(parents=True)  # killed while extracting
    _not_a_zip(zip_path)
    with pytest.raises(UserError):
        unpack_dataset(zip_path, output, UNPACK_CFG)
    assert (output / "manifest.json").is_file()  # the previous dataset is back
    assert leftovers(zip_path.parent, "D") == []


# ---- accepted with skips --------------------------------------------------------------------


def read_manifest(output: Path) -> dict:
    return json.loads((output / "manifest.json").read_text(encoding="utf-8"))


def test_good_zip(zip_path: Path) -> None:
    write_zip(zip_path, good_entries(), compression=zipfile.ZIP_DEFLATED)
    manifest = unpack_dataset(zip_path, zip_path.with_suffix(""), UNPACK_CFG)
    assert manifest == read_manifest(zip_path.with_suffix(""))
    assert manifest["classes"] == ["class_0", "class_1", "class_2"]
    assert manifest["counts"]["train"] == {"class_0": 3, "class_1": 3, "class_2": 3}
    assert manifest["skipped"] == [] and manifest["unseen_classes"] == {"val": [], "test": []}
    assert oct(zip_path.with_suffix("").stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


def test_wrapping_folder_and_junk_are_skipped_with_reasons(zip_path: Path) -> None:
    junk = [
        ("__MACOSX/baseline_split/train/class_0/._img_0.png", b"\x00\x05\x16\x07"),
        ("baseline_split/.DS_Store", b"\x00\x00\x00\x01Bud1"),
        ("baseline_split/train/class_0/.hidden.png", png_bytes(class_image(0, 50, 16))),
        ("baseline_split/train/.thumbnails/img_9.png", png_bytes(class_image(0, 51, 16))),
        ("baseline_split/train/class_1/Thumbs.db", b"x"),
        ("baseline_split/val/class_0/labels.csv", b"a,b\n"),
        ("baseline_split/README.md", b"# data"),
        ("baseline_split/train/loose.png", png_bytes(class_image(0, 52, 16))),
        ("LICENSE", b"MIT"),
    ]
    write_zip(zip_path, [*good_entries(prefix="baseline_split/"), *junk])
    output = zip_path.with_suffix("")
    manifest = unpack_dataset(zip_path, output, UNPACK_CFG)
    assert (output / "train" / "class_0" / "img_0.png").is_file()
    assert not (output / "baseline_split").exists()
    assert all(item["path"].startswith("train/") for item in manifest["splits"]["train"])
    reasons = {item["entry"]: item["reason"] for item in manifest["skipped"]}
    assert reasons == {
        "__MACOSX/baseline_split/train/class_0/._img_0.png": "macOS metadata (__MACOSX)",
        "baseline_split/.DS_Store": "hidden file",
        "baseline_split/train/class_0/.hidden.png": "hidden file",
        "baseline_split/train/.thumbnails/img_9.png": "hidden file",
        "baseline_split/train/class_1/Thumbs.db": "not an image file",
        "baseline_split/val/class_0/labels.csv": "not an image file",
        "baseline_split/README.md": "not an image file",
        "baseline_split/train/loose.png": "not inside <split>/<class>/ (split is one of train, val, test)",
        "LICENSE": "not an image file",
    }
    files = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())
    assert files == sorted(["manifest.json", *(item["path"] for s in ("train", "val", "test") for item in manifest["splits"][s])])


def test_bad_images_are_skipped_and_reported(zip_path: Path) -> None:
    good = png_bytes(class_image(1, 77, 16))
    bad = [
        ("train/class_0/corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256))),
        ("train/class_0/truncated.png", png_bytes(class_image(0, 70, 30))[:300]),
        ("train/class_0/truncated.jpg", image_bytes(class_image(0, 71, 30), "JPEG")[:400]),
        ("train/class_0/zero.png", b""),
        ("train/class_1/text.jpg", b"<html>not found</html>"),
        ("train/class_1/bomb.png", png_with_size(100_000, 100_000)),
        ("val/class_1/big.png", png_bytes(class_image(1, 78, 40))),  # 1600 px, over the 1000 px limit below
        ("test/class_2/mislabelled.webp", good),  # PNG bytes behind a .webp name: decodes, so kept
    ]
    write_zip(zip_path, [*good_entries(), *bad])
    output = zip_path.with_suffix("")
    manifest = unpack_dataset(zip_path, output, {**UNPACK_CFG, "max_image_pixels": 1000})
    reasons = {item["entry"]: item["reason"] for item in manifest["skipped"]}
    assert set(reasons) == {name for name, _ in bad[:-1]}
    assert reasons["train/class_0/zero.png"] == "empty file"
    assert reasons["train/class_0/corrupt.png"].startswith("unreadable image")
    assert "truncated" in reasons["train/class_0/truncated.png"]
    assert reasons["train/class_0/truncated.jpg"].startswith("unreadable image")
    assert reasons["train/class_1/text.jpg"].startswith("unreadable image (UnidentifiedImageError")
    assert "decompression bomb" in reasons["train/class_1/bomb.png"]
    assert reasons["val/class_1/big.png"] == "40x40 pixels, over unpack.max_image_pixels=1000"
    for name in reasons:
        assert not (output / name).exists()
    assert manifest["counts"]["test"]["class_2"] == 3


def test_decompression_bomb_under_pillows_own_limit(zip_path: Path) -> None:
    """10000 x 10000 is under Pillow's hard limit but over unpack.max_image_pixels (Pillow's default)."""
    write_zip(zip_path, [*good_entries(), ("train/class_0/bomb.png", png_with_size(10_000, 10_000))])
    manifest = unpack_dataset(zip_path, zip_path.with_suffix(""), UNPACK_CFG)
    assert [s["entry"] for s in manifest["skipped"]] == ["train/class_0/bomb.png"]
    assert "over unpack.max_image_pixels=89478485" in manifest["skipped"][0]["reason"]


def test_unusual_image_modes_are_kept(zip_path: Path) -> None:
    rgb = class_image(0, 60, 16)
    exif = Image.Exif()
    exif[0x0112] = 6
    odd = [
        ("train/class_0/gray.png", image_bytes(rgb.convert("L"))),
        ("train/class_0/palette.gif", image_bytes(rgb.convert("P"), "GIF")),
        ("train/class_0/rgba.png", image_bytes(rgb.convert("RGBA"))),
        ("train/class_0/cmyk.jpg", image_bytes(rgb.convert("CMYK"), "JPEG")),
        ("train/class_0/deep.png", image_bytes(Image.fromarray(np.full((16, 16), 40000, np.uint16)))),
        ("train/class_0/rotated.jpg", image_bytes(rgb, "JPEG", exif=exif.tobytes())),
        ("train/class_0/bitmap.bmp", image_bytes(rgb.convert("1"), "BMP")),
        ("train/class_0/photo.TIFF", image_bytes(rgb, "TIFF")),
        ("train/class_0/web.webp", image_bytes(rgb, "WEBP")),
    ]
    write_zip(zip_path, [*good_entries(), *odd])
    output = zip_path.with_suffix("")
    manifest = unpack_dataset(zip_path, output, UNPACK_CFG)
    assert manifest["skipped"] == []
    assert manifest["counts"]["train"]["class_0"] == 3 + len(odd)
    for name, _ in odd:
        assert load_image(output / name).mode == "RGB"
    assert load_image(output / "train/class_0/rotated.jpg").size == (16, 16)


def test_unseen_classes_are_kept_reported_and_evaluated(zip_path: Path, caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """val/test classes missing from train/ stay: retrieval needs no class to be known in advance."""
    monkeypatch.setattr(logging.getLogger("imgembed"), "propagate", True)
    extra = [(f"{split}/zebra/img_{i}.png", png_bytes(class_image(7, 300 + i, 16))) for split in ("val", "test") for i in range(3)]
    extra += [(f"test/yak/img_{i}.png", png_bytes(class_image(8, 400 + i, 16))) for i in range(2)]
    write_zip(zip_path, [*good_entries(), *extra])
    output = zip_path.with_suffix("")
    with caplog.at_level(logging.WARNING, logger="imgembed"):
        manifest = unpack_dataset(zip_path, output, UNPACK_CFG)
    assert manifest["unseen_classes"] == {"val": ["zebra"], "test": ["yak", "zebra"]}
    assert manifest["train_classes"] == ["class_0", "class_1", "class_2"]
    assert manifest["classes"] == ["class_0", "class_1", "class_2", "yak", "zebra"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("test/ has 2 class(es) not in train/" in m and "yak, zebra" in m for m in warned)

    # Retrieval metrics over the test split cover the unseen classes like any other.
    test = load_split(output, "test")
    onehot = np.eye(len(test.classes), dtype=np.float32)[test.labels] + 0.01 * np.arange(len(test.labels))[:, None]
    write_embeddings(output.parent / "test.npz", onehot, test.labels, test.classes, test.paths)
    metrics = evaluate_file(output.parent / "test.npz", output.parent / "report", EVAL_CFG)
    per_class = json.loads((output.parent / "report" / "per_class.json").read_text())
    assert per_class["yak"] == 1.0 and per_class["zebra"] == 1.0
    assert per_class["class_0"] == 1.0
    assert metrics["num_queries"] == len(test.labels)


@pytest.mark.parametrize("utf8_flag", [True, False], ids=["utf8-flag", "no-utf8-flag"])
def test_non_ascii_names(zip_path: Path, utf8_flag: bool) -> None:
    names = ["café", "日本語", "Ελληνικά"]

    def info(name: str) -> zipfile.ZipInfo | str:
        return name if utf8_flag else NoUtf8FlagInfo(name)

    entries = [
        (info(f"{split}/{cls}/ñandú_{i}.png"), png_bytes(class_image(c, 500 + 10 * c + i + 100 * s, 16)))
        for s, split in enumerate(("train", "val", "test"))
        for c, cls in enumerate(names)
        for i in range(2)
    ]
    write_zip(zip_path, entries)
    with zipfile.ZipFile(zip_path) as archive:  # the zip really is written the way this case claims
        flags = {bool(i.flag_bits & 0x800) for i in archive.infolist()}
    assert flags == {utf8_flag}
    output = zip_path.with_suffix("")
    manifest = unpack_dataset(zip_path, output, UNPACK_CFG)
    assert manifest["classes"] == sorted(names)
    assert manifest["skipped"] == []
    split = load_split(output, "train")
    assert len(split.paths) == 6
    for path in split.paths:
        assert load_image(output / path).size == (16, 16)
    assert (output / "train" / "日本語" / "ñandú_0.png").is_file()


def test_decomposed_unicode_names_are_normalised(zip_path: Path) -> None:
    """macOS writes é as e + combining accent (NFD); the dataset uses one spelling (NFC)."""
    nfd = unicodedata.normalize("NFD", "café")
    assert nfd != "café"
    entries = [(e[0].replace("class_0", nfd), e[1]) for e in good_entries()]
    write_zip(zip_path, entries)
    manifest = unpack_dataset(zip_path, zip_path.with_suffix(""), UNPACK_CFG)
    assert "café" in manifest["classes"] and nfd not in manifest["classes"]
