"""`python -m imgembed <stage>`: the one entry point that Snakemake and DVC both call.

Each stage takes its inputs and outputs as arguments and reads the same config files, so the
two orchestrators run identical commands. User mistakes end with one line on stderr and exit
code 2; tracebacks are kept for real bugs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from imgembed.config import DEFAULT_CONFIG, ConfigError, load_config
from imgembed.errors import UserError

log = logging.getLogger("imgembed")


def _sample(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from imgembed.sample import build_sample_zip

    build_sample_zip(args.output, cfg["sample"])


def _unpack(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from imgembed.unpack import unpack_dataset

    unpack_dataset(args.zip, args.output, cfg["unpack"])


def _train(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from imgembed.train import train_model

    train_model(args.data, args.output, args.live_dir, cfg)


def _embed(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from imgembed.embed import embed_split

    embed_split(args.data, args.model, args.output, cfg)


def _evaluate(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from imgembed.evaluate import evaluate_file

    evaluate_file(args.embeddings, args.output, cfg)


def _plot(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from imgembed.plots import plot_embeddings

    plot_embeddings(args.embeddings, args.data, args.output, cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgembed", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--configfile", nargs="+", type=Path, default=[DEFAULT_CONFIG], metavar="YAML",
                        help="config files merged in order, like snakemake --configfile (default: %(default)s)")
    common.add_argument("--log", type=Path, help="also write the log to this file")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def stage(name: str, func: Callable, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    p = stage("sample", _sample, "build the sample dataset zip from scikit-learn's digits")
    p.add_argument("-o", "--output", type=Path, required=True, help="zip to write, e.g. data/sample.zip")
    p = stage("unpack", _unpack, "validate a dataset zip and unpack it atomically")
    p.add_argument("zip", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="dataset folder, e.g. data/sample")
    p = stage("train", _train, "train the embedding network (run under accelerate launch)")
    p.add_argument("data", type=Path, help="unpacked dataset folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="model folder, e.g. models/sample")
    p.add_argument("--live-dir", type=Path, required=True, help="DVCLive folder, e.g. reports/sample/train")
    p = stage("embed", _embed, "embed the test split with the exported network")
    p.add_argument("data", type=Path)
    p.add_argument("--model", type=Path, required=True, help="model folder with embedding_net.pt and model.json")
    p.add_argument("-o", "--output", type=Path, required=True, help="embeddings file, e.g. embeddings/sample/test.npz")
    p = stage("evaluate", _evaluate, "leave-one-out retrieval metrics of an embeddings file")
    p.add_argument("embeddings", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="report folder for metrics.json and per_class.json")
    p = stage("plot", _plot, "embedding projection and retrieval gallery")
    p.add_argument("embeddings", type=Path)
    p.add_argument("--data", type=Path, required=True, help="unpacked dataset folder (for the gallery images)")
    p.add_argument("-o", "--output", type=Path, required=True, help="plots folder")
    return parser


def setup_logging(stage: str, log_file: Path | None) -> None:
    """Plain lines on stderr (and in --log); only the main process of a distributed run speaks."""
    rank = int(os.environ.get("RANK", "0"))
    fmt = logging.Formatter(f"%(asctime)s imgembed {stage}: %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(fmt)
    log.handlers[:] = handlers
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.stage, args.log)
    try:
        cfg = load_config(args.configfile)
        args.func(args, cfg)
    except (UserError, ConfigError) as err:
        log.error("%s", err)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    return 0
