"""The train stage: the embedding network trained with train.loss on class-balanced P x K batches.

Launched with `accelerate launch`, which picks the device(s) and the process count; mixed
precision comes from the config. `train_model` reads top to bottom as its steps: set_up,
prepare_data, prepare_optimisation, resume, start_logging, score_start (epoch 0, the start, is
the first candidate), train_epochs (head alone for train.head_epochs, then everything) and
export_best. Each epoch ends with validation retrieval metrics, the best weights by val mP@5,
and a resumable checkpoint, so a rerun after a crash continues where it stopped instead of
starting over. The `auto` settings and the precision are decided by imgembed.runtime, the
model folder is written by imgembed.artifacts.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from imgembed.artifacts import MODEL_FILE, describe_model, write_model_folder
from imgembed.config import fingerprint
from imgembed.data import ImageDataset, Split, build_transform, class_balanced_sampler, load_split
from imgembed.errors import UserError
from imgembed.export import require_onnx
from imgembed.files import FolderSwap, atomic_path, write_json
from imgembed.metrics import evaluate_embeddings
from imgembed.model import EmbeddingNet, create_embedding_net, embed_batches, prefer_channels_last, preprocessing
from imgembed.objectives import Objective, TripletObjective, build_objective  # noqa: F401 (TripletObjective: tests)
from imgembed.runtime import (cpu_threads, distributed_on_cpu, effective_precision, resolve_data_cfg, resolve_model_cfg,
                              resolve_num_workers, resolve_train_cfg)

log = logging.getLogger("imgembed")

STATE_FILE = "state.json"  # a checkpoint's record (fingerprint, epoch, best score, history)


# ---- the maths: schedule ----------------------------------------------------------------

def lr_factor(step: int, total_steps: int, warmup_steps: int, train_cfg: dict[str, Any], steps_per_epoch: int) -> float:
    """Learning-rate multiplier: linear warm-up then cosine decay, or the siamese-triplet recipe's step decay."""
    if train_cfg["scheduler"] == "step":
        return train_cfg["gamma"] ** ((step // max(steps_per_epoch, 1)) // train_cfg["step_size"])
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def backbone_lr_factor(step: int, total_steps: int, warmup_steps: int, train_cfg: dict[str, Any], steps_per_epoch: int,
                       head_steps: int) -> float:
    """The backbone's multiplier: 0 while the head trains alone (train.head_epochs), then the same
    warm-up and decay as the head's, started afresh over the steps that remain."""
    if step < head_steps:
        return 0.0
    return lr_factor(step - head_steps, total_steps - head_steps, warmup_steps, train_cfg, steps_per_epoch)


def is_head_epoch(epoch: int, head_epochs: int) -> bool:
    """Does this epoch train the head alone? Epoch 0 (the start, scored before training) counts
    as the first epoch's phase."""
    return max(epoch, 1) <= head_epochs


# ---- data --------------------------------------------------------------------------------

class FeatureHead(nn.Module):
    """The net, fed with cached backbone features while `features_in` (the head trains alone),
    with images otherwise (after train.head_epochs, everything trains). One module for both
    phases, so accelerate prepares (and DDP wraps, and checkpoints) it once."""

    def __init__(self, net: EmbeddingNet) -> None:
        super().__init__()
        self.net = net
        self.features_in = True

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net.embed_features(inputs) if self.features_in else self.net(inputs)


def cached_features(net: EmbeddingNet, dataset: ImageDataset, batch_size: int, accelerator: Accelerator,
                    desc: str) -> TensorDataset:
    """Backbone features of every image, computed once: a frozen backbone without augmentation
    gives the same features every epoch, so recomputing them is pure waste. The backbone is
    run as it is, not prepared: it is part of the net that accelerate prepares for training."""
    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, shuffle=False))
    features, labels = embed_batches(net.backbone, loader, accelerator, desc=desc)
    return TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))


def contiguous_labels(split: Split) -> Split:
    """The split with its labels renumbered 0..C-1 in the same order: class-weight losses need
    one row per training class, and an unseen-class split trains on a subset of the classes."""
    return replace(split, labels=np.unique(split.labels, return_inverse=True)[1].astype(np.int64))


# ---- checkpointing -----------------------------------------------------------------------

