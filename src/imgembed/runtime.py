"""Every run-time decision in one place: what each `auto` setting becomes, and the precision,
threads and data-loader workers a run uses.

Pure functions of the config and of what the machine offers (a device type, the environment,
the core count), so that each choice is made here once, is logged where it is made, and is
tested without the machine. The stages (train, embed, baseline, search, doctor) and bench/
call them; no stage decides any of these itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import numpy as np
import torch

log = logging.getLogger("imgembed")

AUTO_HEAD_EPOCHS = 2  # train.head_epochs `auto` with pretrained weights: GUIE's schedule (bench/README.md, "Unseen classes")
# train.loss, lr and backbone_lr `auto`: (pretrained weights, random init); measured in bench/README.md, "Unseen classes"
AUTO_LOSS = ("arcface", "triplet")
AUTO_LR = (0.0003, 0.001)
AUTO_BACKBONE_LR = (0.0001, 0.0005)


# ---- devices and precision ----------------------------------------------------------------------

def default_device() -> torch.device:
    """The device a single-process stage runs on: the GPU when CUDA sees one, else the CPU
    (what accelerate picks too)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision_on(device_type: str, requested: str) -> str:
    """The precision that really runs on a device type ("cpu", "cuda") for a requested
    train.mixed_precision (or model.json's precision): accelerate quietly runs fp16 as fp32 on
    the CPU. Train, embed and `imgembed doctor` all report and use this."""
    if requested == "fp16" and device_type == "cpu":
        return "no"
    return requested


def effective_precision(device_type: str, requested: str) -> str:
    """precision_on, with a warning when it is not what the config asked for."""
    precision = precision_on(device_type, requested)
    if precision != requested:
        log.warning("train.mixed_precision=fp16 is not supported on the CPU: running in fp32; use bf16 for real mixed precision")
    return precision


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype for code that runs a network with plain PyTorch rather than
    accelerate (search, baseline, bench/): bf16 anywhere, fp16 on CUDA only; None: fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16" and device_type == "cuda":
        return torch.float16
    return None


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """torch.autocast for autocast_dtype, or nothing when the precision runs in fp32."""
    dtype = autocast_dtype(precision, device_type)
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ---- processes, threads and workers -------------------------------------------------------------

def distributed_on_cpu(environ: dict[str, str] | None = None) -> bool:
    """Several processes and no GPU (train.accelerate: multi_cpu): join them over gloo on the CPU.

    accelerate launch starts local processes only through its multi-GPU launcher, which does not
    pass the config's use_cpu on; without cpu=True each process would train alone on all the data.
    """
    environ = os.environ if environ is None else environ
    return int(environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def cpu_threads(processes: int, environ: dict[str, str] | None = None) -> int:
    """Compute threads for each training process on the CPU.

    `accelerate launch` sets OMP_NUM_THREADS to 1 unless its caller set it, so under `dvc repro`
    (which sets nothing) training used one core of two: 35 % slower than under Snakemake, and
    numerically different. Snakemake gives each job its thread budget in OMP_NUM_THREADS and in
    MKL_NUM_THREADS, which accelerate leaves alone; so the budget is MKL_NUM_THREADS when the caller
    set it (Snakemake's --cores, or a user's own limit), else every core this process may use,
    shared among the training processes.
    """
    environ = os.environ if environ is None else environ
    budget = environ.get("MKL_NUM_THREADS", "")
    if budget.isdigit() and int(budget) > 0:
        cores = int(budget)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, processes))


def resolve_num_workers(setting: int | str, device: torch.device, processes: int = 1) -> int:
    """DataLoader workers for data.num_workers; `auto` is 0 on the CPU, several on a GPU.

    On the CPU, worker processes compete with the compute threads for the same cores: with
    two workers, training on 2 cores ran at 0.80-0.85 of timm's raw speed, with none at 0.99
    (bench/README.md). On a GPU the workers use cores the model leaves idle.
    """
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // max(1, processes) - 1))


# ---- the `auto` values of the config ------------------------------------------------------------

