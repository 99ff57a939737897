"""One source of truth: dvc.yaml runs exactly the jobs the Snakemake workflow runs.

Snakemake's side comes from the workflow itself (its own parser and a forced dry-run, in a
subprocess); DVC's side from dvc.yaml as DVC renders it (vars and foreach resolved). For every
rule there must be one stage per dataset, and every stage must belong to a rule, with the same
command, the rule's inputs as dependencies (plus the code, checked separately), the rule's
outputs as outputs (log excepted) and the rule's config sections as params.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, copy_project

CONFIG = "config/config.yaml"
PACKAGE = ROOT / "src" / "imgembed"

# Runs in the project copy: loads the workflow with Snakemake's API and forces a dry-run, then
# prints every rule and job as JSON.
SNAKEMAKE_DUMP = r"""
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.io import is_flagged
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

def lookup(config, key):  # config["train"]["seed"] for "train.seed": a rule may pass single settings
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return KeyError
        value = value[part]
    return value

def sections(settings, config):
    if settings is None:
        return []
    if isinstance(settings, dict) and settings and all(lookup(config, k) == v for k, v in settings.items()):
        return sorted(settings)
    found = [k for k, v in config.items() if v == settings]
    assert len(found) == 1, f"cannot tell which config section params.settings is: {settings!r}"
    return found

with SnakemakeApi(OutputSettings()) as api:
    wf = api.workflow(resource_settings=ResourceSettings(cores=1), config_settings=ConfigSettings(),
                      snakefile=Path("Snakefile"), workdir=Path("."))
    wf.dag(dag_settings=DAGSettings(forceall=True)).execute_workflow(executor="dryrun")
    workflow = wf._workflow
    config = workflow.config
    rules = {
        rule.name: {"shell": rule.shellcmd, "sections": sections(dict(rule.params.items()).get("settings"), config)}
        for rule in workflow.rules
    }
    jobs = [
        {
            "rule": job.rule.name,
            "wildcards": dict(job.wildcards),
            "cmd": job.shellcmd,
            "input": [str(f) for f in job.input],
            "output": [str(f) for f in job.output],
            "directories": [str(f) for f in job.output if is_flagged(f, "directory")],
        }
        for job in workflow.dag.jobs
    ]
json.dump({"datasets": config["datasets"], "rules": rules, "jobs": jobs}, sys.stdout)
"""


def snakemake_view(project: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", SNAKEMAKE_DUMP], cwd=project, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def dvc_view(project: Path) -> dict[str, dict]:
    """Every stage of the rendered dvc.yaml: command, data deps, code deps, params and outs."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    if not (project / ".dvc").is_dir():
        Repo.init(str(project), no_scm=True)
    stages = {}
    with Repo(str(project)) as repo:
        for stage in repo.index.stages:
            if not isinstance(stage, PipelineStage):  # .dvc files (the baseline import) track data
                continue
            deps = [d for d in stage.deps if not isinstance(d, ParamsDependency)]
            stages[stage.name] = {
                "cmd": stage.cmd,
                "deps": sorted(d.def_path for d in deps if not d.def_path.startswith("src/")),
                "code": sorted(d.def_path for d in deps if d.def_path.startswith("src/")),
                "params": {d.def_path: sorted(d.params)
                           for d in stage.deps if isinstance(d, ParamsDependency)},
                "outs": sorted(o.def_path for o in stage.outs),
            }
    return stages


def module_imports(module: str) -> set[str]:
    """imgembed modules that src/imgembed/<module>.py imports, anywhere in the file."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "imgembed":
            if node.module == "imgembed":
                found.update(alias.name for alias in node.names)
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("imgembed."))
    return {m for m in found if (PACKAGE / f"{m}.py").is_file()}


def stage_module(cli_stage: str) -> str:
    """The module behind `python -m imgembed <cli_stage>`, read from cli.py's stage table."""
    tree = ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8"))
    funcs = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "stage"
                and len(node.args) >= 2 and isinstance(node.args[0], ast.Constant) and node.args[0].value == cli_stage):
            imports = module_imports_of(funcs[node.args[1].id])
            assert len(imports) == 1, f"cli stage {cli_stage} imports {imports}"
            return imports.pop()
    raise AssertionError(f"no stage {cli_stage!r} in cli.py")


