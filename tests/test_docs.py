"""The documentation cannot drift from what it documents: every config key, the licence."""

from __future__ import annotations

import re

import pytest
import yaml

from helpers import ROOT

tomllib = pytest.importorskip("tomllib", reason="tomllib (reading pyproject.toml) comes with Python 3.11+")


def schema_keys(schema: dict, prefix: str = "") -> list[str]:
    """Dotted names of the leaf keys of the config schema (a section's own keys, recursively)."""
    keys = []
    for name, spec in schema.get("properties", {}).items():
        if spec.get("type") == "object" and "properties" in spec:
            keys.extend(schema_keys(spec, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


def documented(key: str, rows: list[str]) -> bool:
    """`section.key` anywhere in the table, or `key` in a row that starts with `section.…`."""
    section, _, name = key.rpartition(".")
    return any(f"`{key}`" in row or (section and row.startswith(f"| `{section}.") and f"`{name}`" in row.split("|")[1])
               for row in rows)


def test_every_schema_key_is_in_config_readme():
    schema = yaml.safe_load((ROOT / "src/imgembed/schemas/config.schema.yaml").read_text(encoding="utf-8"))
    rows = [line for line in (ROOT / "config/README.md").read_text(encoding="utf-8").splitlines() if line.startswith("| `")]
    keys = schema_keys(schema)
    assert "train.max_seconds" in keys and "model.export_onnx" in keys  # the walk finds nested keys
    missing = [key for key in keys if not documented(key, rows)]
    assert missing == [], f"config keys missing from config/README.md's table: {missing}"


def test_documented_check_can_fail():
    rows = ["| `train.epochs`, `seed` | ... |"]
    assert documented("train.seed", rows) and documented("train.epochs", rows)
    assert not documented("train.lr", rows) and not documented("plots.seed", rows)


def test_license_file_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")


def test_readme_shows_the_console_script():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "imgembed" in project["scripts"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(r"^\$? ?imgembed --help", readme, re.MULTILINE), "README shows `imgembed` beside `python -m imgembed`"