def resolve_model_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """model.freeze_batchnorm `auto`: frozen for pretrained weights, whose ImageNet statistics beat
    ones re-estimated on small batches of a small dataset; trained for a random init, whose
    initial statistics mean nothing."""
    if model_cfg["freeze_batchnorm"] == "auto":
        return {**model_cfg, "freeze_batchnorm": bool(model_cfg["pretrained"])}
    return model_cfg


def resolve_data_cfg(data_cfg: dict[str, Any], model_cfg: dict[str, Any], train_labels: np.ndarray) -> dict[str, Any]:
    """The `auto` data settings, decided here and nowhere else, and logged.

    augment: on for pretrained weights, off for a random init. Measured on the sample digits
    (efficientnet_b3, 64 px, bench/README.md): from random weights, random crops kept a short run
    from fitting at all (val mP@5 0.19 after 4 epochs with them, 0.54 without; test 0.86 after 8
    epochs without), while fine-tuning pretrained weights gained a little from them (test mP@5
    0.979 with, 0.974 without).

    classes_per_batch (P): min(8, training classes), so a first small dataset trains as is.
    samples_per_class (K): min(4, images in the smallest training class), at least 2. pml's
    MPerClassSampler draws any class, and repeats the images of a class smaller than K, which
    would give an anchor copies of itself as positives. Explicit values are used as given
    (class_balanced_sampler refuses a P above the number of classes).
    """
    data_cfg = dict(data_cfg)
    if data_cfg["augment"] == "auto":
        data_cfg["augment"] = bool(model_cfg["pretrained"])
    _, counts = np.unique(train_labels, return_counts=True)
    if data_cfg["classes_per_batch"] == "auto":
        data_cfg["classes_per_batch"] = max(2, min(8, len(counts)))
        log.info("data.classes_per_batch auto: %d (the training split has %d classes)", data_cfg["classes_per_batch"], len(counts))
    if data_cfg["samples_per_class"] == "auto":
        data_cfg["samples_per_class"] = max(2, min(4, int(counts.min()) if len(counts) else 4))
        log.info("data.samples_per_class auto: %d (the smallest training class has %d images)",
                 data_cfg["samples_per_class"], int(counts.min()) if len(counts) else 0)
    return data_cfg


def resolve_train_cfg(train_cfg: dict[str, Any], model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The `auto` training settings, each decided by whether the backbone starts pretrained.

    Measured (bench/README.md, "Unseen classes"; EfficientNet-Lite0 with ImageNet weights, 5
    epochs): on grocery classes never trained on, ArcFace at lr 3e-4 with the backbone at 1e-4
    gained +0.08 mP@5 over the untrained backbone, where the triplet loss at 1e-3 / 5e-4 gained
    nothing, and ArcFace at 1e-3 / 5e-4 only +0.03: a pretrained backbone must move slowly to keep
    what ImageNet taught. From random weights ArcFace fell apart after two epochs (val mP@5 0.71
    -> 0.24), and lr 3e-4 / 1e-4 left the triplet loss far behind 1e-3 / 5e-4 (bench/README.md,
    "From random weights"), so a random init keeps the triplet recipe.
    head_epochs: AUTO_HEAD_EPOCHS for pretrained weights, 0 for a random init (a head on random
    features learns nothing worth keeping); always 0 for a backbone frozen all run, whose every
    epoch trains the head alone anyway; never more than train.epochs.
    """
    which = 0 if model_cfg["pretrained"] else 1
    resolved = dict(train_cfg)
    if resolved["loss"] == "auto":
        resolved["loss"] = AUTO_LOSS[which]
    if resolved["lr"] == "auto":
        resolved["lr"] = AUTO_LR[which]
    if resolved["backbone_lr"] == "auto":
        resolved["backbone_lr"] = AUTO_BACKBONE_LR[which]
    head = resolved["head_epochs"]
    if head == "auto":
        head = AUTO_HEAD_EPOCHS if model_cfg["pretrained"] else 0
    if model_cfg["freeze_backbone"]:
        head = 0
    resolved["head_epochs"] = min(int(head), resolved["epochs"])
    return resolved
