"""The run's numbers as pictures a person reads: training curves, "did training help?", per-class
precision, and the test metrics as a table.

Reads what the other stages wrote (DVCLive's TSVs, model.json, metrics.json, per_class.json,
baseline_comparison.json) and writes PNGs and one small HTML table, for `snakemake --report`
and `dvc plots show`. The maths (which epoch is which, the verdict, the ordering) lives in small
pure functions; drawing and file I/O at the edges.
"""

from __future__ import annotations

import csv
import html
import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from imgembed.errors import UserError  # noqa: E402
from imgembed.files import atomic_path  # noqa: E402

log = logging.getLogger("imgembed")

# DVCLive metric name -> what the curves picture calls it.
CURVES = {"train/loss": "train loss", "val/loss": "val loss", "val/precision_at_1": "val P@1",
          "val/map_at_5": "val mP@5", "train/lr": "learning rate (head)"}
# Curves a run may lack: classification-style losses (ArcFace...) know only the training classes, so no val loss.
OPTIONAL_CURVES = ("val/loss",)
START_EXPORTED = "training did not beat the starting weights; the start was exported"
METRIC_NAMES = {  # metrics.json key -> (short name, what it means)
    "precision_at_1": ("P@1", "the nearest other test image has the query's class"),
    "map_at_5": ("mP@5", "mean average precision over the top 5 (the GUIE competition's score)"),
    "map_at_r": ("MAP@R", "mean average precision over the top R, R = number of other images of the query's class"),
    "recall_at_1": ("R@1", "at least one image of the query's class among the top 1"),
    "recall_at_5": ("R@5", "... among the top 5"),
    "recall_at_10": ("R@10", "... among the top 10"),
    "num_queries": ("queries", "test images used as queries (leave-one-out)"),
    "queries_without_match": ("without match", "queries whose class has no other test image (left out)"),
}
MAX_CLASS_BARS = 40  # per-class chart: the worst classes, so the picture stays readable


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; run the stage that writes it first") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def read_live_tsv(path: Path) -> list[float]:
    """The values of one DVCLive metric TSV (columns timestamp, step, <name>), ordered by step."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; the train stage writes it") from None
    name = Path(path).stem
    try:
        return [float(row[name]) for row in sorted(rows, key=lambda row: int(row["step"]))]
    except (KeyError, ValueError) as err:
        raise UserError(f"{path}: not a DVCLive metric file ({err})") from None


def epoch_numbers(count: int, epochs_trained: int) -> list[int]:
    """Epoch of each logged value. DVCLive counts steps from 0; a run that also logs the
    starting point (epoch 0, before training) has one value more than the epochs it trained."""
    first = 0 if count == epochs_trained + 1 else 1
    return list(range(first, first + count))


def training_verdict(rows: dict[str, dict[str, Any]]) -> str:
    """One sentence: does the trained model beat, on mP@5, every row that had no training?"""
    trained = rows["trained"]["map_at_5"]
    others = {name: row for name, row in rows.items() if name != "trained"}
    if not others:
        return f"the trained model's mP@5 is {trained:.3f} (no rows without training to compare)"
    best = max(others.values(), key=lambda row: row["map_at_5"])
    label, score = best.get("label", "?"), best["map_at_5"]
    if trained > score:
        return f"yes: the trained model's mP@5 {trained:.3f} beats the best row without training ({label}, {score:.3f})"
    if trained == score:
        return f"not on mP@5: the trained model's {trained:.3f} only ties with {label}"
    return f"no: the trained model's mP@5 {trained:.3f} is below {label} ({score:.3f})"


def worst_classes_first(per_class: dict[str, float], limit: int = MAX_CLASS_BARS) -> list[tuple[str, float]]:
    """(class, P@1) from the worst class up, ties by name; at most `limit` of them."""
    return sorted(per_class.items(), key=lambda item: (item[1], item[0]))[:limit]


# ---- pictures ------------------------------------------------------------------------------

def save_figure(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_training(live_dir: Path, model_info: dict[str, Any], path: Path) -> None:
    """Three panels over the epochs: losses, validation retrieval, learning rate; best epoch marked."""
    metrics_dir = Path(live_dir) / "plots" / "metrics"
    values = {name: read_live_tsv(metrics_dir / f"{name}.tsv") for name in CURVES
              if name not in OPTIONAL_CURVES or (metrics_dir / f"{name}.tsv").is_file()}
    epochs_trained = int(model_info.get("epochs", len(values["val/map_at_5"])))
    best = model_info.get("best_epoch")
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True, layout="constrained")  # readable when scaled down
    loss_title = "loss (lower is better)" if "val/loss" in values else \
        f"loss (lower is better; {model_info.get('loss', 'this')} loss has no val loss: it knows only the training classes)"
    panels = [(axes[0], ("train/loss", "val/loss"), loss_title),
              (axes[1], ("val/precision_at_1", "val/map_at_5"), "validation retrieval (higher is better)"),
              (axes[2], ("train/lr",), "learning rate")]
    for ax, names, title in panels:
        for name, style in zip(names, ("o-", "s--")):
            if name not in values:
                continue
            ys = values[name]
            ax.plot(epoch_numbers(len(ys), epochs_trained), ys, style, label=CURVES[name], markersize=4)
        if best is not None:
            ax.axvline(best, color="black", linestyle=":", linewidth=1.5, label=f"best epoch ({best}), exported")
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    headline = f"Training: {epochs_trained} epochs"
    if best is not None:
        headline += f", best val mP@5 {model_info.get('best_val_map_at_5', float('nan')):.3f} at epoch {best}"
    if best == 0:
        headline += f"\n{START_EXPORTED}"
    fig.suptitle(headline, fontsize=11, color="darkred" if best == 0 else "black")
    save_figure(fig, path)


def plot_comparison(rows: dict[str, dict[str, Any]], path: Path) -> None:
    """Grouped horizontal bars: the trained model and each row without training, on P@1, mP@5, MAP@R."""
    keys = (("precision_at_1", "P@1"), ("map_at_5", "mP@5"), ("map_at_r", "MAP@R"))
    names = list(rows)
    height = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.9 * len(names)), layout="constrained")
    for k, ((key, short), hatch) in enumerate(zip(keys, ("", "//", ".."))):
        ys = [i + (k - 1) * height for i in range(len(names))]
        values = [rows[name][key] for name in names]
        bars = ax.barh(ys, values, height=height, hatch=hatch, edgecolor="white")
        for bar, value in zip(bars, values):
            ax.text(value + 0.005, bar.get_y() + bar.get_height() / 2, f"{short} {value:.3f}", va="center", fontsize=7)
    ax.set_yticks(range(len(names)), [rows[name].get("label", name) for name in names])
    ax.get_yticklabels()[0].set_fontweight("bold")
    ax.invert_yaxis()  # trained model on top
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("score on the test split (1 = every neighbour of the query's class)")
    ax.set_title(f"Did training help?\n{training_verdict(rows)}", fontsize=10, loc="left")
    save_figure(fig, path)


def plot_per_class(per_class: dict[str, float], path: Path) -> None:
    """P@1 of each class, worst at the top."""
    shown = worst_classes_first(per_class)
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.28 * len(shown)), layout="constrained")
    names, values = [name for name, _ in shown], [value for _, value in shown]
    bars = ax.barh(range(len(shown)), values, color="tab:blue")
    for bar, value in zip(bars, values):
        ax.text(value + 0.005, bar.get_y() + bar.get_height() / 2, f"{value:.3f}", va="center", fontsize=7)
    ax.set_yticks(range(len(shown)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("P@1: share of the class's test images whose nearest neighbour has the same class")
    more = f" (the worst {len(shown)} of {len(per_class)})" if len(shown) < len(per_class) else ""
    ax.set_title(f"Per-class P@1, worst class at the top{more}", fontsize=10, loc="left")
    save_figure(fig, path)


def metrics_table_html(metrics: dict[str, Any], model_info: dict[str, Any]) -> str:
    """The test metrics and the exported epoch as one small HTML table (shown in Snakemake's report)."""
    rows = []
    order = [key for key in METRIC_NAMES if key in metrics] + [key for key in metrics if key not in METRIC_NAMES]
    for key, value in ((key, metrics[key]) for key in order):
        short, meaning = METRIC_NAMES.get(key, (key, ""))
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        rows.append((short, shown, meaning))
    best = model_info.get("best_epoch")
    if best is not None:
        rows.append(("exported epoch", str(best), START_EXPORTED if best == 0 else
                     f"the epoch with the best validation mP@5 ({model_info.get('best_val_map_at_5', float('nan')):.3f})"))
    body = "\n".join(f"<tr><td>{html.escape(a)}</td><td style='text-align:right'>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
                     for a, b, c in rows)
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Test metrics</title></head>"
            "<body style='font-family:sans-serif'>\n<table style='border-collapse:collapse' border='1' cellpadding='4'>\n"
            "<tr><th>metric</th><th>value</th><th>meaning</th></tr>\n" + body + "\n</table></body></html>\n")


def write_charts(live_dir: Path, model_json: Path, report_dir: Path, output_dir: Path) -> None:
    """Reads live_dir (DVCLive's per-epoch metrics), model_json (the best epoch) and report_dir's
    metrics.json, per_class.json and baseline_comparison.json; writes training.png,
    comparison.png, per_class.png and metrics.html into output_dir."""
    report_dir, output_dir = Path(report_dir), Path(output_dir)
    model_info = read_json(model_json)
    plot_training(live_dir, model_info, output_dir / "training.png")
    plot_comparison(read_json(report_dir / "baseline_comparison.json"), output_dir / "comparison.png")
    plot_per_class(read_json(report_dir / "per_class.json"), output_dir / "per_class.png")
    with atomic_path(output_dir / "metrics.html") as tmp:
        tmp.write_text(metrics_table_html(read_json(report_dir / "metrics.json"), model_info), encoding="utf-8")
    if model_info.get("best_epoch") == 0:
        log.warning("%s", START_EXPORTED)
    log.info("charts written to %s (training.png, comparison.png, per_class.png, metrics.html)", output_dir)
