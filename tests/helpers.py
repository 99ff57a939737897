"""Shared test helpers: tiny generated datasets and a throw-away copy of the project.

The generators live in bench/generated.py, which the benchmarks use too (bench/ imports
nothing from tests/); they are re-exported here under their old names.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from generated import (  # noqa: E402, F401
    CLONE_FILES,
    PROJECT_FILES,
    ROOT,
    SPLIT_INDEX,
    TINY_CONFIG,
    class_image,
    copy_clone,
    copy_project,
    make_dataset_zip,
    png_bytes,
)


def reset_accelerate_state() -> None:
    """accelerate keeps one process-wide state (device, precision); empty it so a test can create
    an Accelerator with other settings than the previous test's."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def find_tool(name: str) -> str | None:
    """A command-line tool installed by a PyPI wheel (hadolint, actionlint): on PATH, or in the
    running Python's bin folder when the venv is not activated."""
    found = shutil.which(name)
    if found:
        return found
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else None
