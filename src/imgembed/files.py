"""Atomic writes of files and folders: a crash never leaves a half-written output that a rerun would trust."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("imgembed")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes owner-only files; outputs are shared
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class FolderSwap:
    """Replace folder `target` by a new version built beside it: a kill at any moment leaves a whole one.

    A new version is built in a staging folder (`make_staging`) and is complete once it holds
    `marker`, a file written into it last. `swap` renames target to an old-version folder, the
    staging folder to target, then deletes the old version. `recover`, run before the next
    attempt, finishes a swap that a kill (SIGKILL, power loss) interrupted between its renames:
    with target missing, the newest complete version (staging, else old) becomes target; every
    other leftover is deleted. Folder names are `staging_prefix` / `old_prefix` plus a token.
    """

    target: Path
    marker: str
    staging_prefix: str
    old_prefix: str

    def make_staging(self, token: str | None = None) -> Path:
        """An empty staging folder beside target: `staging_prefix + token`, or a unique name when
        token is None (several processes that share the folder need a token they all know)."""
        parent = self.target.parent
        parent.mkdir(parents=True, exist_ok=True)
        if token is None:
            staging = Path(tempfile.mkdtemp(prefix=self.staging_prefix, dir=parent))
        else:
            staging = parent / (self.staging_prefix + token)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; outputs are shared
        return staging

    def swap(self, staging: Path) -> None:
        """Put the complete `staging` in target's place; the previous version is deleted only after."""
        if not (staging / self.marker).is_file():
            raise RuntimeError(f"{staging}: incomplete ({self.marker} missing); not swapped in")
        old = self.target.with_name(self.old_prefix + staging.name[len(self.staging_prefix):])
        shutil.rmtree(old, ignore_errors=True)
        if self.target.exists():
            self.target.rename(old)
        staging.rename(self.target)
        shutil.rmtree(old, ignore_errors=True)

    def recover(self) -> Path | None:
        """Finish an interrupted swap, delete leftovers; the folder that became target, if any."""
        restored = None
        if not self.target.exists():
            complete = [p for p in self._leftovers() if (p / self.marker).is_file()]
            if complete:  # staging folders sort before old ones: the newest complete version wins
                restored = complete[0]
                log.info("restoring %s from %s, left by an interrupted swap", self.target, restored)
                restored.rename(self.target)
        for leftover in self._leftovers():
            log.info("removing %s, left over by an interrupted swap", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        return restored

    def _leftovers(self) -> list[Path]:
        parent = self.target.parent
        found = [sorted(parent.glob(glob.escape(prefix) + "*")) for prefix in (self.staging_prefix, self.old_prefix)]
        return [p for p in found[0] + found[1] if p.is_dir()]
