# imgembed: unpack -> train -> embed -> evaluate -> plot, for every dataset in config["datasets"].
# Every rule runs one `python -m imgembed <stage>` command; dvc.yaml runs the same commands.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "src/imgembed/schemas/config.schema.yaml")

# The container image for `--software-deployment-method apptainer` (built from ./Dockerfile).
container: "docker://ghcr.io/imgembed/imgembed:0.1.0"


include: "workflow/rules/common.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/unpack.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/plots.smk"


rule all:
    input:
        all_outputs(config["datasets"]),
    default_target: True
