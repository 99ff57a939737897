"""Retrieval quality of the siamese-triplet recipe and the default recipe at the same wall-clock budget.

    python bench/bench_quality.py --zip data/sample.zip --backbone tf_efficientnet_lite0 \
        --weights weights/tf_efficientnet_lite0.pth --budget-seconds 150 --image-size 64

Unpacks the zip into a temporary folder and reports, on its test split (leave-one-out, as the
evaluate stage does):

* baselines without training: raw pixels, the backbone's pooled features before training and
  their PCA to embedding_dim (see imgembed.baseline);
* each recipe (``siamese_triplet`` = config/config.yaml + config/siamese_triplet.yaml, ``default`` =
  config/config.yaml), trained with the same budget: a one-epoch probe times set-up and one
  epoch, the real run gets as many epochs as fit (so its learning-rate schedule completes),
  and ``train.max_seconds`` stops it in any case.

Every stage runs as the pipeline runs it (``python -m imgembed train|embed|evaluate``).
``--unseen`` first rewrites the zip so that val/test classes never appear in train
(bench/unseen_classes.py); ``--seeds`` trains each recipe once per seed and reports the mean
and the spread (max - min). Each trained row shows its mP@5 minus the untrained backbone's. The
last line is ``RATIO quality <default map_at_5 minus siamese_triplet map_at_5>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # unseen_classes.py beside this file
BASE_CONFIG = ROOT / "config" / "config.yaml"
RECIPES = {"siamese_triplet": [ROOT / "config" / "siamese_triplet.yaml"], "default": []}
MAX_EPOCHS = 500


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zip", type=Path, required=True, help="dataset zip (train/ val/ test/ with one folder per class)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm model name (default: %(default)s)")
    p.add_argument("--weights", type=Path, help="local backbone weights (sets model.pretrained: true)")
    p.add_argument("--pretrained", action="store_true", help="timm hub weights (needs internet) when --weights is not given")
    p.add_argument("--budget-seconds", type=float, default=150.0, help="wall-clock training budget per recipe (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=64, help="model.image_size (default: %(default)s)")
    p.add_argument("--embedding-dim", type=int, help="model.embedding_dim (default: config/config.yaml's)")
    p.add_argument("--configfile", type=Path, nargs="*", default=[],
                   help="extra config files merged over config/config.yaml for every row (e.g. tests/fixtures/tiny.yaml)")
    p.add_argument("--recipe", action="append", default=[], metavar="NAME=FILE[,FILE...]",
                   help="add or replace a recipe: config files merged over config/config.yaml (NAME= alone: the default config)")
    p.add_argument("--only", nargs="+", help="run only these recipes (default: all)")
    p.add_argument("--skip-baselines", action="store_true", help="leave out the rows without training")
    p.add_argument("--no-probe", action="store_true", help="no timing probe: epochs stay as configured, only the budget stops training")
    p.add_argument("--workdir", type=Path, help="keep all outputs here (default: a temporary folder, removed)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--unseen", action="store_true",
                   help="unseen-class protocol: val/test classes disjoint from train (bench/unseen_classes.py)")
    p.add_argument("--seeds", type=int, nargs="+", help="train.seed values: one run each, mean and spread reported")
    return p.parse_args(argv)


def run(cmd: list[str], log_file: Path) -> float:
    """Run an imgembed stage; its output goes to log_file; raise with the log's tail on failure."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    with open(log_file, "a", encoding="utf-8") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        code = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if code != 0:
        tail = "\n".join(log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
        raise SystemExit(f"bench_quality: {' '.join(cmd[2:4])} failed (exit {code}); last lines of {log_file}:\n{tail}")
    return time.perf_counter() - started


def imgembed(stage: str, *args: Any, configs: list[Path], log_file: Path) -> float:
    cmd = [sys.executable, "-m", "imgembed", stage, *map(str, args), "--configfile", *map(str, configs)]
    return run(cmd, log_file)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def recipes_from(args: argparse.Namespace) -> dict[str, list[Path]]:
    recipes = dict(RECIPES)
    for spec in args.recipe:
        name, _, files = spec.partition("=")
        recipes[name] = [Path(f) for f in files.split(",") if f]
    if args.only:
        unknown = set(args.only) - set(recipes)
        if unknown:
            raise SystemExit(f"bench_quality: unknown recipe(s) {sorted(unknown)}; known: {sorted(recipes)}")
        recipes = {name: recipes[name] for name in args.only}
    return recipes


def common_overrides(args: argparse.Namespace, data_dir: Path, configs: list[Path]) -> dict[str, Any]:
    """What every row shares: backbone, weights, image size, and a P that the data allows."""
    from imgembed.config import load_config

    cfg = load_config(configs)
    classes = len(json.loads((data_dir / "manifest.json").read_text())["classes"])
    model: dict[str, Any] = {"backbone": args.backbone, "image_size": args.image_size,
                             "pretrained": bool(args.weights or args.pretrained),
                             "weights": str(args.weights.resolve()) if args.weights else None}
    if args.embedding_dim:
        model["embedding_dim"] = args.embedding_dim
    per_batch = cfg["data"]["classes_per_batch"]  # auto adapts to the data by itself
    return {"model": model, "data": {"classes_per_batch": per_batch if per_batch == "auto" else min(per_batch, classes)}}


def train_recipe(name: str, files: list[Path], args: argparse.Namespace, data_dir: Path, work: Path,
                 shared: list[Path], log_file: Path) -> dict[str, Any]:
    base = [BASE_CONFIG, *args.configfile, *files, *shared]
    row: dict[str, Any] = {"row": name}
    epochs = None
    if not args.no_probe:
        probe = work / f"{name}_probe"
        configs = base + [write_yaml(work / f"{name}_probe.yaml", {"train": {"epochs": 1, "max_seconds": 0}})]
        imgembed("train", data_dir, "-o", probe / "model", "--live-dir", probe / "live", configs=configs, log_file=log_file)
        info = json.loads((probe / "model" / "model.json").read_text())
        epoch_seconds = max(info["loop_seconds"], 1e-3)
        epochs = int(min(MAX_EPOCHS, max(1, math.floor((args.budget_seconds - info["setup_seconds"]) / epoch_seconds))))
        row.update(probe_setup_s=info["setup_seconds"], probe_epoch_s=epoch_seconds)
    override: dict[str, Any] = {"train": {"max_seconds": args.budget_seconds}}
    if epochs is not None:
        override["train"]["epochs"] = epochs
    configs = base + [write_yaml(work / f"{name}_budget.yaml", override)]
    out = work / name
    wall = imgembed("train", data_dir, "-o", out / "model", "--live-dir", out / "live", configs=configs, log_file=log_file)
    imgembed("embed", data_dir, "--model", out / "model", "-o", out / "test.npz", configs=configs, log_file=log_file)
    imgembed("evaluate", out / "test.npz", "-o", out / "report", configs=configs, log_file=log_file)
    info = json.loads((out / "model" / "model.json").read_text())
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    row.update({k: metrics[k] for k in ("precision_at_1", "map_at_5", "map_at_r")})
    row.update(epochs=info["epochs"], best_epoch=info["best_epoch"], train_s=info["setup_seconds"] + info["loop_seconds"],
               train_wall_s=wall, images_per_s=info["train_images_per_s"])
    return row


def over_seeds(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a recipe's runs (one per seed): the mean of each figure, the mP@5 spread."""
    row: dict[str, Any] = {"row": name, "seeds": [r["seed"] for r in runs], "runs": runs}
    for key in ("precision_at_1", "map_at_5", "map_at_r", "epochs", "best_epoch", "train_s", "images_per_s"):
        row[key] = sum(r[key] for r in runs) / len(runs)
    row["map_at_5_spread"] = max(r["map_at_5"] for r in runs) - min(r["map_at_5"] for r in runs)
    return row


def print_table(rows: list[dict[str, Any]], header: str) -> None:
    print(header)
    untrained = next((r["map_at_5"] for r in rows if r["row"] == "backbone"), None)
    print(f"{'row':<16} {'P@1':>6} {'mP@5':>6} {'spread':>6} {'vs untrained':>12} {'MAP@R':>6} {'epochs':>6} "
          f"{'best ep':>7} {'train s':>8} {'seeds':>5}")
    for r in rows:
        trained = "epochs" in r
        delta = f"{r['map_at_5'] - untrained:+.3f}" if trained and untrained is not None else "-"
        spread = f"{r['map_at_5_spread']:.3f}" if "map_at_5_spread" in r else "-"
        print(f"{r['row']:<16} {r['precision_at_1']:6.3f} {r['map_at_5']:6.3f} {spread:>6} {delta:>12} {r['map_at_r']:6.3f} "
              f"{r['epochs'] if trained else '-':>6} {r['best_epoch'] if trained else '-':>7} "
              f"{r['train_s'] if trained else 0:8.0f} {len(r.get('seeds', [])) or '-':>5}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.zip.is_file():
        raise SystemExit(f"bench_quality: {args.zip}: file not found (the digits sample: python -m imgembed sample -o data/sample.zip)")
    if args.weights and not args.weights.is_file():
        raise SystemExit(f"bench_quality: {args.weights}: file not found")
    recipes = recipes_from(args)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench_quality_")
    work = Path(args.workdir or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log_file = work / "bench.log"
    try:
        data_dir = work / "data"
        if not (data_dir / "manifest.json").exists():
            source = args.zip.resolve()
            if args.unseen:
                from unseen_classes import write_unseen_zip

                source = work / f"{args.zip.stem}_unseen.zip"
                write_unseen_zip(args.zip.resolve(), source)
            imgembed("unpack", source, "-o", data_dir, configs=[BASE_CONFIG], log_file=log_file)
        shared = [write_yaml(work / "shared.yaml", common_overrides(args, data_dir, [BASE_CONFIG, *args.configfile]))]
        rows: list[dict[str, Any]] = []
        if not args.skip_baselines:
            out = work / "baseline.json"
            imgembed("baseline", data_dir, "-o", out, configs=[BASE_CONFIG, *args.configfile, *shared], log_file=log_file)
            for name, metrics in json.loads(out.read_text()).items():
                rows.append({"row": name, **metrics})
        for name, files in recipes.items():
            runs = []
            for seed in args.seeds or [None]:
                run_name, extra = name, []
                if seed is not None:
                    run_name = f"{name}_seed{seed}"
                    extra = [write_yaml(work / f"{run_name}.yaml", {"train": {"seed": seed}})]
                runs.append(train_recipe(run_name, [*files, *extra], args, data_dir, work, shared, log_file) | {"seed": seed})
                print(f"bench_quality: {run_name}: mP@5 {runs[-1]['map_at_5']:.3f} after {runs[-1]['epochs']} epochs "
                      f"(best epoch {runs[-1]['best_epoch']})", file=sys.stderr)
            rows.append(over_seeds(name, runs) if args.seeds else runs[0] | {"row": name})
        weights = args.weights.name if args.weights else ("timm hub" if args.pretrained else "random init")
        print_table(rows, f"# {args.zip.name}{' (unseen classes)' if args.unseen else ''}: test split, leave-one-out; "
                          f"{args.backbone} ({weights}), {args.image_size} px, training budget {args.budget_seconds:g} s per recipe")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        by_name = {r["row"]: r for r in rows}
        if "siamese_triplet" in by_name and "default" in by_name:
            print(f"RATIO quality {by_name['default']['map_at_5'] - by_name['siamese_triplet']['map_at_5']:.4f}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
