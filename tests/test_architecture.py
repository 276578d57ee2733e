"""The package's shape as rules: imports go one way along the data path, and functions stay short.

config/errors/files → data → scale → model → loss → eval → train → artifacts/pairs → cli. A module may
import its own layer or a lower one, never a higher one; no import cycle; no private name (``_x``) taken
from another module; function-level imports of the package only in ``orpo.cli`` (where they keep
``--help`` instant), never to hide a cycle.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from conftest import ROOT

LAYERS = [
    ("orpo.errors", "orpo.config", "orpo.files"),
    ("orpo.data",),
    ("orpo.scale",),
    ("orpo.model",),
    ("orpo.loss",),
    ("orpo.eval",),
    ("orpo.train",),
    ("orpo.artifacts", "orpo.pairs"),
    ("orpo.cli", "orpo.evaluate", "orpo.export", "orpo.make_pairs", "orpo.plots", "orpo.distributed"),
]
MAX_FUNCTION_LINES = 80


def layer_of(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def package_modules(root: Path) -> dict[str, Path]:
    modules = {}
    for path in sorted((root / "orpo").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def orpo_imports(path: Path):
    """(imported module, names, line, inside a function) for every import of the package in ``path``."""
    tree = ast.parse(path.read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(node) if n is not node}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "orpo":
            yield node.module, [a.name for a in node.names], node.lineno, id(node) in in_function
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "orpo":
                    yield alias.name, [], node.lineno, id(node) in in_function


def import_problems(root: Path) -> list[str]:
    modules = package_modules(root)
    problems, graph = [], {name: set() for name in modules}
    for name, path in modules.items():
        where = path.relative_to(root)
        for target, names, line, in_function in orpo_imports(path):
            if target not in modules:
                submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                if not submodules:
                    problems.append(f"{where}:{line}: imports {target}, which is not a module of the package")
                    continue
            if layer_of(target) > layer_of(name):
                problems.append(
                    f"{where}:{line}: {name} (layer {layer_of(name)}) imports {target} "
                    f"(layer {layer_of(target)}): an upward import"
                )
            private = [n for n in names if n.startswith("_")]
            if private:
                problems.append(f"{where}:{line}: imports the private name(s) {', '.join(private)} from {target}")
            if in_function and not name.startswith("orpo.cli"):
                problems.append(f"{where}:{line}: imports {target} inside a function")
            if target in modules and target != name:
                graph[name].add(target)
    return problems + [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (depth-first search)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_imports_follow_the_data_path():
    assert import_problems(ROOT) == []


def test_the_check_fails_on_a_cycle_an_upward_import_and_a_private_name(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "orpo", copy / "orpo", ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "orpo" / "data" / "audio.py").open("a") as f:
        f.write("\nfrom orpo.data.dataset import PreferenceDataset  # noqa\n")  # dataset imports audio: a cycle
    with (copy / "orpo" / "model" / "load.py").open("a") as f:
        f.write("\nfrom orpo.train.loop import train  # noqa\n")  # model below train: upward
    with (copy / "orpo" / "eval" / "wer.py").open("a") as f:
        f.write("\nfrom orpo.eval.report import _table  # noqa\n")  # private
    problems = "\n".join(import_problems(copy))
    cycle_lines = [line for line in problems.splitlines() if line.startswith("import cycle: ")]
    assert any({"orpo.data.audio", "orpo.data.dataset"} <= set(line[14:].split(" -> ")) for line in cycle_lines)
    assert "orpo.model.load (layer 3) imports orpo.train.loop (layer 6): an upward import" in problems
    assert "imports the private name(s) _table from orpo.eval.report" in problems


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in package_modules(ROOT).values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert long == []