def module_imports_of(func: ast.FunctionDef) -> set[str]:
    return {n.module.split(".")[1] for n in ast.walk(func)
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("imgembed.")}


def code_closure(module: str) -> list[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(module_imports(name))
    return sorted(f"src/imgembed/{name}.py" for name in seen)


def stage_name(job: dict) -> str:
    assert set(job["wildcards"]) <= {"dataset"}, f"rule {job['rule']}: only {{dataset}} maps to dvc.yaml's foreach"
    return f"{job['rule']}@{job['wildcards']['dataset']}" if job["wildcards"] else job["rule"]


def check_mirror(project: Path) -> None:
    sm, stages = snakemake_view(project), dvc_view(project)
    work_rules = {name for name, rule in sm["rules"].items() if rule["shell"]}
    groups = {name.split("@")[0] for name in stages}
    assert work_rules - groups == set(), "Snakemake rules without a dvc.yaml stage"
    assert groups - work_rules == set(), "dvc.yaml stages without a Snakemake rule"

    jobs = {stage_name(job): job for job in sm["jobs"] if job["cmd"]}
    extra = set(stages) - set(jobs)
    # DVC has no conditional stages: `sample` exists even when `sample` is not a dataset.
    assert extra == (set() if "sample" in sm["datasets"] else {"sample"}), extra
    assert set(jobs) - set(stages) == set(), "Snakemake jobs without a DVC stage"

    for name, job in jobs.items():
        stage = stages[name]
        assert stage["cmd"] == job["cmd"], name
        assert stage["deps"] == sorted(job["input"]), name
        for out in job["output"]:  # a directory() output may be declared as the things inside it
            assert out in stage["outs"] or (out in job["directories"]
                                            and any(o.startswith(out + "/") for o in stage["outs"])), (name, out)
        for out in stage["outs"]:
            assert out in job["output"] or any(out.startswith(d + "/") for d in job["directories"]), (name, out)
        sections = sm["rules"][job["rule"]]["sections"]
        assert stage["params"] == ({CONFIG: sections} if sections else {}), name
        cli_stage = re.search(r"-m imgembed (\S+)", job["cmd"]).group(1)
        code = code_closure(stage_module(cli_stage))
        assert stage["code"] == code, f"{name}: its code deps must be the modules `imgembed {cli_stage}` runs: {code}"


def set_datasets(project: Path, datasets: list[str]) -> None:
    config_file = project / CONFIG
    config = yaml.safe_load(config_file.read_text())
    config_file.write_text(yaml.safe_dump({**config, "datasets": datasets}, sort_keys=False))
    for name in datasets:
        if name != "sample":
            (project / "data" / f"{name}.zip").touch()  # only its existence is checked


@pytest.mark.parametrize("datasets", [None, ["sample", "mine"], ["mine", "other"]], ids=["shipped", "two", "no-sample"])
def test_dvc_yaml_mirrors_snakemake(tmp_path, datasets):
    project = copy_project(tmp_path / "project")
    if datasets:
        set_datasets(project, datasets)
    check_mirror(project)


def test_a_rule_without_stage_fails(tmp_path):
    project = copy_project(tmp_path / "project")
    with open(project / "Snakefile", "a") as snakefile:
        snakefile.write('\n\nrule extra:\n    output: "reports/extra.txt"\n    shell: "touch {output}"\n')
    with pytest.raises(AssertionError, match="without a dvc.yaml stage"):
        check_mirror(project)


def test_only_config_yaml_holds_params():
    assert not (ROOT / "params.yaml").exists()
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert dvc_yaml["vars"] == [CONFIG]


def test_snakemake_lint_finds_nothing(tmp_path):
    project = copy_project(tmp_path / "project")
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=project, capture_output=True,
                            text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "Lints for" not in out and "Congratulations" in out, out[-3000:]
