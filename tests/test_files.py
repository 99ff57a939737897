"""files.FolderSwap: the directory swap with crash recovery that unpack (and checkpoints) use."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgembed.files import FolderSwap


def version(folder: Path, text: str, complete: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.txt").write_text(text)
    if complete:
        (folder / "done").write_text("")
    return folder


def checkpoint_swap(tmp_path: Path) -> FolderSwap:
    """Fixed names, as train.Checkpoints has them: last, last.tmp, last.old."""
    return FolderSwap(tmp_path / "last", "done", staging_prefix="last.tmp", old_prefix="last.old")


def test_swap_replaces_the_folder_and_leaves_nothing_else(tmp_path: Path) -> None:
    swap = FolderSwap(tmp_path / "D", "done", staging_prefix=".D.new-", old_prefix=".D.old-")
    version(tmp_path / "D", "one")
    staging = swap.make_staging()
    assert staging.parent == tmp_path and staging.name.startswith(".D.new-") and not any(staging.iterdir())
    swap.swap(version(staging, "two"))
    assert (tmp_path / "D" / "data.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D"]


def test_an_incomplete_staging_folder_is_never_swapped_in(tmp_path: Path) -> None:
    swap = checkpoint_swap(tmp_path)
    version(tmp_path / "last", "one")
    staging = version(swap.make_staging(token=""), "half", complete=False)
    assert staging.name == "last.tmp"
    with pytest.raises(RuntimeError, match="incomplete"):
        swap.swap(staging)
    assert (tmp_path / "last" / "data.txt").read_text() == "one"


@pytest.mark.parametrize("left, expected", [
    ({"last.old": True, "last.tmp": True}, "last.tmp"),  # killed between the renames: the new version wins
    ({"last.old": True, "last.tmp": False}, "last.old"),  # killed while writing the new one
    ({"last.old": True}, "last.old"),
    ({"last.tmp": False}, None),  # nothing whole to put back
])
def test_recover_puts_back_the_newest_whole_version(tmp_path: Path, left: dict[str, bool], expected: str | None) -> None:
    swap = checkpoint_swap(tmp_path)
    for name, complete in left.items():
        version(tmp_path / name, name, complete)
    restored = swap.recover()
    assert (restored.name if restored else None) == expected
    if expected:
        assert (tmp_path / "last" / "data.txt").read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == (["last"] if expected else [])


def test_recover_keeps_an_existing_target_and_removes_leftovers(tmp_path: Path) -> None:
    swap = checkpoint_swap(tmp_path)
    version(tmp_path / "last", "current")
    version(tmp_path / "last.tmp", "newer but unswapped")
    assert swap.recover() is None
    assert (tmp_path / "last" / "data.txt").read_text() == "current"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
