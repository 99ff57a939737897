"""`imgembed doctor` and `imgembed --version` (issue 12): the checks are pure functions of what
was detected, tested here against hand-made GPU lists; the command itself runs on this CPU."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

import imgembed
from imgembed.cli import main
from imgembed.doctor import Gpu, folder_problem, plan_training, report_lines

A100 = Gpu("NVIDIA A100-SXM4-80GB", 80 * 2**30, bf16=True)
T4 = Gpu("Tesla T4", 15 * 2**30, bf16=False)


def accelerate_cfg(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / "accelerate" / f"{name}.yaml").read_text())


def train(accelerate: str, precision: str = "bf16") -> dict:
    return {"accelerate": accelerate, "mixed_precision": precision}


pytestmark = pytest.mark.usefixtures("restore_logging")


def test_auto_uses_the_gpu_when_there_is_one_and_the_cpu_otherwise():
    on_gpu = plan_training(train("auto"), accelerate_cfg("auto"), [A100])
    assert (on_gpu.device, on_gpu.processes, on_gpu.precision, on_gpu.problems) == ("cuda", 1, "bf16", [])
    on_cpu = plan_training(train("auto"), accelerate_cfg("auto"), [])
    assert (on_cpu.device, on_cpu.precision, on_cpu.problems) == ("cpu", "bf16", [])


def test_cpu_config_ignores_gpus_and_fp16_runs_as_fp32_there():
    plan = plan_training(train("cpu", "fp16"), accelerate_cfg("cpu"), [A100])
    assert (plan.device, plan.precision, plan.problems) == ("cpu", "no", [])


def test_gpu_config_without_a_gpu_is_a_problem():
    plan = plan_training(train("gpu"), accelerate_cfg("gpu"), [])
    assert plan.device == "cuda"
    assert len(plan.problems) == 1 and "train.accelerate: gpu needs a GPU" in plan.problems[0]
    assert "--gpus all" in plan.problems[0]


def test_multi_gpu_needs_one_gpu_per_process():
    assert plan_training(train("multi_gpu"), accelerate_cfg("multi_gpu"), [A100, A100]).problems == []
    plan = plan_training(train("multi_gpu"), accelerate_cfg("multi_gpu"), [A100])
    assert plan.processes == 2
    assert len(plan.problems) == 1 and "starts 2 processes" in plan.problems[0] and "1 GPU" in plan.problems[0]


def test_multi_node_counts_processes_per_machine():
    # 8 processes on 2 machines: 4 GPUs needed on this one.
    cfg = accelerate_cfg("multi_node.example")
    assert plan_training(train("multi_node.example"), cfg, [A100] * 4).problems == []
    assert "starts 4 processes" in plan_training(train("multi_node.example"), cfg, [A100] * 2).problems[0]


def test_bf16_on_a_gpu_without_it_is_a_problem_and_fp16_is_not():
    plan = plan_training(train("auto", "bf16"), accelerate_cfg("auto"), [T4])
    assert plan.problems == ["train.mixed_precision: bf16 is not supported by Tesla T4: set train.mixed_precision: fp16"]
    plan = plan_training(train("auto", "fp16"), accelerate_cfg("auto"), [T4])
    assert (plan.precision, plan.problems) == ("fp16", [])


def test_folder_problem(tmp_path: Path):
    assert folder_problem(tmp_path) is None
    assert folder_problem(tmp_path / "missing") is None  # its parent is writable: it can be created
    a_file = tmp_path / "reports"
    a_file.write_text("")
    assert folder_problem(a_file) == f"{a_file}: is not a folder"
    problem = folder_problem(a_file / "sub", uid=4242)
    assert problem == f"{a_file / 'sub'}: missing, and {a_file} is not writable by uid 4242 to create it"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder (run as non-root to test this)")
def test_folder_problem_read_only(tmp_path: Path):
    folder = tmp_path / "data"
    folder.mkdir(mode=0o555)
    problem = folder_problem(folder, uid=os.getuid())
    assert problem is not None and "not writable by uid" in problem and "--user" in problem


def test_report_lists_versions_gpus_plan_and_folders():
    plan = plan_training(train("auto"), accelerate_cfg("auto"), [A100])
    lines = report_lines({"imgembed": "0.1.0", "dvc": None}, ("12.8", "91002"), [A100], plan,
                         {"data": None, "reports": "reports: not writable"})
    text = "\n".join(lines)
    assert "imgembed                 0.1.0" in text and "dvc                      not installed" in text
    assert "CUDA (torch build)       12.8" in text and "cuDNN                    91002" in text
    assert "  GPU 0: NVIDIA A100-SXM4-80GB, 80.0 GiB, bf16 yes" in lines
    assert "train.accelerate         auto (config/accelerate/auto.yaml): 1 process(es) on cuda" in lines
    assert "precision                bf16" in lines
    assert "data/                    writable" in lines and "reports/                 NOT writable" in lines


def test_doctor_command_on_this_cpu(tmp_path: Path, capsys, monkeypatch):
    """The default config (accelerate auto) is fine without a GPU; `gpu` is not: exit 2."""
    monkeypatch.chdir(ROOT)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"imgembed                 {imgembed.__version__}" in out
    assert "CUDA available           no" in out and "on cpu" in out

    gpu = tmp_path / "gpu.yaml"
    gpu.write_text("train:\n  accelerate: gpu\n")
    assert main(["doctor", "--configfile", "config/config.yaml", str(gpu)]) == 2
    err = capsys.readouterr().err
    assert "train.accelerate: gpu needs a GPU but CUDA sees none" in err
    assert "doctor found 1 problem(s)" in err


def test_version_is_one_number_everywhere():
    result = subprocess.run([sys.executable, "-m", "imgembed", "--version"], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == f"imgembed {imgembed.__version__}"
    assert importlib.metadata.version("imgembed") == imgembed.__version__
    snakefile = (ROOT / "Snakefile").read_text()
    assert f'container: "docker://ghcr.io/imgembed/imgembed:{imgembed.__version__}"' in snakefile
    assert f"ARG VERSION={imgembed.__version__}\n" in (ROOT / "Dockerfile").read_text()


@pytest.mark.parametrize(("device", "requested", "runs"), [
    ("cpu", "fp16", "no"), ("cpu", "bf16", "bf16"), ("cpu", "no", "no"), ("cuda", "fp16", "fp16"), ("cuda", "bf16", "bf16"),
])
def test_precision_on(device, requested, runs):
    """The one precision rule, shared by training and doctor: fp16 on the CPU runs as fp32."""
    from imgembed.runtime import precision_on

    assert precision_on(device, requested) == runs