class Checkpoints:
    """models/D/checkpoints/: `last/` (accelerate state + its state.json), `best.pt` and `state.json`.

    state.json records the config fingerprint, the last finished epoch, the best score and the
    per-epoch history, so a resumed run restores its logs too. A checkpoint made with other
    settings is never resumed. `last/` is replaced by files.FolderSwap: the new state is saved
    into `last.tmp/`, whose state.json is written last, then swapped in (the previous one passes
    through `last.old/`), so a kill at any moment leaves one whole checkpoint and the epoch count
    always belongs to the weights it describes. Resuming reads the copy inside `last/`; the copy
    beside it is for people and tools.
    """

    def __init__(self, model_dir: Path, key: str) -> None:
        self.dir = model_dir / "checkpoints"
        self.key = key
        self.state_file = self.dir / STATE_FILE
        self.best_file = self.dir / "best.pt"
        self.last = FolderSwap(self.dir / "last", STATE_FILE, staging_prefix="last.tmp", old_prefix="last.old")

    def load_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads((self.last.target / STATE_FILE).read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None
        if state.get("fingerprint") != self.key:
            log.info("ignoring checkpoint in %s: made with other settings", self.dir)
            return None
        return state

    def recover(self) -> None:
        """Finish a save that a kill interrupted between its renames (main process only)."""
        self.last.recover()

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def save(self, accelerator: Accelerator, state: dict[str, Any]) -> None:
        """Every process saves its part of the accelerate state into `last.tmp/`; the main one then
        adds state.json and swaps it in."""
        staging = self.dir / self.last.staging_prefix  # make_staging(token="") names it so on every process
        if accelerator.is_main_process:
            self.last.make_staging(token="")
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(staging / STATE_FILE, state)  # written last: the marker of a whole checkpoint
            self.last.swap(staging)
            write_json(self.state_file, state)
        accelerator.wait_for_everyone()

    def save_best(self, net: nn.Module) -> None:
        with atomic_path(self.best_file) as tmp:
            torch.save(net.state_dict(), tmp)


# ---- logging -----------------------------------------------------------------------------

def open_live(live_dir: Path, params: dict[str, Any], history: list[dict[str, float]]) -> Any:
    """DVCLive without its side effects: no DVC experiment, no edits to dvc.yaml."""
    from dvclive import Live

    live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    live.log_params(params)
    for record in history:  # restore the epochs a previous, interrupted run logged
        log_epoch(live, record)
    return live


def log_epoch(live: Any, record: dict[str, float]) -> None:
    for key, value in record.items():
        if key != "epoch":
            live.log_metric(key, value)
    live.next_step()


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---- the training run, top to bottom -----------------------------------------------------

def train_model(data_dir: Path, model_dir: Path, live_dir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The train stage. Reads data_dir's manifest.json and its train and val images; writes
    model_dir (embedding_net.pt, model.json, embedding_net.onnx with model.export_onnx, and
    checkpoints/ to resume from) and live_dir (DVCLive's params.yaml, metrics and plots).
    Returns the last checkpoint's state (epochs run, best epoch and score, per-epoch history)."""
    run = set_up(cfg)
    data = prepare_data(run, data_dir)
    fit = prepare_optimisation(run, data)
    checkpoints, state = resume(run, data, model_dir)
    live = start_logging(run, data, fit, live_dir, state)
    if not state["history"]:
        score_start(run, data, fit, checkpoints, live, state)
    timing = train_epochs(run, data, fit, checkpoints, live, state)
    export_best(run, data, fit, checkpoints, live, state, timing, model_dir)
    run.accelerator.wait_for_everyone()
    return state


@dataclass
class Run:
    """What set_up decided: the resolved settings and the accelerator (device, processes, precision)."""

    cfg: dict[str, Any]  # the whole config, as given (logged as DVCLive params)
    model_cfg: dict[str, Any]  # resolved (imgembed.runtime)
    train_cfg: dict[str, Any]  # resolved
    accelerator: Accelerator
    precision: str  # what really runs (runtime.effective_precision)
    budget_started: float  # train.max_seconds counts set-up (image and feature caches) too

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def head_epochs(self) -> int:
        return int(self.train_cfg["head_epochs"])

    @property
    def frozen(self) -> bool:
        return bool(self.model_cfg["freeze_backbone"])


@dataclass
class TrainingData:
    """What prepare_data built: the splits, the network and the loaders of each phase."""

    data_cfg: dict[str, Any]  # resolved
    train_split: Split
    val_split: Split
    net: EmbeddingNet
    description: dict[str, Any]  # model.json's description of net (artifacts.describe_model)
    sampler: Any  # the class-balanced sampler both train loaders draw from
    batch_size: int  # per process
    loaders: dict[str, tuple[DataLoader, DataLoader]]  # "features" and/or "images": (train, val)
    trainable: nn.Module  # net, or FeatureHead(net) when head-only epochs run on cached features

    @property
    def use_feature_cache(self) -> bool:
        return "features" in self.loaders


@dataclass
class Optimisation:
    """What prepare_optimisation built, prepared by accelerate (on the device, DDP-wrapped)."""

    trainable: nn.Module
    objective: Objective
    val_loss: bool  # whether the objective can score held-out classes (Objective.has_val_loss)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loaders: dict[str, tuple[DataLoader, DataLoader]]
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


@dataclass
class Timing:
    """This run's clock (not a resumed run's): model.json's timings and the closing log line."""

    started: float  # the epoch loop began
    loop_seconds: float = 0.0
    step_seconds: float = 0.0  # inside run_epoch only
    images_seen: int = 0


def set_up(cfg: dict[str, Any]) -> Run:
    """Resolve the `auto` settings, check that the export can happen (onnx installed) before hours
    of training, start accelerate with this machine's threads, and seed."""
    model_cfg = resolve_model_cfg(cfg["model"])
    train_cfg = resolve_train_cfg(cfg["train"], model_cfg)
    require_onnx(model_cfg)
    budget_started = time.perf_counter()
    # While the head trains alone the backbone's weights take no part in the loss: DDP must be told.
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if train_cfg["head_epochs"] else []
    accelerator = Accelerator(mixed_precision=train_cfg["mixed_precision"], cpu=distributed_on_cpu(), kwargs_handlers=ddp)
    precision = effective_precision(accelerator.device.type, train_cfg["mixed_precision"])
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(accelerator.num_processes))
    set_seed(train_cfg["seed"])
    return Run(cfg, model_cfg, train_cfg, accelerator, precision, budget_started)


def prepare_data(run: Run, data_dir: Path) -> TrainingData:
    """The splits, the network (with its model.json description) and the loaders: on cached
    backbone features for the head-only epochs (a frozen backbone, or the first train.head_epochs)
    when nothing augments the images; on images for the epochs that fine-tune everything."""
    accelerator, model_cfg = run.accelerator, run.model_cfg
    train_split, val_split = contiguous_labels(load_split(data_dir, "train")), load_split(data_dir, "val")
    data_cfg = resolve_data_cfg(run.cfg["data"], model_cfg, train_split.labels)
    net = prefer_channels_last(create_embedding_net(model_cfg), accelerator.device)
    description = describe_model(model_cfg, net.backbone.num_features,
                                 preprocessing(net.backbone, model_cfg["image_size"]), run.precision)
    use_feature_cache = (run.frozen or run.head_epochs > 0) and not data_cfg["augment"]
    batch_size = data_cfg["classes_per_batch"] * data_cfg["samples_per_class"]
    sampler = class_balanced_sampler(train_split.labels, data_cfg["classes_per_batch"], data_cfg["samples_per_class"])
    train_images, val_images = image_datasets(train_split, val_split, description, data_cfg, model_cfg["image_size"])
    loaders: dict[str, tuple[DataLoader, DataLoader]] = {}
    trainable: nn.Module = net
    if use_feature_cache:
        net.to(accelerator.device)
        train_set = cached_features(net, train_images, batch_size, accelerator, "train features")
        val_set = cached_features(net, val_images, batch_size, accelerator, "val features")
        loaders["features"] = (DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=0),
                               DataLoader(val_set, batch_size=batch_size, shuffle=False, num_workers=0))
        trainable = FeatureHead(net)
    if not (run.frozen and use_feature_cache):
        workers = resolve_num_workers(data_cfg["num_workers"], accelerator.device, accelerator.num_processes)
        kwargs: dict[str, Any] = dict(batch_size=batch_size, num_workers=workers, pin_memory=accelerator.device.type == "cuda")
        loaders["images"] = (DataLoader(train_images, sampler=sampler, drop_last=True, **kwargs),
                             DataLoader(val_images, shuffle=False, **kwargs))
    return TrainingData(data_cfg, train_split, val_split, net, description, sampler, batch_size, loaders, trainable)


def image_datasets(train_split: Split, val_split: Split, description: dict[str, Any], data_cfg: dict[str, Any],
                   image_size: int) -> tuple[ImageDataset, ImageDataset]:
    """(train, val) images: train with data_cfg's augmentation, val with the evaluation transform."""
    eval_transform = build_transform(description, data_cfg, training=False)
    train_images = ImageDataset(train_split, build_transform(description, data_cfg, training=True), image_size,
                                data_cfg["cache_bytes"])
    val_images = ImageDataset(val_split, eval_transform, image_size, data_cfg["cache_bytes"])
    return train_images, val_images


def prepare_optimisation(run: Run, data: TrainingData) -> Optimisation:
    """The objective (train.loss), the optimiser over the head, the backbone and the loss's own
    weights, accelerate's preparation of all of them, and the learning-rate schedule."""
    train_cfg, accelerator = run.train_cfg, run.accelerator
    objective = build_objective(train_cfg, int(data.train_split.labels.max()) + 1, run.model_cfg["embedding_dim"])
    val_loss = objective.has_val_loss
    groups, schedules = param_groups(data.net, objective, train_cfg, run.frozen)
    optim_cls = torch.optim.AdamW if train_cfg["optimizer"] == "adamw" else torch.optim.Adam
    # foreach: one multi-tensor update instead of a Python loop over ~400 parameters (PyTorch's
    # default on the GPU only); profiling showed the per-parameter loop in every CPU step.
    optimizer = optim_cls(groups, weight_decay=train_cfg["weight_decay"], foreach=True)
    has_weights = bool(list(objective.parameters()))
    modules = [data.trainable, objective] if has_weights else [data.trainable]  # prepared: on the device, DDP, checkpointed
    flat_loaders = [loader for pair in data.loaders.values() for loader in pair]
    prepared = accelerator.prepare(*modules, optimizer, *flat_loaders)
    trainable, objective = prepared[0], (prepared[1] if has_weights else objective)
    optimizer = prepared[len(modules)]
    prepared_loaders = iter(prepared[len(modules) + 1:])
    loaders = {name: (next(prepared_loaders), next(prepared_loaders)) for name in data.loaders}

    steps_per_epoch = len(next(iter(loaders.values()))[0])  # the same sampler feeds both train loaders
    total_steps = steps_per_epoch * train_cfg["epochs"]
    warmup_steps = steps_per_epoch * train_cfg["warmup_epochs"]
    head_steps = steps_per_epoch * run.head_epochs
    factors = {
        "head": lambda step: lr_factor(step, total_steps, warmup_steps, train_cfg, steps_per_epoch),
        "backbone": lambda step: backbone_lr_factor(step, total_steps, warmup_steps, train_cfg, steps_per_epoch, head_steps),
    }
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [factors[name] for name in schedules])
    accelerator.register_for_checkpointing(scheduler)
    return Optimisation(trainable, objective, val_loss, optimizer, scheduler, loaders, steps_per_epoch, total_steps,
                        warmup_steps)


