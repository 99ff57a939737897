"""Evaluation at scale: the evaluate stage on 200,000 embeddings of 64 dimensions.

Writes an embeddings file in the embed stage's format (classes of --per-class items around
random centres, L2-normalised like the default model's output), then runs the real stage,
`python -m imgembed evaluate`, in a child process and reports its wall-clock time and peak
resident memory (the child's own, imports included). For comparison it also times the plain
chunked search (matrix product + top-k over full rows of the distance matrix) on a sample of
--reference-queries queries and scales it to all of them.

    flock /tmp/imgembed-heavy.lock python bench/bench_evaluate.py     # 200,000 x 64, classes of 20

Last line: `RATIO evaluate <seconds> <peak GB>` (targets: < 60 s and < 2 GB on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import ROOT, print_table, ratio_line  # noqa: E402

from imgembed.artifacts import write_embeddings  # noqa: E402


# `python -m imgembed ARGS...`, then the process's own peak resident memory (VmHWM, which exec
# resets, unlike the rusage of children, which would count the parent's memory at fork).
STAGE_WITH_PEAK = """
import re, runpy, sys
peak_file = sys.argv.pop(1)
sys.argv[0] = "imgembed"
try:
    runpy.run_module("imgembed", run_name="__main__")
finally:
    status = open("/proc/self/status").read()
    open(peak_file, "w").write(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=200_000, help="embeddings (default: %(default)s)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--per-class", type=int, default=20, help="items per class; MAP@R needs per-class - 1 neighbours")
    p.add_argument("--noise", type=float, default=1.0, help="spread of each class around its centre (centres ~ N(0, 1))")
    p.add_argument("--reference-queries", type=int, default=4096, help="queries timed for the plain search row")
    p.add_argument("--workdir", type=Path, help="default: a temporary folder")
    return p.parse_args(argv)


def make_embeddings(path: Path, num: int, dim: int, per_class: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.arange(num) // per_class
    centres = rng.normal(size=(labels.max() + 1, dim)).astype(np.float32)
    x = centres[labels] + noise * rng.normal(size=(num, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    classes = np.array([f"class_{i:06d}" for i in range(labels.max() + 1)])
    write_embeddings(path, x, labels, list(classes), [f"test/{classes[y]}/{i}.jpg" for i, y in enumerate(labels)])
    return x, labels


def plain_search_seconds(x: np.ndarray, k: int, queries: int, chunk: int = 1024) -> float:
    """Seconds the plain chunked search (full distance rows + topk) would take for all queries."""
    xt = torch.from_numpy(x)
    sq = (xt * xt).sum(1)
    queries = min(queries, len(x))
    started = time.perf_counter()
    for start in range(0, queries, chunk):
        q = xt[start : start + chunk]
        dist = sq[start : start + len(q), None] + sq[None, :] - 2.0 * (q @ xt.T)
        torch.topk(dist, k + 1, dim=1, largest=False)
    return (time.perf_counter() - started) * len(x) / queries


def run(args: argparse.Namespace, workdir: Path) -> tuple[float, float]:
    npz = workdir / "test.npz"
    x, labels = make_embeddings(npz, args.num, args.dim, args.per_class, args.noise)
    k = max(10, args.per_class - 1)
    reference = plain_search_seconds(x, k, args.reference_queries)
    del x
    peak_file = workdir / "peak_kb"
    cmd = [sys.executable, "-c", STAGE_WITH_PEAK, str(peak_file), "evaluate", str(npz), "-o", str(workdir / "report"),
           "--configfile", str(ROOT / "config" / "config.yaml")]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"bench_evaluate: the evaluate stage failed:\n{done.stderr[-3000:]}")
    peak_gb = int(peak_file.read_text()) * 1024 / 1e9
    metrics = json.loads((workdir / "report" / "metrics.json").read_text())
    print(f"evaluate: {args.num} embeddings x {args.dim}, {args.num // args.per_class} classes of {args.per_class}, "
          f"{k} neighbours per query, {torch.get_num_threads()} threads")
    print_table(["search", "seconds", "peak GB", "mP@5", "MAP@R"], [
        ["imgembed evaluate (whole stage)", seconds, peak_gb, metrics["map_at_5"], metrics["map_at_r"]],
        [f"plain matmul + topk (scaled from {min(args.reference_queries, args.num)} queries)", reference, "", "", ""],
    ])
    return seconds, peak_gb


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        seconds, peak = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as tmp:
            seconds, peak = run(args, Path(tmp))
    ratio_line("evaluate", seconds, peak)


if __name__ == "__main__":
    main()
