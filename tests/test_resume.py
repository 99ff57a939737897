"""Crashes (issue 5): SIGKILL mid-epoch resumes exactly, NaN stops cleanly, writes are atomic,
and Snakemake reruns only what failed.

The resume test runs the real `python -m imgembed train` in a subprocess, kills it with
SIGKILL in the middle of an epoch, reruns the same command and checks that the model, the
test embeddings and the test metrics are bit-for-bit those of a run that was never killed.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT, TINY_CONFIG, copy_project, make_dataset_zip, reset_accelerate_state

from imgembed import files as files_module
from imgembed import train as train_module
from imgembed.config import load_config
from imgembed.artifacts import write_embeddings
from imgembed.embed import embed_split
from imgembed.errors import UserError
from imgembed.evaluate import evaluate_file
from imgembed.files import atomic_path, write_json
from imgembed.model import create_embedding_net
from imgembed.unpack import unpack_dataset

UNPACK_CFG = {"max_uncompressed_bytes": 10**9, "max_compression_ratio": 200, "max_image_pixels": 10**8}

# `python -m imgembed` with one addition: every objective call is logged to $PROGRESS_FILE and
# may sleep $STEP_SLEEP seconds, so the test can kill it at a known point. Sleeping touches no RNG.
SLOW_TRAIN = """
import os, sys, time
from pathlib import Path
import imgembed.train as train
progress = Path(os.environ["PROGRESS_FILE"])
original = train.Objective.forward
def slow(self, embeddings, labels):
    with progress.open("a") as handle:
        handle.write("call\\n")
    time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
    return original(self, embeddings, labels)
