"""The package's layout rules (issue 15), checked on the source with ast: exact, no timing.

* no function in src/ is longer than 60 lines;
* every module is either a stage (one CLI command's work) or a shared module, and no stage
  module imports another stage module: what passes between stages is owned by a shared module
  (artifacts for the files, runtime for the run-time decisions, files for atomic writes);
* each stage's entry point says in its docstring what it reads and writes;
* bench/ imports nothing from tests/ (tests may run benches, not the other way round).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "imgembed"
MAX_FUNCTION_LINES = 60
STAGES = {"unpack", "sample", "train", "embed", "evaluate", "baseline", "plots", "charts", "search", "doctor"}
SHARED = {"artifacts", "files", "data", "model", "metrics", "mining", "objectives", "export", "config", "errors", "cli",
          "runtime", "__init__", "__main__"}
# Each stage's entry point: what the CLI command calls.
ENTRY_POINTS = {"unpack": ["unpack_dataset"], "sample": ["build_sample_zip"], "train": ["train_model"],
                "embed": ["embed_split"], "evaluate": ["evaluate_file"], "baseline": ["write_baseline"],
                "plots": ["plot_embeddings"], "charts": ["write_charts"], "search": ["search", "build_index"],
                "doctor": ["run_doctor"]}
# cli is the one module that may import every stage: each command imports its stage's module.
DISPATCHER = "cli"


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def imgembed_imports(module: ast.Module) -> set[str]:
    """imgembed modules imported anywhere in a module (top level or inside functions)."""
    found = set()
    for node in ast.walk(module):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "imgembed":
            found |= {alias.name for alias in node.names} if node.module == "imgembed" else {node.module.split(".")[1]}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("imgembed.")}
    return {name for name in found if (PACKAGE / f"{name}.py").is_file()}


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_every_module_is_a_stage_or_shared() -> None:
    assert not STAGES & SHARED
    assert set(modules()) == STAGES | SHARED, "classify each new module in STAGES or SHARED (tests/test_layout.py)"


def test_no_function_in_src_is_longer_than_60_lines() -> None:
    long = [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.glob("*.py")) for node in ast.walk(tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


@pytest.mark.parametrize("module", sorted(STAGES | SHARED - {DISPATCHER}))
def test_no_stage_module_imports_another(module: str) -> None:
    imported = imgembed_imports(tree(PACKAGE / f"{module}.py"))
    assert imported & STAGES <= {module}, f"{module} imports the stage module(s) {sorted(imported & STAGES - {module})}"


def test_the_cli_imports_each_stage_only_inside_its_command() -> None:
    """cli.py may reach every stage, but only lazily, inside the function of that command."""
    module = tree(PACKAGE / "cli.py")
    top_level = {stmt for stmt in module.body if isinstance(stmt, (ast.Import, ast.ImportFrom))}
    at_top = imgembed_imports(ast.Module(body=list(top_level), type_ignores=[]))
    assert not at_top & STAGES


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_each_stage_entry_point_says_what_it_reads_and_writes(module: str) -> None:
    functions = {node.name: node for node in tree(PACKAGE / f"{module}.py").body if isinstance(node, ast.FunctionDef)}
    for name in ENTRY_POINTS[module]:
        doc = ast.get_docstring(functions[name]) or ""
        assert "Reads" in doc and ("writes" in doc.lower()), f"{module}.{name}: say what it reads and writes"


def test_bench_imports_nothing_from_tests() -> None:
    test_modules = {p.stem for p in (ROOT / "tests").rglob("*.py")} - {"__init__"}
    offenders = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        for node in ast.walk(tree(path)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in test_modules | {"tests"} and not (ROOT / "bench" / f"{n.split('.')[0]}.py").is_file()]
        source = path.read_text(encoding="utf-8")
        if "sys.path" in source and "tests" in source.split("sys.path", 1)[1].split("\n", 1)[0]:
            offenders.append(f"{path.name}: puts tests/ on sys.path")
    assert offenders == []
