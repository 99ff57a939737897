"""Retrieval metrics of the test embeddings, leave-one-out, as flat JSON for DVC."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from imgembed.artifacts import read_embeddings
from imgembed.errors import UserError
from imgembed.files import write_json
from imgembed.metrics import leave_one_out_neighbours, neighbours_needed, per_class_precision_at_1, retrieval_metrics

log = logging.getLogger("imgembed")


def compare_with_baseline(metrics: dict[str, float], baseline_path: Path) -> dict[str, dict[str, Any]]:
    """Rows {name: label, P@1, mP@5, MAP@R}: the trained model first, then each row of `imgembed baseline`."""
    import json

    try:
        baseline = json.loads(Path(baseline_path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{baseline_path}: file not found; run `imgembed baseline` first") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{baseline_path}: not valid JSON ({err})") from None
    keys = ("precision_at_1", "map_at_5", "map_at_r")
    rows: dict[str, dict[str, Any]] = {"trained": {"label": "trained model", **{k: metrics[k] for k in keys}}}
    rows.update({name: {"label": str(row.get("label", name)), **{k: float(row[k]) for k in keys}}
                 for name, row in baseline.items()})
    for row in rows.values():
        log.info("%-50s P@1 %.3f  mP@5 %.3f  MAP@R %.3f", row["label"], row["precision_at_1"], row["map_at_5"], row["map_at_r"])
    return rows


def evaluate_file(embeddings_path: Path, output_dir: Path, cfg: dict[str, Any],
                  baseline: Path | None = None) -> dict[str, float]:
    """Reads the embeddings file; writes metrics.json, per_class.json and, given the baseline
    rows of `imgembed baseline`, baseline_comparison.json into output_dir."""
    data = read_embeddings(embeddings_path)
    labels = data.labels
    neighbours = leave_one_out_neighbours(data.embeddings, neighbours_needed(labels), cfg["evaluate"]["chunk_size"],
                                          progress=True)
    metrics = retrieval_metrics(labels, neighbours)
    per_class = per_class_precision_at_1(labels, neighbours, data.class_names)
    write_json(Path(output_dir) / "per_class.json", per_class)
    write_json(Path(output_dir) / "metrics.json", metrics)
    log.info("%s: P@1 %.3f, mP@5 %.3f, MAP@R %.3f, R@1/5/10 %.3f/%.3f/%.3f over %d queries",
             embeddings_path, metrics["precision_at_1"], metrics["map_at_5"], metrics["map_at_r"],
             metrics["recall_at_1"], metrics["recall_at_5"], metrics["recall_at_10"], metrics["num_queries"])
    if baseline is not None:
        write_json(Path(output_dir) / "baseline_comparison.json", compare_with_baseline(metrics, baseline))
    return metrics
