"""`imgembed doctor`: can this machine (or container) run the workflow as configured?

Run it before a long run, e.g. `docker run --rm --gpus all IMAGE doctor`, to see that the GPUs
came through: it prints the versions of the stack, each GPU CUDA sees (name, memory, bf16),
the accelerate config and precision that `train` would use with the current config, and
whether the work folders are writable. It exits non-zero, naming each problem, when something
the config needs is missing (a GPU for `train.accelerate: gpu`, enough GPUs for `multi_gpu`,
bf16 on the GPU, a writable output folder).

The checks are small pure functions of what was detected (`plan_training`, `folder_problem`)
so that they are tested on a CPU; `detect_gpus` and `versions` are the only probes.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgembed.config import read_yaml
from imgembed.errors import UserError
from imgembed.runtime import precision_on

# Distributions whose versions are reported (snakemake and dvc are the `workflow` extra).
PACKAGES = ("imgembed", "torch", "torchvision", "timm", "accelerate", "pytorch-metric-learning",
            "snakemake", "dvc")
# What the workflow writes below its working directory (Snakemake keeps its state in .snakemake/).
WORK_FOLDERS = ("data", "models", "embeddings", "reports", "logs", ".snakemake")


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    bf16: bool


@dataclass
class TrainingPlan:
    """What `accelerate launch -m imgembed train` would do here, and what stops it."""

    accelerate: str           # the name in train.accelerate
    device: str               # "cpu" or "cuda"
    processes: int
    precision: str            # what really runs (runtime.precision_on)
    problems: list[str] = field(default_factory=list)


def plan_training(train_cfg: dict[str, Any], accelerate_cfg: dict[str, Any], gpus: list[Gpu]) -> TrainingPlan:
    """The device, process count and precision of a training run, from the config's
    `train` section, the accelerate config file it names and the GPUs CUDA sees.

    `auto` uses the GPU when there is one and the CPU otherwise; any other config that does not
    set `use_cpu` (gpu, multi_gpu, a multi-node file) needs GPUs, one per process on this machine.
    """
    name = train_cfg["accelerate"]
    processes = int(accelerate_cfg.get("num_processes", 1))
    machines = max(1, int(accelerate_cfg.get("num_machines", 1)))
    per_machine = max(1, processes // machines)
    problems: list[str] = []
    if accelerate_cfg.get("use_cpu", False):
        device = "cpu"
    elif gpus:
        device = "cuda"
        if per_machine > len(gpus):
            problems.append(f"train.accelerate: {name} starts {per_machine} processes on this machine "
                            f"but CUDA sees {len(gpus)} GPU(s): lower num_processes in config/accelerate/{name}.yaml")
    elif name == "auto":
        device = "cpu"
    else:
        device = "cuda"
        problems.append(f"train.accelerate: {name} needs a GPU but CUDA sees none: "
                        "pass the GPUs to the container (docker run --gpus all) or set train.accelerate: auto or cpu")
    precision = precision_on(device, train_cfg["mixed_precision"])
    if device == "cuda" and precision == "bf16" and gpus:
        without = sorted({gpu.name for gpu in gpus[:per_machine] if not gpu.bf16})
        if without:
            problems.append(f"train.mixed_precision: bf16 is not supported by {', '.join(without)}: "
                            "set train.mixed_precision: fp16")
    return TrainingPlan(name, device, processes, precision, problems)


def folder_problem(path: Path, uid: int | None = None) -> str | None:
    """None when the workflow can write into `path` (an existing folder, or a missing one whose
    parent is writable); otherwise one line naming the folder and the fix."""
    uid = os.getuid() if uid is None else uid
    if path.exists():
        if not path.is_dir():
            return f"{path}: is not a folder"
        if os.access(path, os.W_OK | os.X_OK):
            return None
        return (f"{path}: not writable by uid {uid}: on the host, `mkdir -p` it as the user who runs "
                f"the container and pass --user \"$(id -u):$(id -g)\" (or chown it to uid {uid})")
    parent = path.parent
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return None
    return f"{path}: missing, and {parent} is not writable by uid {uid} to create it"


def versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution; None when it is not installed."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def detect_gpus() -> list[Gpu]:
    """The GPUs this process can use (CUDA_VISIBLE_DEVICES and docker --gpus apply)."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        with torch.cuda.device(index):
            bf16 = torch.cuda.is_bf16_supported()
        gpus.append(Gpu(props.name, int(props.total_memory), bool(bf16)))
    return gpus


def cuda_versions() -> tuple[str | None, str | None]:
    """(CUDA, cuDNN) versions torch was built with; None when it has none."""
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return torch.version.cuda, (str(cudnn) if cudnn is not None else None)


def report_lines(found: dict[str, str | None], cuda: tuple[str | None, str | None], gpus: list[Gpu],
                 plan: TrainingPlan, folders: dict[str, str | None]) -> list[str]:
    """The report, one fact per line."""
    lines = [f"{name:<24} {version or 'not installed'}" for name, version in found.items()]
    lines.append(f"{'CUDA (torch build)':<24} {cuda[0] or 'none (CPU build)'}")
    lines.append(f"{'cuDNN':<24} {cuda[1] or 'none'}")
    lines.append(f"{'CUDA available':<24} {'yes' if gpus else 'no'}")
    for index, gpu in enumerate(gpus):
        lines.append(f"  GPU {index}: {gpu.name}, {gpu.memory_bytes / 2**30:.1f} GiB, "
                     f"bf16 {'yes' if gpu.bf16 else 'no'}")
    lines.append(f"{'train.accelerate':<24} {plan.accelerate} (config/accelerate/{plan.accelerate}.yaml): "
                 f"{plan.processes} process(es) on {plan.device}")
    lines.append(f"{'precision':<24} {plan.precision}")
    for folder, problem in folders.items():
        lines.append(f"{folder + '/':<24} {'writable' if problem is None else 'NOT writable'}")
    return lines


def run_doctor(cfg: dict[str, Any], workdir: Path = Path(".")) -> list[str]:
    """Reads the accelerate config file that train.accelerate names (under workdir/config/accelerate/)
    and probes this machine; writes nothing but the report on stdout. Returns the problems found
    (empty: all good)."""
    accelerate_file = workdir / "config" / "accelerate" / f"{cfg['train']['accelerate']}.yaml"
    if not accelerate_file.is_file():
        raise UserError(f"{accelerate_file}: missing (train.accelerate: {cfg['train']['accelerate']})")
    gpus = detect_gpus()
    plan = plan_training(cfg["train"], read_yaml(accelerate_file), gpus)
    folders = {name: folder_problem(workdir / name) for name in WORK_FOLDERS}
    found = versions()
    for line in report_lines(found, cuda_versions(), gpus, plan, folders):
        print(line, flush=True)
    missing = [f"{name} is not installed" for name in ("torch", "timm", "accelerate") if found[name] is None]
    return missing + plan.problems + [problem for problem in folders.values() if problem is not None]