train.Objective.forward = slow
from imgembed.cli import main
sys.exit(main(sys.argv[1:]))
"""


# In-process training and embedding create Accelerators; start and end each test clean.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def tiny_dataset(folder: Path, classes: int = 4, train: int = 12) -> Path:
    zip_path = make_dataset_zip(folder / "d.zip", classes=classes, per_split={"train": train, "val": 4, "test": 4})
    unpack_dataset(zip_path, folder / "data", UNPACK_CFG)
    return folder / "data"


def config_files(folder: Path, overrides: dict) -> list[Path]:
    override = folder / "override.yaml"
    override.write_text(yaml.safe_dump(overrides))
    return [ROOT / "config" / "config.yaml", TINY_CONFIG, override]


def read_state(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / "checkpoints" / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"training ended (rc {process.returncode}) before {what}: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def calls(progress: Path) -> int:
    return len(progress.read_text().splitlines()) if progress.exists() else 0


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "train/images_per_s"} for record in history]


def test_sigkill_mid_epoch_resumes_exactly(tmp_path: Path) -> None:
    data = tiny_dataset(tmp_path)
    configs = [str(p) for p in config_files(tmp_path, {"train": {"epochs": 4}})]
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_TRAIN)

    def command(name: str) -> list[str]:
        return [sys.executable, str(script), "train", str(data), "-o", str(tmp_path / name),
                "--live-dir", str(tmp_path / f"live_{name}"), "--configfile", *configs]

    # One thread each: the two runs share the CPU without oversubscribing it (same count in both: same maths).
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def start(name: str, sleep: float) -> subprocess.Popen:
        env = {**os.environ, **threads, "PROGRESS_FILE": str(tmp_path / f"progress_{name}"), "STEP_SLEEP": str(sleep)}
        return subprocess.Popen(command(name), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    reference = start("reference", 0.0)  # never interrupted; runs alongside
    victim = start("victim", 0.2)
    progress = tmp_path / "progress_victim"
    wait_for(lambda: (read_state(tmp_path / "victim") or {}).get("epoch", 0) >= 1, 240, "epoch 1's checkpoint", victim)
    after_checkpoint = calls(progress)
    wait_for(lambda: calls(progress) > after_checkpoint, 60, "a step of epoch 2", victim)
    victim.send_signal(signal.SIGKILL)  # in the middle of epoch 2's training steps
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert read_state(tmp_path / "victim")["epoch"] == 1
    assert not (tmp_path / "victim" / "embedding_net.pt").exists()

    rerun = subprocess.run(command("victim"), env={**os.environ, **threads, "PROGRESS_FILE": str(progress)},
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stderr and "after epoch 1 of 4" in rerun.stderr
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    assert "resuming" not in err

    # Same training curve, same best epoch, same weights ...
    a, b = read_state(tmp_path / "reference"), read_state(tmp_path / "victim")
    assert b["epoch"] == a["epoch"] == 4
    assert without_timing(b["history"]) == without_timing(a["history"])
    assert (b["best_epoch"], b["best_map_at_5"]) == (a["best_epoch"], a["best_map_at_5"])
    best_a = torch.load(tmp_path / "reference/checkpoints/best.pt", weights_only=True)
    best_b = torch.load(tmp_path / "victim/checkpoints/best.pt", weights_only=True)
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    # ... the DVCLive curves hold every epoch once, including those from before the kill ...
    for name in ("reference", "victim"):
        rows = (tmp_path / f"live_{name}/plots/metrics/train/loss.tsv").read_text().splitlines()
        assert len(rows) == 1 + 4, rows
    # ... and the final test embeddings and metrics are identical.
    cfg = load_config([Path(p) for p in configs])
    metrics = {}
    for name in ("reference", "victim"):
        embed_split(data, tmp_path / name, tmp_path / f"{name}.npz", cfg)
        metrics[name] = evaluate_file(tmp_path / f"{name}.npz", tmp_path / f"report_{name}", cfg)
    with np.load(tmp_path / "reference.npz") as ref, np.load(tmp_path / "victim.npz") as got:
        assert np.array_equal(ref["embeddings"], got["embeddings"])
    assert metrics["victim"] == metrics["reference"]


def test_nan_loss_stops_with_epoch_and_step_and_keeps_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tiny_dataset(tmp_path, classes=3, train=8)
    cfg = load_config(config_files(tmp_path, {"train": {"epochs": 3}}))
    model_dir = tmp_path / "model"
    original = train_module.run_epoch

    class NanObjective:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, embeddings, labels):
            loss, count = self.inner(embeddings, labels)
            return loss * float("nan"), count

    def run_epoch(epoch, model, objective, *args, **kwargs):
        return original(epoch, model, NanObjective(objective) if epoch == 2 else objective, *args, **kwargs)

    monkeypatch.setattr(train_module, "run_epoch", run_epoch)
    with pytest.raises(UserError, match=r"training diverged: loss is nan at epoch 2, step 1; the last good checkpoint") as err:
        train_module.train_model(data, model_dir, tmp_path / "live", cfg)
    assert "\n" not in str(err.value)
    state = read_state(model_dir)
    assert state["epoch"] == 1 and [r["epoch"] for r in state["history"]] == [0, 1]  # 0: the start, scored
    assert json.loads((model_dir / "checkpoints/last/state.json").read_text())["epoch"] == 1
    assert not (model_dir / "embedding_net.pt").exists()
    # The best weights load into a fresh network and give finite embeddings.
    net = create_embedding_net(cfg["model"])
    net.load_state_dict(torch.load(model_dir / "checkpoints/best.pt", weights_only=True))
    out = net.eval()(torch.rand(2, 3, cfg["model"]["image_size"], cfg["model"]["image_size"]))
    assert torch.isfinite(out).all()
    # And the full checkpoint resumes: without the fault, training finishes from epoch 1.
    monkeypatch.setattr(train_module, "run_epoch", original)
    reset_accelerate_state()
    state = train_module.train_model(data, model_dir, tmp_path / "live", cfg)
    assert state["epoch"] == 3 and [r["epoch"] for r in state["history"]] == [0, 1, 2, 3]
    assert (model_dir / "embedding_net.pt").is_file()


@pytest.mark.parametrize("left", [["last.old", "last.tmp"], ["last.old"], ["last.tmp", "last"]])
def test_checkpoint_swap_interrupted_by_a_kill(tmp_path: Path, left: list[str]) -> None:
    """A kill between the renames of Checkpoints.save: the newest whole checkpoint is used."""
    checkpoints = train_module.Checkpoints(tmp_path, "key")
    epochs = {"last.old": 1, "last.tmp": 2, "last": 1}
    for name in left:
        write_json(checkpoints.dir / name / "state.json", {"fingerprint": "key", "epoch": epochs[name]})
    write_json(checkpoints.state_file, {"fingerprint": "key", "epoch": 1})  # the top-level copy lags behind
    checkpoints.recover()
    expected = 1 if left != ["last.old", "last.tmp"] else 2
    assert checkpoints.load_state()["epoch"] == expected


def test_half_written_checkpoint_is_not_resumed(tmp_path: Path) -> None:
    checkpoints = train_module.Checkpoints(tmp_path, "key")
    (checkpoints.dir / "last.tmp").mkdir(parents=True)  # killed inside accelerate's save_state
    checkpoints.recover()
    assert checkpoints.load_state() is None
    write_json(checkpoints.dir / "last" / "state.json", {"fingerprint": "other settings", "epoch": 3})
    assert checkpoints.load_state() is None


# ---- every output is written to a temp file and renamed -------------------------------------


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp" in p.name]


def test_atomic_path_keeps_old_file_on_crash(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and no_temp_files(tmp_path)


def test_embeddings_crash_mid_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "test.npz"
    write_embeddings(target, np.ones((2, 3)), np.array([0, 1]), ["a", "b"], ["x.png", "y.png"])
    before = target.read_bytes()

    def savez(handle, **arrays):
        handle.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(OSError):
        write_embeddings(target, np.zeros((2, 3)), np.array([0, 1]), ["a", "b"], ["x.png", "y.png"])
    assert target.read_bytes() == before and no_temp_files(tmp_path)


def test_metrics_crash_before_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_embeddings(tmp_path / "e.npz", np.eye(4), np.array([0, 0, 1, 1]), ["a", "b"], list("wxyz"))
    evaluate_file(tmp_path / "e.npz", tmp_path / "report", {"evaluate": {"chunk_size": 8}})
    before = (tmp_path / "report" / "metrics.json").read_text()
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("metrics.json"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(files_module.os, "replace", replace)
    write_embeddings(tmp_path / "e.npz", np.ones((4, 4)), np.array([0, 0, 1, 1]), ["a", "b"], list("wxyz"))
    with pytest.raises(KeyboardInterrupt):
        evaluate_file(tmp_path / "e.npz", tmp_path / "report", {"evaluate": {"chunk_size": 8}})
    assert (tmp_path / "report" / "metrics.json").read_text() == before
    assert no_temp_files(tmp_path / "report")


def test_plot_crash_mid_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt

    from imgembed.plots import save_figure

    target = tmp_path / "embedding.png"
    save_figure(plt.figure(), target)
    before = target.read_bytes()

    def savefig(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise MemoryError

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    with pytest.raises(MemoryError):
        save_figure(plt.figure(), target)
    plt.close("all")
    assert target.read_bytes() == before and no_temp_files(tmp_path)


def test_model_export_and_best_weights_crash_mid_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imgembed.artifacts import export_torchscript

    cfg = load_config([ROOT / "config" / "config.yaml", TINY_CONFIG])
    net = create_embedding_net(cfg["model"])
    export_torchscript(net, 32, tmp_path / "embedding_net.pt")
    checkpoints = train_module.Checkpoints(tmp_path, "key")
    checkpoints.save_best(net)
    before = {p.name: p.read_bytes() for p in (tmp_path / "embedding_net.pt", checkpoints.best_file)}

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(torch.jit, "save", broken_save)
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        export_torchscript(net, 32, tmp_path / "embedding_net.pt")
    with pytest.raises(OSError):
        checkpoints.save_best(net)
    assert {p.name: p.read_bytes() for p in (tmp_path / "embedding_net.pt", checkpoints.best_file)} == before
    assert no_temp_files(tmp_path) and no_temp_files(checkpoints.dir)


WRITERS = {"savefig", "write_text", "write_bytes", "savez", "savez_compressed", "save", "export", "dump", "to_csv",
           "save_state", "writestr"}
# Writes that are atomic one level up: into a folder that is renamed into place as a whole.
ATOMIC_BY_FOLDER = {("unpack.py", "_extract"), ("train.py", "save")}
# Not an output but a stage's log, written as the stage runs so that a crash leaves it behind.
STREAMED_LOGS = {("cli.py", "stage_output")}


def test_every_write_in_the_package_goes_through_a_temp_file() -> None:
    """Static check: each file-writing call sits inside `with atomic_path(...)` or writes a temp folder."""
    offenders = []
    for source in sorted((ROOT / "src" / "imgembed").glob("*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

        def inside_atomic(node: ast.AST) -> bool:
            while node in parents:
                node = parents[node]
                if isinstance(node, ast.With) and any(
                    isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", "") == "atomic_path"
                    for item in node.items
                ):
                    return True
                if isinstance(node, ast.FunctionDef) and (source.name, node.name) in ATOMIC_BY_FOLDER | STREAMED_LOGS:
                    return True
            return False

        in_memory = {  # buffer = io.BytesIO(): writing to it writes no file
            target.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "attr", getattr(node.value.func, "id", "")) == "BytesIO"
            for target in node.targets if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            if node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in in_memory:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            writes = name in WRITERS and owner not in ("Image", "checkpoints")  # Checkpoints.save: checked itself
            if name == "open" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                writes = any(c in str(node.args[1].value) for c in "wax+")
            if name == "write_json":  # itself atomic
                writes = False
            if writes and not inside_atomic(node):
                offenders.append(f"{source.name}:{node.lineno} {name}()")
    assert offenders == []


# ---- Snakemake reruns only what failed --------------------------------------------------------


def snakemake(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=project,
                            capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def planned_jobs(project: Path, *configs: str) -> set[str]:
    """Rules a `snakemake --dry-run` would run (besides `all`), from its job-stats table."""
    dry = snakemake(project, *configs, "--dry-run", "--quiet", "rules")
    rows = [line.split() for line in (dry.stdout + dry.stderr).splitlines()]
    return {row[0] for row in rows if len(row) == 2 and row[1].isdigit() and row[0] not in ("all", "total")}


@pytest.mark.e2e
def test_snakemake_reruns_only_the_failed_stage_and_what_depends_on_it(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    make_dataset_zip(project / "data" / "tiny.zip", classes=3, per_split={"train": 6, "val": 3, "test": 3})
    try:
        import umap  # noqa: F401

        pytest.skip("umap-learn is installed, so plots.method=umap does not fail")
    except ImportError:
        pass
    # umap passes the schema but is not installed: the plot stage fails after everything else worked.
    # The same override file is edited in between (the rules' params hold the config file names).
    override = project / "config" / "run.yaml"
    override.write_text(yaml.safe_dump({"datasets": ["tiny"], "plots": {"method": "umap"}}))
    configs = ["--configfile", "config/config.yaml", str(TINY_CONFIG.relative_to(ROOT)), "config/run.yaml"]

    first = snakemake(project, *configs, "--keep-going", check=False)
    assert first.returncode != 0
    assert "umap-learn is not installed" in (project / "logs/plot/tiny.log").read_text()
    for done in ("models/tiny/embedding_net.pt", "embeddings/tiny/test.npz", "reports/tiny/metrics.json"):
        assert (project / done).is_file(), done
    assert not (project / "reports/tiny/plots/embedding.png").exists()
    assert "Traceback" not in (project / "logs/plot/tiny.log").read_text()

    override.write_text(yaml.safe_dump({"datasets": ["tiny"], "plots": {"method": "pca"}}))
    assert planned_jobs(project, *configs) == {"plot"}
    snakemake(project, *configs)
    assert (project / "reports/tiny/plots/embedding.png").is_file()
    assert planned_jobs(project, *configs) == set()

    # A lost intermediate output reruns its stage and everything downstream, nothing upstream.
    (project / "embeddings/tiny/test.npz").unlink()
    assert planned_jobs(project, *configs) == {"embed", "evaluate", "plot", "charts"}
