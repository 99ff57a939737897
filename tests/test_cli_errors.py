"""User mistakes through the CLI (issue 5): exit code 2, one line on stderr, no traceback.

Most cases call `imgembed.cli.main` in-process (fast); a few run the real `python -m imgembed`
in subprocesses to prove that nothing else (warnings, progress bars, tracebacks) reaches stderr.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT, TINY_CONFIG, make_dataset_zip

from imgembed.cli import main
from imgembed.artifacts import write_embeddings

CONFIGS = [str(ROOT / "config" / "config.yaml"), str(TINY_CONFIG)]


# main() points the imgembed logger at each test's stderr, and a stage may create an Accelerator.
pytestmark = pytest.mark.usefixtures("restore_logging", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good unpacked dataset, a bad zip, config overrides and a few broken files."""
    root = tmp_path_factory.mktemp("cli")
    make_dataset_zip(root / "good.zip", classes=3, per_split={"train": 4, "val": 2, "test": 2}, size=16)
    assert main(["unpack", str(root / "good.zip"), "-o", str(root / "data"), "--configfile", *CONFIGS]) == 0
    (root / "notzip.zip").write_bytes(b"%PDF-1.4 not a zip")
    with zipfile.ZipFile(root / "slip.zip", "w") as archive:
        archive.writestr("../../outside.png", b"x")
    overrides = {
        "unknown_key.yaml": {"unpack": {"max_bytes": 5}},
        "bad_value.yaml": {"train": {"lr": -1}},
        "bad_backbone.yaml": {"model": {"backbone": "resnet5O"}},
        "big_batch.yaml": {"data": {"classes_per_batch": 8}},
        "umap.yaml": {"plots": {"method": "umap"}},
    }
    for name, content in overrides.items():
        (root / name).write_text(yaml.safe_dump(content))
    (root / "broken.yaml").write_text("train: {lr: 0.1\n")
    torch.save({"fc.weight": torch.zeros(2, 2)}, root / "other.pth")
    (root / "weights.yaml").write_text(yaml.safe_dump({"model": {"pretrained": True, "weights": str(root / "other.pth")}}))
    (root / "garbage.npz").write_bytes(b"garbage")
    (root / "no_manifest").mkdir()
    (root / "bad_manifest").mkdir()
    (root / "bad_manifest" / "manifest.json").write_text("{not json")
    (root / "empty_model").mkdir()
    write_embeddings(root / "test.npz", np.eye(6), np.array([0, 0, 1, 1, 2, 2]), ["a", "b", "c"],
                     [f"test/class_{i // 2}/img_{i % 2:03d}.png" for i in range(6)])
    return root


def cases(w: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, regex of the one error line)."""
    train = ["train", str(w / "data"), "-o", str(w / "model"), "--live-dir", str(w / "live")]
    return {
        "unpack: not a zip": (["unpack", str(w / "notzip.zip"), "-o", str(w / "out1")], r"notzip\.zip: not a valid zip file"),
        "unpack: missing zip": (["unpack", str(w / "missing.zip"), "-o", str(w / "out2")], r"missing\.zip: file not found"),
        "unpack: zip-slip": (["unpack", str(w / "slip.zip"), "-o", str(w / "out3")], r"entry '\.\./\.\./outside\.png' points outside"),
        "unpack: unknown config key": (["unpack", str(w / "good.zip"), "-o", str(w / "out4"), "+unknown_key.yaml"],
                                       r"unknown key\(s\) 'max_bytes' in 'unpack'; allowed: max_compression_ratio"),
        "unpack: broken YAML": (["unpack", str(w / "good.zip"), "-o", str(w / "out5"), "+broken.yaml"], r"broken\.yaml: not valid YAML"),
        "unpack: missing config file": (["unpack", str(w / "good.zip"), "-o", str(w / "out6"), "+nowhere.yaml"],
                                        r"nowhere\.yaml: config file not found"),
        "train: bad value": ([*train, "+bad_value.yaml"], r"'train\.lr' is -1; allowed: a number > 0"),
        "train: no manifest": (["train", str(w / "no_manifest"), "-o", str(w / "model"), "--live-dir", str(w / "live")],
                               r"manifest\.json: missing; run the unpack stage first"),
        "train: broken manifest": (["train", str(w / "bad_manifest"), "-o", str(w / "model"), "--live-dir", str(w / "live")],
                                   r"manifest\.json: not valid JSON"),
        "train: unknown backbone": ([*train, "+bad_backbone.yaml"], r"model\.backbone: 'resnet5O' is not a timm model; did you mean resnet50"),
        "train: weights do not fit": ([*train, "+weights.yaml"], r"model\.weights: .*other\.pth does not fit backbone test_efficientnet"),
        "train: batch needs more classes": ([*train, "+big_batch.yaml"],
                                            r"data\.classes_per_batch is 8 but the training split has only 3 classes"),
        "embed: no model": (["embed", str(w / "data"), "--model", str(w / "empty_model"), "-o", str(w / "e.npz")],
                            r"empty_model: no trained model there \(model\.json missing\); run the train stage first"),
        "evaluate: missing embeddings": (["evaluate", str(w / "none.npz"), "-o", str(w / "rep")],
                                         r"none\.npz: file not found; run the embed stage first"),
        "evaluate: garbage embeddings": (["evaluate", str(w / "garbage.npz"), "-o", str(w / "rep")],
                                         r"garbage\.npz: not a readable embeddings file"),
        "plot: umap not installed": (["plot", str(w / "test.npz"), "--data", str(w / "data"), "-o", str(w / "plots"), "+umap.yaml"],
                                     r"plots\.method is umap but umap-learn is not installed"),
    }


def full_argv(w: Path, argv: list[str]) -> list[str]:
    extra = [str(w / a[1:]) for a in argv if a.startswith("+")]
    return [*(a for a in argv if not a.startswith("+")), "--configfile", *CONFIGS, *extra]


CASE_NAMES = list(cases(Path("/x")))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_user_error_is_one_line_and_exit_2(name: str, workspace: Path, capsys: pytest.CaptureFixture) -> None:
    argv, message = cases(workspace)[name]
    if name == "plot: umap not installed":
        pytest.importorskip("sklearn")
        try:
            import umap  # noqa: F401

            pytest.skip("umap-learn is installed")
        except ImportError:
            pass
    before = sorted(p.name for p in workspace.iterdir())
    code = main(full_argv(workspace, argv))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert " ERROR " in lines[0]
    assert __import__("re").search(message, lines[0]), lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    after = sorted(p.name for p in workspace.iterdir())
    assert after == before  # nothing written: no output folder, no temp files


REAL = {  # the real CLI in a fresh interpreter: what Snakemake and users see
    "unpack: not a zip": r"ERROR .*notzip\.zip: not a valid zip file",
    "unpack: unknown config key": r"ERROR .*unknown key\(s\) 'max_bytes' in 'unpack'",
    "train: unknown backbone": r"ERROR model\.backbone: 'resnet5O' is not a timm model",
    "train: weights do not fit": r"ERROR model\.weights: .*does not fit backbone",
}


def test_real_cli_processes(workspace: Path) -> None:
    import re

    all_cases = cases(workspace)
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "imgembed", *full_argv(workspace, all_cases[name][0])],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workspace)
        for name in REAL
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, err)
        assert len(lines) == 1, (name, err)
        assert re.search(REAL[name], lines[0]), (name, lines[0])
        assert "Traceback" not in err and out == ""
    assert not (workspace / "out1").exists() and not (workspace / "out4").exists()
    assert not (workspace / "model").exists()
