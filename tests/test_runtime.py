"""imgembed.runtime: each run-time decision, as a pure function with hand-computed expectations."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest
import torch

from imgembed import runtime

MODEL = {"pretrained": True, "freeze_backbone": False, "freeze_batchnorm": "auto"}
DATA = {"augment": "auto", "classes_per_batch": "auto", "samples_per_class": "auto"}


@pytest.mark.parametrize("device, requested, runs", [
    ("cpu", "fp16", "no"), ("cpu", "bf16", "bf16"), ("cpu", "no", "no"),
    ("cuda", "fp16", "fp16"), ("cuda", "bf16", "bf16"), ("cuda", "no", "no"),
])
def test_precision_on(device: str, requested: str, runs: str) -> None:
    assert runtime.precision_on(device, requested) == runs


def test_effective_precision_warns_only_when_it_differs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="imgembed"):
        assert runtime.effective_precision("cuda", "fp16") == "fp16"
        assert not caplog.records
        assert runtime.effective_precision("cpu", "fp16") == "no"
    assert len(caplog.records) == 1 and "use bf16" in caplog.records[0].getMessage()


@pytest.mark.parametrize("precision, device, dtype", [
    ("bf16", "cpu", torch.bfloat16), ("bf16", "cuda", torch.bfloat16), ("fp16", "cuda", torch.float16),
    ("fp16", "cpu", None), ("fp16", "mps", None), ("no", "cuda", None), ("no", "cpu", None),
])
def test_autocast_dtype(precision: str, device: str, dtype: torch.dtype | None) -> None:
    assert runtime.autocast_dtype(precision, device) == dtype


def test_autocast_is_real_for_bf16_on_the_cpu_and_absent_for_fp32() -> None:
    assert isinstance(runtime.autocast("no", "cpu"), contextlib.nullcontext)
    assert isinstance(runtime.autocast("fp16", "cpu"), contextlib.nullcontext)
    with runtime.autocast("bf16", "cpu"):
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == torch.bfloat16


def test_cpu_threads_share_the_budget() -> None:
    assert runtime.cpu_threads(1, {"MKL_NUM_THREADS": "8"}) == 8
    assert runtime.cpu_threads(3, {"MKL_NUM_THREADS": "8"}) == 2  # 8 // 3
    assert runtime.cpu_threads(16, {"MKL_NUM_THREADS": "8"}) == 1  # never 0
    assert runtime.cpu_threads(0, {"MKL_NUM_THREADS": "5"}) == 5  # 0 processes counts as one


def test_num_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert runtime.resolve_num_workers("auto", torch.device("cpu"), 2) == 0
    assert runtime.resolve_num_workers("auto", torch.device("cuda"), 1) == 5  # 6 // 1 - 1
    assert runtime.resolve_num_workers("auto", torch.device("cuda"), 2) == 2  # 6 // 2 - 1
    assert runtime.resolve_num_workers("auto", torch.device("cuda"), 8) == 1  # at least one
    assert runtime.resolve_num_workers("4", torch.device("cuda")) == 4  # explicit: as given


def test_model_cfg_freeze_batchnorm_auto() -> None:
    assert runtime.resolve_model_cfg(MODEL)["freeze_batchnorm"] is True
    assert runtime.resolve_model_cfg({**MODEL, "pretrained": False})["freeze_batchnorm"] is False
    explicit = {**MODEL, "freeze_batchnorm": False}
    assert runtime.resolve_model_cfg(explicit) is explicit


def test_data_cfg_auto_values_from_the_training_split() -> None:
    labels = np.array([0] * 5 + [1] * 3 + [2] * 7)  # 3 classes, the smallest has 3 images
    resolved = runtime.resolve_data_cfg(DATA, MODEL, labels)
    assert resolved == {"augment": True, "classes_per_batch": 3, "samples_per_class": 3}
    assert DATA["augment"] == "auto"  # the input is left as it was
    many = np.repeat(np.arange(20), 10)  # 20 classes of 10
    assert runtime.resolve_data_cfg(DATA, {"pretrained": False}, many) == \
        {"augment": False, "classes_per_batch": 8, "samples_per_class": 4}
    one_each = np.arange(1)  # 1 class of 1 image: P and K are at least 2
    assert runtime.resolve_data_cfg(DATA, MODEL, one_each)["classes_per_batch"] == 2
    assert runtime.resolve_data_cfg(DATA, MODEL, one_each)["samples_per_class"] == 2


TRAIN = {"head_epochs": "auto", "epochs": 5, "loss": "auto", "lr": "auto", "backbone_lr": "auto"}


def test_train_cfg_head_epochs() -> None:
    assert runtime.resolve_train_cfg(TRAIN, MODEL)["head_epochs"] == 2
    assert runtime.resolve_train_cfg({**TRAIN, "epochs": 1}, MODEL)["head_epochs"] == 1  # capped
    assert runtime.resolve_train_cfg({**TRAIN, "head_epochs": 4}, {**MODEL, "freeze_backbone": True})["head_epochs"] == 0
    assert runtime.resolve_train_cfg({**TRAIN, "head_epochs": 0}, MODEL)["head_epochs"] == 0


def test_train_cfg_loss_and_learning_rates_follow_pretrained() -> None:
    pretrained = runtime.resolve_train_cfg(TRAIN, MODEL)
    assert (pretrained["loss"], pretrained["lr"], pretrained["backbone_lr"]) == ("arcface", 0.0003, 0.0001)
    scratch = runtime.resolve_train_cfg(TRAIN, {**MODEL, "pretrained": False})
    assert (scratch["loss"], scratch["lr"], scratch["backbone_lr"], scratch["head_epochs"]) == ("triplet", 0.001, 0.0005, 0)
    given = runtime.resolve_train_cfg({**TRAIN, "loss": "proxy_anchor", "lr": 0.01, "backbone_lr": 0.0}, MODEL)
    assert (given["loss"], given["lr"], given["backbone_lr"]) == ("proxy_anchor", 0.01, 0.0)  # explicit values stay
    assert TRAIN["loss"] == TRAIN["lr"] == "auto"  # the input is left as it was


def test_distributed_on_cpu_needs_several_processes_and_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.distributed_on_cpu({"WORLD_SIZE": "3"}) and not runtime.distributed_on_cpu({})
    assert runtime.default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not runtime.distributed_on_cpu({"WORLD_SIZE": "3"})
    assert runtime.default_device() == torch.device("cuda")
