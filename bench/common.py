"""Shared pieces of the speed benchmarks in bench/ (bench/README.md, section "Speed").

Every benchmark compares the workflow's real code with a raw reference measured in the same
process, alternating the two in blocks, so that a machine shared with other jobs slows both
sides alike and the printed ratio stays meaningful. The last line each script prints is
`RATIO <name> <value...>`; tests/test_bench.py runs every script on tiny settings and checks it.

Run heavy measurements on a shared machine under `flock /tmp/imgembed-heavy.lock ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from generated import ROOT, make_dataset_zip

from imgembed.config import load_config, merge, validate
from imgembed.runtime import autocast as runtime_autocast
from imgembed.runtime import default_device


def bench_config(overrides: dict[str, Any]) -> dict[str, Any]:
    """config/config.yaml with `overrides` merged over it, validated like any run's config."""
    return validate(merge(load_config([ROOT / "config" / "config.yaml"]), overrides))


def make_dataset(workdir: Path, classes: int, per_split: dict[str, int], size: int) -> Path:
    """A generated dataset zip (bench/generated.py), unpacked by the workflow's own unpack code."""
    from imgembed.unpack import unpack_dataset

    workdir = Path(workdir)
    zip_path = make_dataset_zip(workdir / "bench.zip", classes=classes, per_split=per_split, size=size)
    unpack_dataset(zip_path, workdir / "data", bench_config({})["unpack"])
    return workdir / "data"


def workers_setting(value: str) -> int | str:
    """--num-workers: an integer or `auto`, as data.num_workers takes."""
    return value if value == "auto" else int(value)


def build_parser(description: str) -> argparse.ArgumentParser:
    """The options of the training benchmarks (bench_train, bench_frozen, bench_loader)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--backbone", default="efficientnet_b3")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    p.add_argument("--classes", type=int, default=8, help="classes in the generated dataset")
    p.add_argument("--classes-per-batch", type=int, default=8)
    p.add_argument("--samples-per-class", type=int, default=4)
    p.add_argument("--train-per-class", type=int, default=24, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=2)
    p.add_argument("--num-workers", type=workers_setting, default="auto", help="data.num_workers (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup-epochs", type=int, default=1, help="first epochs left out of the ratio")
    p.add_argument("--raw-steps", type=int, default=0, help="raw steps per block (default: one epoch's worth)")
    p.add_argument("--workdir", type=Path, help="default: a temporary folder")
    return p


def train_config(args: argparse.Namespace) -> dict:
    """The config a training benchmark runs: config/config.yaml with the options of build_parser."""
    return bench_config({
        "model": {"backbone": args.backbone, "pretrained": False, "weights": None, "image_size": args.image_size,
                  "export_onnx": False},
        "data": {"classes_per_batch": args.classes_per_batch, "samples_per_class": args.samples_per_class,
                 "num_workers": args.num_workers,
                 "augment": True},  # random weights here (speed only), but time the augmented loader a fine-tune runs
        "train": {"epochs": args.epochs, "warmup_epochs": 1, "mixed_precision": args.precision, "max_seconds": 0},
    })


def device() -> torch.device:
    return default_device()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """The autocast accelerate applies for train.mixed_precision (fp16 on the CPU runs as fp32),
    decided by imgembed.runtime like every stage's."""
    return runtime_autocast(precision, device().type)


class RawTimm:
    """timm's model alone on a synthetic batch: the ceiling the workflow's steps are compared with."""

    def __init__(self, backbone: str, image_size: int, batch_size: int, precision: str, seed: int = 0) -> None:
        import timm

        torch.manual_seed(seed)
        self.model = timm.create_model(backbone, pretrained=False, num_classes=0).to(device())
        self.inputs = torch.randn(batch_size, 3, image_size, image_size, device=device())
        if device().type == "cuda":  # timm's own benchmark uses channels-last on GPUs, and so does the workflow
            self.model.to(memory_format=torch.channels_last)
            self.inputs = self.inputs.contiguous(memory_format=torch.channels_last)
        self.batch_size = batch_size
        self.precision = precision

    def train_step(self) -> None:
        """Forward and backward (no optimizer): what timm's own train benchmark times."""
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        with autocast(self.precision):
            out = self.model(self.inputs)
        out.float().square().mean().backward()

    @torch.inference_mode()
    def infer_step(self) -> None:
        self.model.eval()
        with autocast(self.precision):
            self.model(self.inputs)

    def rate(self, step: Callable[[], None], steps: int) -> tuple[int, float]:
        """(images, seconds) of `steps` timed calls of `step`."""
        sync()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return steps * self.batch_size, time.perf_counter() - started


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep imgembed's INFO lines out of the table (warnings still show)."""
    logger = logging.getLogger("imgembed")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    sys.stdout.flush()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def ratio_line(name: str, *values: float) -> None:
    print("RATIO " + name + "".join(f" {v:.4g}" for v in values), flush=True)
