"""The report's charts: the small decisions behind them (hand-computed cases) and the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgembed.charts import (START_EXPORTED, epoch_numbers, metrics_table_html, read_live_tsv, training_verdict,
                             worst_classes_first, write_charts)
from imgembed.errors import UserError

PNG = b"\x89PNG\r\n\x1a\n"


def test_epoch_numbers_with_and_without_the_starting_point():
    assert epoch_numbers(3, epochs_trained=3) == [1, 2, 3]  # one value per trained epoch
    assert epoch_numbers(4, epochs_trained=3) == [0, 1, 2, 3]  # epoch 0 (before training) logged too
    assert epoch_numbers(3, epochs_trained=3) != epoch_numbers(4, epochs_trained=3)[:3]


def rows(trained: float, **others: float) -> dict:
    out = {"trained": {"label": "trained model", "map_at_5": trained}}
    out.update({name: {"label": name.replace("_", " "), "map_at_5": value} for name, value in others.items()})
    return out


def test_training_verdict():
    assert training_verdict(rows(0.9, raw_pixels=0.8, backbone=0.85)).startswith("yes")
    assert "backbone, 0.850" in training_verdict(rows(0.9, raw_pixels=0.8, backbone=0.85))
    assert training_verdict(rows(0.8, raw_pixels=0.9)).startswith("no: the trained model's mP@5 0.800 is below raw pixels")
    assert training_verdict(rows(0.9, raw_pixels=0.9)).startswith("not on mP@5")


def test_worst_classes_first_orders_by_score_then_name_and_cuts():
    per_class = {"b": 0.5, "a": 0.5, "c": 0.1, "d": 1.0}
    assert worst_classes_first(per_class) == [("c", 0.1), ("a", 0.5), ("b", 0.5), ("d", 1.0)]
    assert worst_classes_first(per_class, limit=2) == [("c", 0.1), ("a", 0.5)]


def test_metrics_table_says_when_the_start_was_exported():
    metrics = {"num_queries": 12, "precision_at_1": 0.75}
    page = metrics_table_html(metrics, {"best_epoch": 0, "best_val_map_at_5": 0.4})
    assert START_EXPORTED in page and "<td>P@1</td><td style='text-align:right'>0.750</td>" in page
    assert page.index("P@1") < page.index("queries")  # scores first
    assert START_EXPORTED not in metrics_table_html(metrics, {"best_epoch": 2, "best_val_map_at_5": 0.4})


def write_live(live: Path, train_epochs: int, val_epochs: int, val_loss: bool = True) -> None:
    for name, count in (("train/loss", train_epochs), ("train/lr", train_epochs), ("val/loss", val_epochs),
                        ("val/precision_at_1", val_epochs), ("val/map_at_5", val_epochs)):
        if name == "val/loss" and not val_loss:
            continue
        path = live / "plots" / "metrics" / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        short = name.split("/")[1]
        lines = [f"timestamp\tstep\t{short}"] + [f"{1000 + i}\t{i}\t{0.5 + 0.1 * i}" for i in range(count)]
        path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("best_epoch,val_loss", [(0, True), (2, True), (2, False)])
def test_write_charts(tmp_path, best_epoch, val_loss):
    live, reports = tmp_path / "train", tmp_path / "reports"
    # A run that also validated the start (epoch 0); ArcFace and the other class losses log no val loss.
    write_live(live, train_epochs=3, val_epochs=4, val_loss=val_loss)
    (tmp_path / "model.json").write_text(json.dumps({"epochs": 3, "best_epoch": best_epoch, "best_val_map_at_5": 0.7}))
    reports.mkdir()
    (reports / "metrics.json").write_text(json.dumps({"precision_at_1": 0.8, "map_at_5": 0.7, "num_queries": 9}))
    (reports / "per_class.json").write_text(json.dumps({"a": 0.5, "b": 1.0}))
    (reports / "baseline_comparison.json").write_text(json.dumps({
        "trained": {"label": "trained model", "precision_at_1": 0.8, "map_at_5": 0.7, "map_at_r": 0.6},
        "raw_pixels": {"label": "raw pixels (no network)", "precision_at_1": 0.7, "map_at_5": 0.6, "map_at_r": 0.5}}))
    write_charts(live, tmp_path / "model.json", reports, tmp_path / "plots")
    for name in ("training.png", "comparison.png", "per_class.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG, name
    table = (tmp_path / "plots" / "metrics.html").read_text()
    assert (START_EXPORTED in table) == (best_epoch == 0)


def test_read_live_tsv_orders_by_step_and_names_a_bad_file(tmp_path):
    path = tmp_path / "loss.tsv"
    path.write_text("timestamp\tstep\tloss\n2\t1\t0.5\n1\t0\t0.9\n")
    assert read_live_tsv(path) == [0.9, 0.5]
    path.write_text("timestamp\tstep\tother\n1\t0\t0.9\n")
    with pytest.raises(UserError, match="loss.tsv: not a DVCLive metric file"):
        read_live_tsv(path)
    with pytest.raises(UserError, match="missing.tsv: file not found"):
        read_live_tsv(tmp_path / "missing.tsv")