def param_groups(net: EmbeddingNet, objective: Objective, train_cfg: dict[str, Any],
                 frozen: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """The optimiser's parameter groups, and the schedule each follows ("head" or "backbone"):
    the head at train.lr; the backbone at train.backbone_lr unless frozen; the loss's class
    weights at train.loss_lr without weight decay, since the loss divides their norm out."""
    groups = [{"params": list(net.head.parameters()), "lr": train_cfg["lr"]}]
    schedules = ["head"]
    if not frozen and train_cfg["backbone_lr"] > 0:
        groups.append({"params": list(net.backbone.parameters()), "lr": train_cfg["backbone_lr"]})
        schedules.append("backbone")
    loss_params = list(objective.parameters())
    if loss_params:
        groups.append({"params": loss_params, "lr": train_cfg["loss_lr"], "weight_decay": 0.0})
        schedules.append("head")
    return groups, schedules


def set_phase(run: Run, data: TrainingData, fit: Optimisation, epoch: int) -> tuple[DataLoader, DataLoader]:
    """Freeze or unfreeze the backbone for this epoch (train.head_epochs); the (train, val)
    loaders it trains and validates on: cached features while the head trains alone, if cached."""
    head_only = run.frozen or is_head_epoch(epoch, run.head_epochs)
    if not run.frozen:
        data.net.freeze_backbone = head_only  # EmbeddingNet.train keeps a frozen backbone in eval mode
        data.net.backbone.requires_grad_(not head_only)
    on_features = head_only and data.use_feature_cache
    if data.use_feature_cache:
        run.accelerator.unwrap_model(fit.trainable).features_in = on_features
    return fit.loaders["features" if on_features else "images"]


def resume(run: Run, data: TrainingData, model_dir: Path) -> tuple[Checkpoints, dict[str, Any]]:
    """The checkpoints and the state to continue from: the last checkpoint's when it was made
    with these settings (its weights, optimiser and schedule loaded), else a fresh start."""
    accelerator = run.accelerator
    checkpoints = Checkpoints(model_dir, fingerprint(
        {k: v for k, v in run.model_cfg.items() if k != "export_onnx"},  # export only: checkpoints stay valid
        data.data_cfg, run.train_cfg, data.train_split.classes, len(data.train_split.paths)))
    if run.main:
        checkpoints.recover()
    accelerator.wait_for_everyone()
    state = checkpoints.load_state()
    if state is not None:
        accelerator.load_state(str(checkpoints.last.target))
        log.info("resuming from %s after epoch %d of %d", checkpoints.dir, state["epoch"], run.train_cfg["epochs"])
    else:
        if run.main:
            checkpoints.clear()
        state = {"fingerprint": checkpoints.key, "epoch": 0, "best_map_at_5": -1.0, "best_epoch": 0, "history": []}
    accelerator.wait_for_everyone()
    return checkpoints, state


def start_logging(run: Run, data: TrainingData, fit: Optimisation, live_dir: Path, state: dict[str, Any]) -> Any:
    """DVCLive (main process; None elsewhere) with the params and the history so far, and the
    two log lines that say what this run trains, on what, and how."""
    accelerator, model_cfg, data_cfg, train_cfg = run.accelerator, run.model_cfg, data.data_cfg, run.train_cfg
    # Data-parallel: each process takes its own batch per step, so a step sees `processes` batches
    # (gradients averaged) and an epoch has 1/processes as many steps; the schedule counts these steps.
    effective_batch = data.batch_size * accelerator.num_processes
    live = open_live(live_dir, {**flatten(run.cfg), "precision_effective": run.precision, "effective_batch_size": effective_batch,
                                "steps_per_epoch": fit.steps_per_epoch}, state["history"]) if run.main else None
    log.info(
        "training %s (%s, %s) on %s x%d%s, precision %s: %d train / %d val images, batch %d (%d classes x %d), "
        "loss %s, lr %g (backbone %g), %d epochs%s%s",
        model_cfg["backbone"], "pretrained" if model_cfg["pretrained"] else "random init",
        "frozen backbone" if run.frozen else "fine-tuned", accelerator.device.type,
        accelerator.num_processes, f" ({torch.get_num_threads()} threads each)" if accelerator.device.type == "cpu" else "",
        run.precision, len(data.train_split.paths), len(data.val_split.paths), data.batch_size,
        data_cfg["classes_per_batch"], data_cfg["samples_per_class"], train_cfg["loss"], train_cfg["lr"],
        0.0 if run.frozen else train_cfg["backbone_lr"], train_cfg["epochs"],
        f" (the first {run.head_epochs} on the head alone)" if run.head_epochs else "",
        ", cached backbone features" if data.use_feature_cache else "",
    )
    log.info("%d steps per epoch of %d images (%d processes x batch %d); learning-rate schedule over %d steps, %d of warm-up",
             fit.steps_per_epoch, effective_batch, accelerator.num_processes, data.batch_size, fit.total_steps,
             fit.warmup_steps)
    return live


def score_start(run: Run, data: TrainingData, fit: Optimisation, checkpoints: Checkpoints, live: Any,
                state: dict[str, Any]) -> None:
    """Epoch 0: the start is scored like every epoch, and is the first candidate for the export."""
    val_loader = set_phase(run, data, fit, 0)[1]
    record = {"epoch": 0, **validate(fit.trainable, fit.objective, val_loader, run.accelerator,
                                     run.cfg["evaluate"]["chunk_size"], fit.val_loss)}
    state["history"].append(record)
    state["best_map_at_5"], state["best_epoch"] = record["val/map_at_5"], 0
    if run.main:
        log_epoch(live, record)
        checkpoints.save_best(data.net)
        log.info("epoch 0 (the start): val P@1 %.3f, val mP@5 %.3f", record["val/precision_at_1"], record["val/map_at_5"])


def train_epochs(run: Run, data: TrainingData, fit: Optimisation, checkpoints: Checkpoints, live: Any,
                 state: dict[str, Any]) -> Timing:
    """The epochs left after state["epoch"]: train, validate, keep the best, checkpoint; stop
    early when train.max_seconds is spent."""
    train_cfg = run.train_cfg
    timing = Timing(started=time.perf_counter())
    class_order = list(data.sampler.labels)  # MPerClassSampler shuffles this list in place, carrying state across epochs
    for epoch in range(state["epoch"] + 1, train_cfg["epochs"] + 1):
        set_seed(train_cfg["seed"] + epoch)  # each epoch reproducible on its own, so resuming is exact
        data.sampler.labels = list(class_order)  # ... so each epoch starts from the same order, resumed or not
        train_loader, val_loader = set_phase(run, data, fit, epoch)
        if epoch == run.head_epochs + 1 and run.head_epochs:
            log.info("epoch %d: the head trained alone for %d epochs; now fine-tuning the backbone too", epoch, run.head_epochs)
        epoch_started = time.perf_counter()
        record, seen = run_epoch(epoch, fit.trainable, fit.objective, fit.optimizer, fit.scheduler, train_loader,
                                 run.accelerator, train_cfg)
        timing.step_seconds += time.perf_counter() - epoch_started
        timing.images_seen += seen
        record.update(validate(fit.trainable, fit.objective, val_loader, run.accelerator, run.cfg["evaluate"]["chunk_size"],
                               fit.val_loss))
        end_epoch(run, data.net, checkpoints, live, state, record)
        if out_of_time(run.budget_started, train_cfg, run.accelerator):
            if epoch < train_cfg["epochs"]:
                log.info("train.max_seconds (%g s) spent: stopping after epoch %d of %d",
                         train_cfg["max_seconds"], epoch, train_cfg["epochs"])
            break
    timing.loop_seconds = time.perf_counter() - timing.started
    return timing


def end_epoch(run: Run, net: EmbeddingNet, checkpoints: Checkpoints, live: Any, state: dict[str, Any],
              record: dict[str, float]) -> None:
    """Record the epoch: history and DVCLive, best.pt when val mP@5 improved, the log line, and
    the resumable checkpoint (every process takes part in saving it)."""
    epoch = int(record["epoch"])
    state["history"].append(record)
    state["epoch"] = epoch
    if run.main:
        log_epoch(live, record)
        improved = record["val/map_at_5"] > state["best_map_at_5"]
        if improved:
            state["best_map_at_5"], state["best_epoch"] = record["val/map_at_5"], epoch
            checkpoints.save_best(net)
        log.info("epoch %d/%d: train loss %.4f, val loss %s, val P@1 %.3f, val mP@5 %.3f%s",
                 epoch, run.train_cfg["epochs"], record["train/loss"],
                 f"{record['val/loss']:.4f}" if "val/loss" in record else "n/a",
                 record["val/precision_at_1"], record["val/map_at_5"], " (best)" if improved else "")
    checkpoints.save(run.accelerator, state)


def export_best(run: Run, data: TrainingData, fit: Optimisation, checkpoints: Checkpoints, live: Any,
                state: dict[str, Any], timing: Timing, model_dir: Path) -> None:
    """The best weights (epoch 0, the start, included) into the model folder (artifacts.write_model_folder),
    with what training recorded; DVCLive closed (main process)."""
    # accelerate patched autocast into forward(); remove it so the exported net is plain fp32.
    run.accelerator.unwrap_model(fit.trainable, keep_fp32_wrapper=False)
    if not run.main:
        return
    net = data.net
    net.load_state_dict(torch.load(checkpoints.best_file, map_location="cpu", weights_only=True))
    net.freeze_backbone = run.frozen
    if state["best_epoch"] == 0:
        log.warning("no epoch beat the starting weights (val mP@5 %.3f); exporting the start", state["best_map_at_5"])
    write_model_folder(model_dir, net, run.model_cfg, data.description, dict(
        best_epoch=state["best_epoch"], best_val_map_at_5=state["best_map_at_5"], epochs=state["epoch"],
        start_val_map_at_5=state["history"][0]["val/map_at_5"], loss=run.train_cfg["loss"],
        head_epochs=run.head_epochs,
        setup_seconds=round(timing.started - run.budget_started, 3),  # this run's timings (not a resumed run's)
        loop_seconds=round(timing.loop_seconds, 3),
        train_images_per_s=round(timing.images_seen / max(timing.step_seconds, 1e-9), 2)))
    live.end()
    elapsed = time.perf_counter() - timing.started
    log.info("done: best val mP@5 %.3f at epoch %d; %s written (%.0f s, %.1f img/s)",
             state["best_map_at_5"], state["best_epoch"], model_dir / MODEL_FILE,
             elapsed, timing.images_seen / max(elapsed, 1e-9))


# ---- one epoch ---------------------------------------------------------------------------

def out_of_time(started: float, train_cfg: dict[str, Any], accelerator: Accelerator) -> bool:
    """train.max_seconds spent? When any process has run out, all of them stop together."""
    budget = train_cfg.get("max_seconds", 0)
    if not budget:
        return False
    spent = torch.tensor(float(time.perf_counter() - started >= budget), device=accelerator.device)
    return bool(accelerator.reduce(spent, reduction="sum").item() > 0) if accelerator.num_processes > 1 else bool(spent.item())


def run_epoch(epoch: int, model: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer,
              scheduler: Any, loader: DataLoader, accelerator: Accelerator, train_cfg: dict[str, Any]) -> tuple[dict[str, float], int]:
    model.train()
    total_loss, steps, seen = 0.0, 0, 0
    started = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}/{train_cfg['epochs']}", leave=False,
               disable=not accelerator.is_main_process, mininterval=1)
    for step, (inputs, labels) in enumerate(bar, start=1):
        with accelerator.autocast():
            embeddings = model(inputs)
        loss, _ = objective(embeddings, labels)
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if accelerator.num_processes > 1:  # stop all processes together, or the others wait forever
            finite = accelerator.gather(finite).min().reshape(1)
        if not finite.item():
            raise UserError(
                f"training diverged: loss is {loss.item()} at epoch {epoch}, step {step}; the last good checkpoint "
                "is kept under models/<dataset>/checkpoints/ (try a lower train.lr or train.mixed_precision: no)"
            )
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if train_cfg["grad_clip"] > 0:
            accelerator.clip_grad_norm_(model.parameters(), train_cfg["grad_clip"])
        optimizer.step()
        scheduler.step()
        total_loss += loss.item()
        steps += 1
        seen += labels.shape[0] * accelerator.num_processes
        bar.set_postfix(loss=f"{total_loss / steps:.4f}", img_s=f"{seen / (time.perf_counter() - started):.1f}")
    lr = optimizer.param_groups[0]["lr"]
    return {"epoch": epoch, "train/loss": total_loss / max(steps, 1), "train/lr": lr,
            "train/images_per_s": seen / (time.perf_counter() - started)}, seen


def validate(model: nn.Module, objective: Objective, loader: DataLoader, accelerator: Accelerator,
             chunk_size: int, with_loss: bool = True) -> dict[str, float]:
    """Leave-one-out retrieval metrics on val, plus the val loss on fixed mixed-class chunks for
    the losses that can score classes they were not trained on (`with_loss`, pair-based losses)."""
    embeddings, labels = embed_batches(model, loader, accelerator, desc="validate")
    metrics = evaluate_embeddings(embeddings, labels, chunk_size)
    out = {"val/precision_at_1": metrics["precision_at_1"], "val/map_at_5": metrics["map_at_5"]}
    if with_loss:
        order = np.random.RandomState(0).permutation(len(labels))  # fixed chunks that mix classes
        chunk = loader.total_batch_size if hasattr(loader, "total_batch_size") else loader.batch_size
        losses_ = []
        emb_t, lab_t = torch.from_numpy(embeddings), torch.from_numpy(labels)
        for start in range(0, len(order), chunk):
            idx = torch.from_numpy(order[start : start + chunk])
            losses_.append(objective(emb_t[idx], lab_t[idx])[0].item())
        out = {"val/loss": float(np.mean(losses_)), **out}
    return out
