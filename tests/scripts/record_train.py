"""`python -m imgembed` that records, per process, what training read: run it under `accelerate launch`.

Each process appends to `$RECORD_DIR/rank<RANK>.txt` one line per event:
  `epoch N`       an epoch's training steps begin
  `objective H`   an epoch ended; H digests the loss's own parameters (class weights), if it has any
  `item PATH`     the dataset served an image (train/... while training, val/... while validating)
  `validated N`   validation metrics were computed over N embeddings (after gathering)
  `step`          a loss is computed (then sleeps $STEP_SLEEP seconds, touching no RNG)
  `write PATH`    the train stage wrote one of its own files (best.pt, state.json, model.json, the export)
  `live`          DVCLive was opened
"""

import hashlib
import os
import sys
import time
from pathlib import Path

import imgembed.artifacts as artifacts
import imgembed.train as train
from imgembed.data import ImageDataset

record = Path(os.environ["RECORD_DIR"]) / f"rank{os.environ.get('RANK', '0')}.txt"
record.parent.mkdir(parents=True, exist_ok=True)


def note(line: str) -> None:
    with record.open("a") as handle:
        handle.write(line + "\n")


original_getitem = ImageDataset.__getitem__
original_run_epoch = train.run_epoch
original_evaluate = train.evaluate_embeddings
original_objective = train.Objective.forward
original_write_json = train.write_json
original_atomic_path = train.atomic_path
original_export = artifacts.export_torchscript
original_artifacts_write_json = artifacts.write_json
original_open_live = train.open_live


def getitem(self, index):
    note(f"item {self.split.paths[index]}")
    return original_getitem(self, index)


def run_epoch(epoch, model, objective, *args, **kwargs):
    note(f"epoch {epoch}")
    result = original_run_epoch(epoch, model, objective, *args, **kwargs)
    params = [p.detach().cpu().numpy().tobytes() for p in objective.parameters()]
    if params:
        note(f"objective {hashlib.sha256(b''.join(params)).hexdigest()[:16]}")
    return result


def evaluate_embeddings(embeddings, labels, *args, **kwargs):
    note(f"validated {len(labels)}")
    return original_evaluate(embeddings, labels, *args, **kwargs)


def objective(self, embeddings, labels):
    note("step")
    time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
    return original_objective(self, embeddings, labels)


def write_json(path, *args, **kwargs):
    note(f"write {path}")
    return original_write_json(path, *args, **kwargs)


def artifacts_write_json(path, *args, **kwargs):
    note(f"write {path}")
    return original_artifacts_write_json(path, *args, **kwargs)


def atomic_path(path, *args, **kwargs):
    note(f"write {path}")
    return original_atomic_path(path, *args, **kwargs)


def export_torchscript(net, image_size, path):
    note(f"write {path}")
    return original_export(net, image_size, path)


def open_live(*args, **kwargs):
    note("live")
    return original_open_live(*args, **kwargs)


ImageDataset.__getitem__ = getitem
train.write_json = write_json
train.atomic_path = atomic_path
artifacts.export_torchscript = export_torchscript
artifacts.write_json = artifacts_write_json
train.open_live = open_live
train.run_epoch = run_epoch
train.evaluate_embeddings = evaluate_embeddings
train.Objective.forward = objective

from imgembed.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
