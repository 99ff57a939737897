"""Workflow overhead: a no-op `snakemake --cores all` and a no-op `dvc repro`.

Builds a git + DVC clone of the project with a tiny generated dataset and the tiny model
settings (tests/fixtures/tiny.yaml), runs the whole workflow once with Snakemake, lets DVC adopt
those very outputs (`dvc commit`: both orchestrators write the same files), then times each
orchestrator's run with nothing to do, --repeats times. `snakemake --dry-run` is in the table too.

    flock /tmp/imgembed-heavy.lock python bench/bench_overhead.py

Last line: `RATIO overhead <median snakemake seconds> <median dvc repro seconds>` (target < 5 s each).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, ratio_line  # noqa: E402
from generated import copy_clone, make_dataset_zip  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, help="default: a temporary folder")
    return p.parse_args(argv)


def environment(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python, accelerate, snakemake
    env.update(DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(workdir / "dvc-site-cache"),
               GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.com",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.com")
    return env


def timed(project: Path, env: dict[str, str], *cmd: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"bench_overhead: {' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds, done.stdout + done.stderr


def run(args: argparse.Namespace, workdir: Path) -> tuple[float, float]:
    project = workdir / "project"
    copy_clone(project)
    make_dataset_zip(project / "data" / "tiny.zip", classes=3, per_split={"train": 8, "val": 4, "test": 4})
    env = environment(workdir)
    snakemake = ("snakemake", "--cores", "all")
    dvc = (sys.executable, "-m", "dvc")
    for cmd in (("git", "init", "-q"), ("git", "add", "-A"), ("git", "commit", "-qm", "project"),
                (*dvc, "init", "-q"), (*dvc, "add", "data/tiny.zip"), ("git", "add", "-A"),
                ("git", "commit", "-qm", "dvc")):
        timed(project, env, *cmd)
    first, _ = timed(project, env, *snakemake)
    timed(project, env, *snakemake, "data/sample.zip")  # dvc.yaml's `sample` stage always exists
    adopt, _ = timed(project, env, *dvc, "commit", "--force", "dvc.yaml")  # offline: not the import
    rows, medians = [["snakemake --cores all (first run, the whole tiny workflow)", first, ""],
                     ["dvc commit --force dvc.yaml (DVC adopts Snakemake's outputs)", adopt, ""]], {}
    for name, cmd, idle in (("snakemake --cores all", snakemake, "Nothing to be done"),
                            ("snakemake --cores all --dry-run", (*snakemake, "--dry-run"), "Nothing to be done"),
                            ("dvc repro", (*dvc, "repro"), "Data and pipelines are up to date")):
        times = []
        for _ in range(args.repeats):
            seconds, output = timed(project, env, *cmd)
            if idle not in output:
                sys.exit(f"bench_overhead: {name} was not a no-op:\n{output[-3000:]}")
            times.append(seconds)
        medians[name] = statistics.median(times)
        rows.append([f"{name} (no-op)", medians[name], " ".join(f"{t:.2f}" for t in times)])
    print(f"overhead: tiny workflow (1 dataset, 5 stages), median of {args.repeats} no-op runs")
    print_table(["command", "seconds (median)", "each run"], rows)
    return medians["snakemake --cores all"], medians["dvc repro"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
            result = run(args, Path(tmp))
    ratio_line("overhead", *result)


if __name__ == "__main__":
    main()
