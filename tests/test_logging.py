"""A stage's log file holds everything the stage printed: log lines, warnings, progress bars and
the traceback of an unexpected error, so `--show-failed-logs` and CI logs show why it failed."""

from __future__ import annotations

import sys

import imgembed.cli as cli
from imgembed.errors import UserError


def run_with(monkeypatch, tmp_path, func) -> tuple[int, str]:
    monkeypatch.setattr(cli, "_charts", func)  # charts needs no config: the simplest stage to replace
    log_file = tmp_path / "logs" / "charts.log"
    code = cli.main(["charts", str(tmp_path), "--live-dir", str(tmp_path), "--model-info", "m.json",
                     "-o", str(tmp_path), "--log", str(log_file)])
    return code, log_file.read_text(encoding="utf-8")


def test_unexpected_error_leaves_its_traceback_in_the_log(monkeypatch, tmp_path, capsys):
    def broken(args, cfg):
        cli.log.info("working")
        print("a library speaks on stderr", file=sys.stderr)
        raise RuntimeError("a bug")

    code, text = run_with(monkeypatch, tmp_path, broken)
    assert code == 1
    assert "INFO working" in text and "a library speaks on stderr" in text
    assert "Traceback (most recent call last)" in text and "RuntimeError: a bug" in text
    assert "RuntimeError: a bug" in capsys.readouterr().err  # and on the terminal, as before
    assert not isinstance(sys.stderr, cli.LogFileTee)  # restored after the stage


def test_user_error_is_one_line_in_the_log_too(monkeypatch, tmp_path, capsys):
    def bad_input(args, cfg):
        raise UserError("data/x.zip: not a valid zip file")

    code, text = run_with(monkeypatch, tmp_path, bad_input)
    assert code == 2
    assert text.count("\n") == 1 and text.rstrip().endswith("ERROR data/x.zip: not a valid zip file")
    assert "Traceback" not in capsys.readouterr().err


def test_progress_bar_keeps_its_last_state_in_the_log(monkeypatch, tmp_path):
    def progress(args, cfg):
        sys.stderr.write("bar  10%\rbar  50%\rbar 100%\n")
        sys.stdout.write("printed")  # no newline at the end: still kept

    code, text = run_with(monkeypatch, tmp_path, progress)
    assert code == 0
    assert text.splitlines() == ["bar 100%", "printed"]
