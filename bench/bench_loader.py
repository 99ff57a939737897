"""Input pipeline speed: the training DataLoader alone against the training step it feeds.

Runs the real `imgembed.train.train_model` on a generated dataset with `run_epoch` wrapped:
before each epoch, the very DataLoader training uses (class-balanced sampler, workers, image
cache, augmenting transforms, accelerate's wrapper) is iterated alone for whole epochs and
timed (decoded, transformed images/s); then the epoch itself is timed (training images/s).
The same is done for an identical loader over a dataset without the image cache
(data.cache_bytes: 0, so every image is read and decoded from disk each time). Epochs within
--warmup-epochs are reported but left out of the ratios.

    flock /tmp/imgembed-heavy.lock python bench/bench_loader.py           # efficientnet_b3, 128 px, bf16, batch 32

Last line: `RATIO loader <cached loader images/s divided by training images/s>` (target >= 3);
the uncached ratio is in the table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import build_parser, device, make_dataset, print_table, quiet, ratio_line, train_config  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser(__doc__.splitlines()[0])
    p.set_defaults(epochs=2)
    p.add_argument("--loader-seconds", type=float, default=3.0, help="time each loader measurement at least this long")
    return p.parse_args(argv)


def loader_rate(loader, min_seconds: float, max_passes: int = 50) -> tuple[int, float]:
    """(images, seconds) of whole passes over `loader` (worker start-up included), >= min_seconds."""
    images, started = 0, time.perf_counter()
    for _ in range(max_passes):
        for inputs, _labels in loader:
            images += inputs.shape[0]
        if time.perf_counter() - started >= min_seconds:
            break
    return images, time.perf_counter() - started


def uncached_twin(loader, args: argparse.Namespace) -> DataLoader:
    """train_model's loader rebuilt from the same parts, over the same split and transform,
    but without the image cache (data.cache_bytes: 0)."""
    from imgembed.data import ImageDataset, class_balanced_sampler
    from imgembed.runtime import resolve_num_workers

    cached = loader.dataset
    sampler = class_balanced_sampler(cached.split.labels, args.classes_per_batch, args.samples_per_class)
    return DataLoader(ImageDataset(cached.split, cached.transform, cached.image_size, cache_bytes=0),
                      batch_size=args.classes_per_batch * args.samples_per_class, sampler=sampler, drop_last=True,
                      num_workers=resolve_num_workers(args.num_workers, device()))


def run(args: argparse.Namespace, workdir: Path) -> float:
    import imgembed.train as train_mod

    cfg = train_config(args)
    batch = args.classes_per_batch * args.samples_per_class
    data_dir = make_dataset(workdir, args.classes, {"train": args.train_per_class, "val": args.val_per_class,
                                                    "test": 1}, args.image_size)
    rows: list[list] = []
    original = train_mod.run_epoch

    def timed_run_epoch(epoch, model, objective, optimizer, scheduler, loader, *a, **kw):
        with torch.random.fork_rng(devices=[]):
            cached = loader_rate(loader, args.loader_seconds)
            uncached = loader_rate(uncached_twin(loader, args), args.loader_seconds)
        started = time.perf_counter()
        record, seen = original(epoch, model, objective, optimizer, scheduler, loader, *a, **kw)
        rows.append([epoch, cached[0] / cached[1], uncached[0] / uncached[1], seen / (time.perf_counter() - started)])
        return record, seen

    train_mod.run_epoch = timed_run_epoch
    try:
        with quiet():
            train_mod.train_model(data_dir, workdir / "model", workdir / "live", cfg)
    finally:
        train_mod.run_epoch = original

    table, counted = [], []
    for epoch, cached, uncached, train in rows:
        use = epoch > args.warmup_epochs or args.warmup_epochs >= len(rows)
        table.append([epoch, cached, uncached, train, cached / train, uncached / train, "yes" if use else "warm-up"])
        if use:
            counted.append((cached, uncached, train))
    cached = sum(c for c, _, _ in counted) / len(counted)
    uncached = sum(u for _, u, _ in counted) / len(counted)
    train = sum(t for _, _, t in counted) / len(counted)
    print(f"loader: {args.backbone}, {args.image_size} px images, batch {batch}, data.num_workers {args.num_workers}, "
          f"{args.classes * args.train_per_class} training images")
    print_table(["epoch", "loader img/s (cache)", "loader img/s (no cache)", "train img/s",
                 "ratio (cache)", "ratio (no cache)", "counted"], table)
    print(f"overall: loader {cached:.1f} img/s with the image cache, {uncached:.1f} img/s without; "
          f"training {train:.2f} img/s -> {cached / train:.1f}x and {uncached / train:.1f}x")
    return cached / train


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        ratio = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
            ratio = run(args, Path(tmp))
    ratio_line("loader", ratio)


if __name__ == "__main__":
    main()
