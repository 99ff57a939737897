"""`python -m imgembed <stage>`: the one entry point that Snakemake and DVC both call.

Each stage takes its inputs and outputs as arguments and reads the same config files, so the
two orchestrators run identical commands. User mistakes end with one line on stderr and exit
code 2; tracebacks are kept for real bugs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from imgembed import __version__
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

    evaluate_file(args.embeddings, args.output, cfg, baseline=args.baseline)


def _baseline(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from imgembed.baseline import write_baseline

    write_baseline(args.data, args.output, cfg, split=args.split)


def _plot(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from imgembed.plots import plot_embeddings

    plot_embeddings(args.embeddings, args.data, args.output, cfg)


def _charts(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from imgembed.charts import write_charts

    write_charts(args.live_dir, args.model_info, args.reports, args.output)


def _search(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    import json

    from imgembed.search import format_results, search

    result = search(args.model, args.index, args.images, k=args.k, batch_size=args.batch_size, device=args.device,
                    backend=args.backend, root=args.root, workers=args.workers, skip_unreadable=args.skip_unreadable)
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_results(result), flush=True)


def _index(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from imgembed.search import build_index

    build_index(args.folder, args.model, args.output, batch_size=args.batch_size, device=args.device,
                workers=args.workers, skip_unreadable=args.skip_unreadable)


def _doctor(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    from imgembed.doctor import run_doctor

    problems = run_doctor(cfg)
    for problem in problems:
        log.error("%s", problem)
    if problems:
        raise UserError(f"doctor found {len(problems)} problem(s), listed above")
    log.info("no problems found")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgembed", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"imgembed {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--configfile", nargs="+", type=Path, default=[DEFAULT_CONFIG], metavar="YAML",
                        help="config files merged in order, like snakemake --configfile (default: %(default)s)")
    common.add_argument("--log", type=Path, help="also write the log to this file")
    tool = argparse.ArgumentParser(add_help=False)  # commands that need no workflow config (search, index)
    tool.add_argument("--log", type=Path, help="also write the log to this file")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def stage(name: str, func: Callable, help_: str, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common if config else tool], help=help_, description=help_)
        p.set_defaults(func=func)
        if not config:
            p.set_defaults(configfile=None)
        return p

    _add_workflow_stages(stage)
    _add_model_tools(stage)
    return parser


# How build_parser adds one command: stage(name, func, help, config=True) -> its parser.
AddStage = Callable[..., argparse.ArgumentParser]


def _add_workflow_stages(stage: AddStage) -> None:
    """The commands the workflow's rules run, with their inputs and outputs as arguments."""
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
    p.add_argument("--baseline", type=Path, help="baseline.json (from `imgembed baseline`) to compare with, in the log and baseline_comparison.json")
    p = stage("baseline", _baseline, "retrieval without training: raw pixels, the backbone's features before training, and their PCA")
    p.add_argument("data", type=Path, help="unpacked dataset folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="JSON file to write, e.g. reports/sample/baseline.json")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to evaluate (default: %(default)s)")
    p = stage("plot", _plot, "embedding projection and retrieval gallery")
    p.add_argument("embeddings", type=Path)
    p.add_argument("--data", type=Path, required=True, help="unpacked dataset folder (for the gallery images)")
    p.add_argument("-o", "--output", type=Path, required=True, help="plots folder")

    p = stage("charts", _charts, "training curves, did-training-help and per-class charts, and the test metrics table",
              config=False)
    p.add_argument("reports", type=Path, help="report folder with metrics.json, per_class.json, baseline_comparison.json")
    p.add_argument("--live-dir", type=Path, required=True, help="DVCLive folder of the training run, e.g. reports/sample/train")
    p.add_argument("--model-info", type=Path, required=True, help="model.json of the trained model (best epoch)")
    p.add_argument("-o", "--output", type=Path, required=True, help="plots folder")


def _add_model_tools(stage: AddStage) -> None:
    """The commands for a trained model and a machine, outside the workflow: search, index, doctor."""

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", type=Path, required=True, help="model folder with embedding_net.pt and model.json")
        p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
        p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ... (default: %(default)s)")
        p.add_argument("--skip-unreadable", action="store_true", help="leave out images that cannot be read, with a warning, instead of stopping")

    p = stage("search", _search, "find the indexed images nearest to query images", config=False)
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="query image files or folders (searched recursively)")
    p.add_argument("--index", type=Path, required=True, help="embeddings .npz: embeddings/<dataset>/test.npz or one from `imgembed index`")
    model_options(p)
    p.add_argument("-k", type=int, default=5, help="neighbours per query (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--root", type=Path, help="folder the index's paths are relative to (default: the one it records, or data/<dataset> for embeddings/<dataset>/*.npz)")
    p.add_argument("--backend", choices=("auto", "exact", "faiss"), default="auto",
                   help="exact search in PyTorch, or faiss's exact IndexFlatL2; auto uses faiss, when installed, for indexes of 50000 items or more (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default: %(default)s)")
    p = stage("index", _index, "embed every image below a folder into an index for `imgembed search`", config=False)
    p.add_argument("folder", type=Path, help="image folder, searched recursively; an image's class is its parent folder's name")
    model_options(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="index file to write, e.g. index.npz")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-decoding worker processes (default: %(default)s)")
    stage("doctor", _doctor, "check this machine or container before a run: versions, GPUs, the accelerate "
          "config and precision the config would use, writable work folders; non-zero exit on a problem")


class LogFileTee(io.TextIOBase):
    """A stream that writes to the terminal and to the log file, so the log holds everything the
    stage printed (warnings, progress bars, tracebacks), as Snakemake's --show-failed-logs and CI
    show it. In the file, a progress bar's redraws (carriage returns) keep only its last state."""

    def __init__(self, terminal: TextIO, log_file: TextIO) -> None:
        self.terminal, self.log_file, self.pending = terminal, log_file, ""

    def write(self, text: str) -> int:
        self.terminal.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.log_file.write(line.rsplit("\r", 1)[-1] + "\n")
        self.log_file.flush()
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()
        self.log_file.flush()

    def finish(self) -> None:
        """Write a last line that did not end with a newline."""
        if self.pending.rsplit("\r", 1)[-1]:
            self.log_file.write(self.pending.rsplit("\r", 1)[-1] + "\n")
        self.pending = ""

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()


@contextlib.contextmanager
def stage_output(stage: str, log_file: Path | None) -> Iterator[None]:
    """Plain log lines on stderr; with --log, all of stdout and stderr also go to that file (from
    the main process of a distributed run only: the others stay quiet). Restored on exit."""
    rank = int(os.environ.get("RANK", "0"))
    saved = sys.stdout, sys.stderr
    file = None
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file = open(log_file, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        sys.stdout, sys.stderr = LogFileTee(sys.stdout, file), LogFileTee(sys.stderr, file)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s imgembed {stage}: %(levelname)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            if isinstance(stream, LogFileTee):
                stream.finish()
        sys.stdout, sys.stderr = saved
        handler.setStream(sys.stderr)
        if file is not None:
            file.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with stage_output(args.stage, args.log):
        return run_stage(args)


def run_stage(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.configfile) if args.configfile is not None else {}
        args.func(args, cfg)
    except (UserError, ConfigError) as err:
        log.error("%s", err)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception:  # a bug, not a user mistake: keep the whole traceback, in the log file too
        log.exception("unexpected error in %s", args.stage)
        return 1
    return 0
