"""Frozen-backbone training: cached backbone features against recomputing them every epoch.

With model.freeze_backbone: true and data.augment: false, `train_model` computes the backbone
features of every image once (`cached_features`) and trains only the head on them
(`FeatureHead`). The original pipeline instead pushed every image through the frozen backbone in every
epoch. This runs `train_model` both ways on the same generated dataset and settings: the
recomputing run is the same code with `cached_features` replaced by "return the image dataset
itself" and `FeatureHead` by "the whole network", so each epoch feeds images through the
frozen backbone (in eval mode, as EmbeddingNet keeps it) exactly as the original pipeline did. Only the
bench patches these names; src/ is unchanged.

Timed per epoch: the training epoch plus its validation (both recompute the backbone in the
original pipeline's way). The one-off feature extraction of the cached run is reported separately. The
runs must also give the same results: the same validation metrics in every epoch and the same
head weights at the end (compared exactly, with the largest difference printed).

    flock /tmp/imgembed-heavy.lock python bench/bench_frozen.py           # efficientnet_b3, 128 px, bf16, batch 32

Last line: `RATIO frozen <recomputing epoch-2 seconds divided by cached epoch-2 seconds>` (target >= 20).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import build_parser, make_dataset, print_table, quiet, ratio_line, train_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser(__doc__.splitlines()[0])
    p.set_defaults(epochs=3, train_per_class=32, val_per_class=8)
    p.add_argument("--epoch", type=int, default=2, help="the epoch whose time is compared")
    return p.parse_args(argv)


def train_once(args: argparse.Namespace, cfg: dict, data_dir: Path, out: Path, recompute: bool) -> dict:
    """One train_model run; per-epoch seconds (train + validate), history and final head weights."""
    import imgembed.train as train_mod

    times: dict[int, float] = {}
    setup: list[float] = []
    saved = {name: getattr(train_mod, name) for name in ("run_epoch", "validate", "cached_features", "FeatureHead")}
    current = {"epoch": 0}

    def run_epoch(epoch, *a, **kw):
        current["epoch"] = epoch
        started = time.perf_counter()
        result = saved["run_epoch"](epoch, *a, **kw)
        times[epoch] = times.get(epoch, 0.0) + time.perf_counter() - started
        return result

    def validate(*a, **kw):
        started = time.perf_counter()
        result = saved["validate"](*a, **kw)
        times[current["epoch"]] = times.get(current["epoch"], 0.0) + time.perf_counter() - started
        return result

    def cached_features(net, dataset, *a, **kw):
        started = time.perf_counter()
        result = dataset if recompute else saved["cached_features"](net, dataset, *a, **kw)
        setup.append(time.perf_counter() - started)
        return result

    train_mod.run_epoch, train_mod.validate, train_mod.cached_features = run_epoch, validate, cached_features
    if recompute:
        train_mod.FeatureHead = lambda net: net
    try:
        with quiet():
            state = train_mod.train_model(data_dir, out / "model", out / "live", cfg)
    finally:
        for name, value in saved.items():
            setattr(train_mod, name, value)
    best = torch.load(out / "model" / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    head = {k: v for k, v in best.items() if k.startswith("head.")}
    return {"times": times, "setup": sum(setup), "history": state["history"], "head": head}


def run(args: argparse.Namespace, workdir: Path) -> float:
    cfg = train_config(args)
    cfg["model"]["freeze_backbone"] = True
    cfg["data"]["augment"] = False
    data_dir = make_dataset(workdir, args.classes, {"train": args.train_per_class, "val": args.val_per_class,
                                                    "test": 1}, args.image_size)
    cached = train_once(args, cfg, data_dir, workdir / "cached", recompute=False)
    seed = train_once(args, cfg, data_dir, workdir / "recompute", recompute=True)
    cached_again = train_once(args, cfg, data_dir, workdir / "cached2", recompute=False)  # brackets the slow run

    epoch = min(args.epoch, args.epochs)
    rows = []
    for e in sorted(seed["times"]):
        fast = (cached["times"][e] + cached_again["times"][e]) / 2
        rows.append([e, seed["times"][e], fast, seed["times"][e] / fast])
    ratio = seed["times"][epoch] / ((cached["times"][epoch] + cached_again["times"][epoch]) / 2)

    same_history = all(
        a[key] == b[key]
        for a, b in zip(cached["history"], seed["history"])
        for key in a
        if key.startswith("val/") or key == "train/loss"
    )
    max_diff = max((cached["head"][k].float() - seed["head"][k].float()).abs().max().item() for k in cached["head"])
    same_head = all(torch.equal(cached["head"][k], seed["head"][k]) for k in cached["head"])
    print(f"frozen: {args.backbone}, {args.image_size} px, batch {args.classes_per_batch * args.samples_per_class}, "
          f"{args.precision}, {args.classes * args.train_per_class} train / {args.classes * args.val_per_class} val "
          f"images, {args.epochs} epochs")
    print_table(["epoch", "recompute s (seed)", "cached s", "ratio"], rows)
    print(f"one-off feature extraction of the cached run: {cached['setup']:.2f} s "
          f"(about {cached['setup'] / max(seed['times'][epoch], 1e-9):.2f} recomputing epochs)")
    for a, b in zip(cached["history"], seed["history"]):
        loss = (f"; train loss cached {a['train/loss']:.6f} recompute {b['train/loss']:.6f}"
                if "train/loss" in a else " (the start, before training)")
        print(f"epoch {a['epoch']}: val mP@5 cached {a['val/map_at_5']:.6f} recompute {b['val/map_at_5']:.6f}{loss}")
    print(f"identical results: history {'yes' if same_history else 'NO'}, head weights "
          f"{'yes' if same_head else 'NO'} (largest difference {max_diff:.3g})")
    return ratio


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        ratio = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_frozen_") as tmp:
            ratio = run(args, Path(tmp))
    ratio_line("frozen", ratio)


if __name__ == "__main__":
    main()
