"""Training speed: the workflow's real training epochs against timm's raw forward+backward.

The training side is `imgembed.train.train_model` itself (generated dataset unpacked by the
unpack stage, image cache, class-balanced sampler and DataLoader workers, accelerate, miner,
loss, optimizer, scheduler, gradient clipping, progress bar); only `run_epoch` is wrapped to
time each epoch. Before every epoch and after the last one, the same timm model (same image
size, batch size and autocast precision) runs forward+backward on a synthetic batch, so each
training epoch is compared with raw blocks measured right before and right after it. Epochs
within --warmup-epochs are reported but left out of the ratio.

    flock /tmp/imgembed-heavy.lock python bench/bench_train.py            # efficientnet_b3, 128 px, bf16, batch 32

Last line: `RATIO train <training images/s divided by raw images/s>` (target >= 0.90).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import RawTimm, build_parser, make_dataset, print_table, quiet, ratio_line, train_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser(__doc__.splitlines()[0]).parse_args(argv)


def run(args: argparse.Namespace, workdir: Path) -> float:
    import imgembed.train as train_mod

    cfg = train_config(args)
    batch = args.classes_per_batch * args.samples_per_class
    data_dir = make_dataset(workdir, args.classes, {"train": args.train_per_class, "val": args.val_per_class,
                                                    "test": 1}, args.image_size)
    steps_per_epoch = args.classes * args.train_per_class // batch
    raw_steps = args.raw_steps or max(1, steps_per_epoch)
    raw = RawTimm(args.backbone, args.image_size, batch, args.precision)
    raw.rate(raw.train_step, 2)  # warm-up: oneDNN primitives, allocator

    blocks: list[tuple[int, float]] = []  # raw (images, seconds) before epoch i, then one after the last
    epochs: list[tuple[int, int, float]] = []  # (epoch, images, seconds)
    original = train_mod.run_epoch

    def raw_block() -> None:
        with torch.random.fork_rng(devices=[]):  # leave training's random streams untouched
            blocks.append(raw.rate(raw.train_step, raw_steps))

    def timed_run_epoch(epoch, *a, **kw):
        raw_block()
        started = time.perf_counter()
        record, seen = original(epoch, *a, **kw)
        epochs.append((epoch, seen, time.perf_counter() - started))
        return record, seen

    train_mod.run_epoch = timed_run_epoch
    try:
        with quiet():
            train_mod.train_model(data_dir, workdir / "model", workdir / "live", cfg)
    finally:
        train_mod.run_epoch = original
    raw_block()

    rows, num, den = [], [0.0, 0.0], [0.0, 0.0]
    for i, (epoch, seen, seconds) in enumerate(epochs):
        raw_images = blocks[i][0] + blocks[i + 1][0]
        raw_seconds = blocks[i][1] + blocks[i + 1][1]
        train_rate, raw_rate = seen / seconds, raw_images / raw_seconds
        measured = epoch > args.warmup_epochs
        rows.append([epoch, seen, round(seconds, 2), train_rate, raw_rate, train_rate / raw_rate,
                     "yes" if measured else "warm-up"])
        if measured:
            num[0] += seen
            num[1] += seconds
            den[0] += raw_images
            den[1] += raw_seconds
    if num[1] == 0:  # every epoch was a warm-up one: use them all rather than nothing
        for i, (_, seen, seconds) in enumerate(epochs):
            num[0] += seen
            num[1] += seconds
            den[0] += blocks[i][0] + blocks[i + 1][0]
            den[1] += blocks[i][1] + blocks[i + 1][1]
    ratio = (num[0] / num[1]) / (den[0] / den[1])
    print(f"train: {args.backbone}, {args.image_size} px, batch {batch}, {args.precision}, "
          f"data.num_workers {args.num_workers}, {torch.get_num_threads()} threads; raw blocks of {raw_steps} steps")
    print_table(["epoch", "images", "seconds", "train img/s", "raw img/s (adjacent)", "ratio", "counted"], rows)
    print(f"overall: train {num[0] / num[1]:.2f} img/s vs raw timm forward+backward {den[0] / den[1]:.2f} img/s")
    return ratio


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        ratio = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
            ratio = run(args, Path(tmp))
    ratio_line("train", ratio)


if __name__ == "__main__":
    main()
