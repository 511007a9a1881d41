"""The import graph of the project runs with the grain: flows → tasks → infra → storage, no
cycle between modules, and no data stage of evolution reaching into training.

Every import counts, at module level or inside a function (lazy imports are how heavy modules
are loaded, and they are dependencies all the same), and under `if TYPE_CHECKING:` too: a type
named from a layer above is still an arrow against the grain.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lower rank = lower layer; a module may import its own layer and the layers below it.
LAYERS = {"flows": 3, "tasks": 2, "infra": 1, "storage": 0}
# (importer prefix, imported prefix) pairs that the layer order allows but the design does not.
FORBIDDEN = [("tasks.evolution", "tasks.training")]


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name → source file for every .py under the layer packages."""
    modules: dict[str, Path] = {}
    for package in LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module name an ImportFrom reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that `module` imports anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node, module, path.name == "__init__.py")
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` reads mod.
            names = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            # `import a.b.c` of a missing a.b.c: the nearest enclosing project module.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def against_the_grain(graph: dict[str, set[str]]) -> list[str]:
    """Every arrow from a lower layer to a higher one, and every forbidden arrow."""
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if LAYERS[module.split(".")[0]] < LAYERS[target.split(".")[0]]:
                bad.append(f"{module} -> {target}")
            for importer, imported in FORBIDDEN:
                if _within(module, importer) and _within(target, imported):
                    bad.append(f"{module} -> {target} (forbidden: {importer} -> {imported})")
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_is_read(graph):
    # A sanity check on the parser: known arrows, lazy and relative ones included.
    assert "storage.datasets" in graph["tasks.stage"]
    assert "infra.sandbox" in graph["tasks.solutions.solve"]  # imported inside the stage body
    assert "tasks.solutions.answers" in graph["tasks.solutions.solve"]
    assert len(graph) > 80


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_imports_go_flows_tasks_infra_storage(graph):
    assert against_the_grain(graph) == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    # A tiny tree with one cycle, one upward arrow, one evolution → training arrow.
    for package in LAYERS:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "tasks" / "evolution").mkdir()
    (tmp_path / "tasks" / "evolution" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "training").mkdir()
    (tmp_path / "tasks" / "training" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "evolution" / "elim.py").write_text(
        "def f():\n    from tasks.training import score\n"
    )
    (tmp_path / "tasks" / "training" / "score.py").write_text("from . import other\n")
    (tmp_path / "tasks" / "training" / "other.py").write_text("import tasks.training.score\n")
    (tmp_path / "infra" / "low.py").write_text("from flows import state\n")
    (tmp_path / "flows" / "state.py").write_text("")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["tasks.training.other", "tasks.training.score"]]
    assert against_the_grain(graph) == [
        "infra.low -> flows.state",
        "tasks.evolution.elim -> tasks.training.score"
        " (forbidden: tasks.evolution -> tasks.training)",
    ]
