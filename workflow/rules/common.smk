# Shared by all rules: which config files the stages read, and where each dataset's files go.
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError


wildcard_constraints:
    dataset="[A-Za-z0-9_-]+",


if workflow.config_settings.config:
    sys.exit(
        "imgembed: --config KEY=VALUE overrides are not passed to the pipeline stages; "
        "put them in a YAML file and add it with --configfile"
    )



def all_cores():
    """Every core Snakemake was given (--cores), for the rules that use them all. Commands that run
    no job give none: `snakemake --unlock` after a killed run and `snakemake --report` must work
    as Snakemake tells users to type them, so they count one core (only job threads depend on it)."""
    try:
        return workflow.cores
    except WorkflowError:
        return 1


def relative_configfiles(extra):
    """config/config.yaml, then each --configfile, as paths relative to the working directory
    where possible, so the commands match dvc.yaml's and do not depend on the checkout's path."""
    paths = {}
    for path in ["config/config.yaml", *map(str, extra)]:
        resolved = Path(path).resolve()
        try:
            shown = str(resolved.relative_to(Path.cwd().resolve()))
        except ValueError:
            shown = str(resolved)
        paths.setdefault(resolved, shown)
    return " ".join(paths.values())


# The stages merge these files in this order, exactly as Snakemake did for `config`.
CONFIGFILES = relative_configfiles(workflow.overwrite_configfiles)
ENV = "../../envs/imgembed.yaml"


def check_dataset_zips(datasets):
    """Stop before any work when a dataset zip is missing, and say how to get it."""
    for name in datasets:
        zip_path = Path(f"data/{name}.zip")
        if name == "sample" or zip_path.exists():
            continue
        if Path(f"{zip_path}.dvc").exists():
            hint = f"fetch it with `dvc pull {zip_path}.dvc` (needs internet and the data registry)"
        else:
            hint = "put your dataset zip there (train/, val/, test/ with one folder per class); see README 'Your own data'"
        sys.exit(f"imgembed: {zip_path} is missing: {hint}")


def all_outputs(datasets):
    check_dataset_zips(datasets)
    return [
        path
        for name in datasets
        for path in (
            f"models/{name}/embedding_net.pt",
            f"embeddings/{name}/test.npz",
            f"reports/{name}/metrics.json",
            f"reports/{name}/plots/embedding.png",
            f"reports/{name}/plots/retrievals.png",
            f"reports/{name}/plots/training.png",
        )
    ]


def training_gpus(accelerate_config):
    """GPUs the training job asks a cluster for: none on the CPU, else one per process of the
    accelerate config (multi_gpu.yaml's num_processes)."""
    settings = yaml.safe_load(Path(accelerate_config).read_text())
    if settings.get("use_cpu") or settings.get("distributed_type") == "MULTI_CPU":
        return 0
    return int(settings.get("num_processes", 1))
