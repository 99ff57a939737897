# imgembed: unpack -> train -> embed -> evaluate (beside the no-training baseline) -> plot, charts,
# for every dataset in config["datasets"]. `snakemake --report report.html` then gathers the
# pictures marked with report() into one page (captions in workflow/report/).
# Every rule runs one `python -m imgembed <stage>` command; dvc.yaml runs the same commands.
import os
import sys

from snakemake.utils import min_version, validate

# This checkout's package, for the Snakefile and for every job: under
# --software-deployment-method conda the env (envs/imgembed.yaml) holds only the dependencies,
# wherever Snakemake copied it, and snakemake itself may run where imgembed is not installed.
# (Where the package is installed, editable or in the image, this is the same code.)
SRC = os.path.join(workflow.basedir, "src")
sys.path.insert(0, SRC)
os.environ.update(PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p))

min_version("9.0")


configfile: "config/config.yaml"


# One line naming the bad key (the same check as every CLI stage), then Snakemake's own check.
try:
    from imgembed.config import ConfigError, validate as validate_config

    validate_config(config)
except ConfigError as err:
    sys.exit(f"imgembed: {err}")
validate(config, "src/imgembed/schemas/config.schema.yaml")

# The container image for `--software-deployment-method apptainer` (built from ./Dockerfile).
container: "docker://ghcr.io/imgembed/imgembed:0.1.0"


include: "workflow/rules/common.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/unpack.smk"
include: "workflow/rules/baseline.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/plots.smk"
include: "workflow/rules/charts.smk"


report: "workflow/report/workflow.rst"


rule all:
    input:
        all_outputs(config["datasets"]),
    default_target: True
