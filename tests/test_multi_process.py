"""Data-parallel training with two CPU processes (train.accelerate: multi_cpu, issue 13).

The real train stage runs under `accelerate launch --config_file config/accelerate/multi_cpu.yaml`
through tests/scripts/record_train.py, which records per process which images it read, how many
embeddings validation saw and which files it wrote. Checked against a one-process run with the
same seed: the two processes split the one-process batch sequence between them (even and odd
batches), every batch is class-balanced, validation covers every image once, only the main
process writes, and a SIGKILL mid-epoch resumes with both processes. With ArcFace (issue 16) the
loss's class weights stay identical on both processes through the head-only and fine-tuning epochs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml

from helpers import ROOT, TINY_CONFIG, copy_project, make_dataset_zip

pytestmark = pytest.mark.e2e
RECORDER = ROOT / "tests" / "scripts" / "record_train.py"
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 12, 5  # 48 train images: 4 batches of 3 x 4; 20 val: uneven shards
BATCH = 3 * 4  # tiny.yaml: classes_per_batch x samples_per_class
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "2"}  # 2 cores: 1 thread each for 2 processes


def tiny_data(folder: Path) -> Path:
    from imgembed.config import load_config
    from imgembed.unpack import unpack_dataset

    cfg = load_config([ROOT / "config" / "config.yaml", TINY_CONFIG])
    per_split = {"train": TRAIN_PER_CLASS, "val": VAL_PER_CLASS, "test": 4}
    unpack_dataset(make_dataset_zip(folder / "d.zip", classes=CLASSES, per_split=per_split), folder / "data", cfg["unpack"])
    return folder / "data"


def train_command(folder: Path, data: Path, name: str, accelerate: str, epochs: int,
                  train: dict | None = None) -> list[str]:
    override = folder / f"{name}.yaml"
    override.write_text(yaml.safe_dump({"train": {"epochs": epochs, "accelerate": accelerate, **(train or {})}}))
    return ["accelerate", "launch", "--quiet", "--config_file", str(ROOT / "config" / "accelerate" / f"{accelerate}.yaml"),
            str(RECORDER), "train", str(data), "-o", str(folder / name), "--live-dir", str(folder / f"live_{name}"),
            "--configfile", str(ROOT / "config" / "config.yaml"), str(TINY_CONFIG), str(override)]


def environment(folder: Path, name: str, sleep: float = 0.0) -> dict[str, str]:
    return {**os.environ, **THREADS, "RECORD_DIR": str(folder / f"record_{name}"), "STEP_SLEEP": str(sleep)}


def run(folder: Path, data: Path, name: str, accelerate: str, epochs: int,
        train: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(folder, data, name, accelerate, epochs, train), env=environment(folder, name),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(folder: Path, name: str) -> dict[int, list[str]]:
    return {int(p.stem[4:]): p.read_text().splitlines() for p in sorted((folder / f"record_{name}").glob("rank*.txt"))}


def train_batches(lines: list[str]) -> dict[int, list[tuple[str, ...]]]:
    """Per epoch, the training batches one process read, as tuples of image paths."""
    items: dict[int, list[str]] = {}
    epoch = 0
    for line in lines:
        if line.startswith("epoch "):
            epoch = int(line.split()[1])
            items[epoch] = []
        elif line.startswith("item train/") and epoch:
            items[epoch].append(line[len("item "):])
    return {e: [tuple(paths[i:i + BATCH]) for i in range(0, len(paths), BATCH)] for e, paths in items.items()}


def history(model_dir: Path) -> list[dict]:
    state = json.loads((model_dir / "checkpoints" / "state.json").read_text())
    return [{k: v for k, v in r.items() if k != "train/images_per_s"} for r in state["history"]]


def test_two_processes_split_the_batches_validate_everything_once_and_only_the_main_one_writes(tmp_path):
    data = tiny_data(tmp_path)
    single = run(tmp_path, data, "single", "cpu", epochs=2)
    multi = run(tmp_path, data, "multi", "multi_cpu", epochs=2)
    assert "on cpu x1" in single.stderr and "on cpu x2" in multi.stderr
    # Effective batch and schedule are logged: half as many steps per epoch, each of two batches.
    assert "4 steps per epoch of 12 images (1 processes x batch 12)" in single.stderr
    assert "2 steps per epoch of 24 images (2 processes x batch 12); learning-rate schedule over 4 steps" in multi.stderr
    params = yaml.safe_load((tmp_path / "live_multi" / "params.yaml").read_text())
    assert (params["effective_batch_size"], params["steps_per_epoch"]) == (24, 2)

    one, two = records(tmp_path, "single"), records(tmp_path, "multi")
    assert sorted(two) == [0, 1]
    reference = train_batches(one[0])
    rank0, rank1 = train_batches(two[0]), train_batches(two[1])
    assert sorted(reference) == sorted(rank0) == sorted(rank1) == [1, 2]
    for epoch, batches in reference.items():
        assert len(batches) == 4
        # The processes take turns along the sequence one process would train on: no batch twice.
        assert rank0[epoch] == batches[0::2] and rank1[epoch] == batches[1::2]
        assert not set(rank0[epoch]) & set(rank1[epoch])
        for batch in batches:  # class-balanced: 3 classes x 4 images
            assert sorted(Counter(Path(p).parent.name for p in batch).values()) == [4, 4, 4]
    assert reference[1] != reference[2]  # a new order every epoch

    # Validation: each process embeds one batch of 12 (the second pads its 8 remaining images with
    # repeats); gathering drops the repeats, so the metrics see all 20 images once, every time.
    val_items = [[line for line in two[rank] if line.startswith("item val/")] for rank in (0, 1)]
    assert len(val_items[0]) == len(val_items[1]) == 3 * BATCH  # epoch 0 (the start, scored too) and two epochs
    assert len(set(val_items[0]) | set(val_items[1])) == CLASSES * VAL_PER_CLASS
    for rank in (0, 1):
        assert [line for line in two[rank] if line.startswith("validated")] == [f"validated {CLASSES * VAL_PER_CLASS}"] * 3

    # Only the main process writes checkpoints' state, best.pt, DVCLive, the export and model.json.
    written = [line for line in two[0] if line.startswith("write ")]
    assert "live" in two[0] and "live" not in two[1]
    assert not [line for line in two[1] if line.startswith("write ")]
    assert any(w.endswith("best.pt") for w in written) and any(w.endswith("model.json") for w in written)
    assert any(w.endswith("embedding_net.pt") for w in written)
    info = json.loads((tmp_path / "multi" / "model.json").read_text())
    assert info["epochs"] == 2


def test_sigkill_mid_epoch_resumes_with_both_processes(tmp_path):
    data = tiny_data(tmp_path)
    run(tmp_path, data, "reference", "multi_cpu", epochs=3)
    command = train_command(tmp_path, data, "victim", "multi_cpu", epochs=3)
    victim = subprocess.Popen(command, env=environment(tmp_path, "victim", sleep=0.5), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state_file = tmp_path / "victim" / "checkpoints" / "state.json"
    rank0 = tmp_path / "record_victim" / "rank0.txt"
    deadline = time.monotonic() + 600
    while not (state_file.is_file() and json.loads(state_file.read_text())["epoch"] >= 1):
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after epoch 1"
        time.sleep(0.05)
    while "epoch 2" not in rank0.read_text().splitlines() or rank0.read_text().splitlines()[-1] != "step":
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no step in epoch 2"
        time.sleep(0.02)
    # The whole job, as SLURM or the OOM killer would end it: the launcher and both training
    # processes (torchrun starts each in a session of its own, so killing the launcher's group is not enough).
    launcher = psutil.Process(victim.pid)
    for process in [launcher, *launcher.children(recursive=True)]:
        process.send_signal(signal.SIGKILL)
    victim.communicate()
    assert json.loads(state_file.read_text())["epoch"] == 1
    assert not (tmp_path / "victim" / "embedding_net.pt").exists()

    for path in (tmp_path / "record_victim").glob("rank*.txt"):
        path.unlink()
    rerun = subprocess.run(command, env=environment(tmp_path, "victim"), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "after epoch 1 of 3" in rerun.stderr and "on cpu x2" in rerun.stderr
    for lines in records(tmp_path, "victim").values():  # both processes went on from epoch 2
        assert [line for line in lines if line.startswith("epoch ")] == ["epoch 2", "epoch 3"]
    assert history(tmp_path / "victim") == history(tmp_path / "reference")
    assert (tmp_path / "victim" / "embedding_net.pt").is_file()
    rows = (tmp_path / "live_victim" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert len(rows) == 1 + 3


def test_arcface_class_weights_stay_in_step_on_both_processes(tmp_path):
    """A classification loss's class weights are parameters of the objective: DDP must average
    their gradients, or each process would train its own copy (issue 16, with the head epochs)."""
    data = tiny_data(tmp_path)
    result = run(tmp_path, data, "arcface", "multi_cpu", epochs=2, train={"loss": "arcface", "head_epochs": 1})
    assert "on cpu x2" in result.stderr and "the head trained alone for 1 epochs" in result.stderr
    weights = {rank: [line for line in lines if line.startswith("objective ")] for rank, lines in records(tmp_path, "arcface").items()}
    assert sorted(weights) == [0, 1] and len(weights[0]) == 2  # after each of the two epochs
    assert weights[0] == weights[1]  # identical on both processes, bit for bit
    assert weights[0][0] != weights[0][1]  # and they trained
    info = json.loads((tmp_path / "arcface" / "model.json").read_text())
    assert info["loss"] == "arcface" and info["head_epochs"] == 1


def test_snakemake_trains_with_multi_cpu(tmp_path):
    from test_workflow import check_outputs, snakemake, write_override

    project = copy_project(tmp_path / "project")
    make_dataset_zip(project / "data" / "tiny.zip", classes=3, per_split={"train": 8, "val": 4, "test": 4})
    override = write_override(project, "test", {"datasets": ["tiny"], "train": {"accelerate": "multi_cpu"}})
    snakemake(project, "--configfile", "config/config.yaml", "tests/fixtures/tiny.yaml", override)
    check_outputs(project, "tiny", classes=3, test_images=12, embedding_dim=16)
    log = (project / "logs" / "train" / "tiny.log").read_text()
    assert "on cpu x2 (1 threads each)" in log
