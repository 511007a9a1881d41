"""The code version of a stage: a hash of the source that can change its output.

A stage's code version covers its own module, every project module that module imports,
directly or transitively (imports inside functions count: they are how heavy modules are loaded
lazily), and the resource files those modules name: prompt templates (`tasks/prompts/*.txt`), SQL
(`storage/sql/*.sql`) and data files (`tasks/data/*`). A resource counts when one of the modules
holds a string constant equal to its file name or stem (`"cot_fewshot"`, `"dedup_near"`,
`"stop_words.txt"`); that over-includes at worst (a module naming "pot" for another reason makes
`pot.txt` part of its version), never under-includes a resource loaded by name.

Modules that only orchestrate (the stage machinery itself, the dataset store, the catalog, the
flows and entry points) are not part of any stage's version: they decide where rows are written,
not what the rows are. So editing `tasks/solutions/answers.py` changes the version of the stages
that extract answers and of nothing else, and editing the stage machinery recomputes nothing.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from storage.settings import PROJECT_ROOT

# Top-level packages of the project; imports of anything else (the standard library, polars,
# torch) are not followed: their versions are pinned by the environment, not by this hash.
PROJECT_PACKAGES = ("flows", "tasks", "storage", "infra")
# Modules that never change what a stage writes (orchestration, persistence, entry points).
EXCLUDED_MODULES = frozenset(
    {
        "tasks.stage",
        "storage.code_version",
        "storage.datasets",
        "storage.catalog",
        "storage.settings",
        "storage.errors",
        "storage.faults",
        "storage.locks",
    }
)
EXCLUDED_PACKAGES = ("flows",)
RESOURCE_DIRS = (
    ("tasks/prompts", ".txt"),
    ("storage/sql", ".sql"),
    ("tasks/data", ""),
)


def module_path(module: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The source file of a project module (`tasks.seeds` → tasks/seeds.py), or None."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = os.stat(path)
    return str(path), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4096)
def _parse(
    path: str, size: int, mtime_ns: int, root: Path
) -> tuple[tuple[str, ...], frozenset[str]]:
    """(imported module names, string constants) of one source file."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    package = _package_of(Path(path), root)
    imports: list[str] = []
    strings: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            if base is None:
                continue
            imports.append(base)
            # `from tasks import dedup` imports the submodule tasks.dedup
            imports += [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and 0 < len(node.value) <= 80
        ):
            strings.add(node.value)
    return tuple(imports), frozenset(strings)


def _package_of(path: Path, root: Path) -> str:
    """The package a module's relative imports resolve against."""
    parts = list(path.resolve().relative_to(root.resolve()).with_suffix("").parts)
    return ".".join(parts[:-1])


def _absolute(module: str | None, level: int, package: str) -> str | None:
    if level == 0:
        return module
    parts = package.split(".") if package else []
    if level - 1 > len(parts):
        return None
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _excluded(module: str) -> bool:
    return module in EXCLUDED_MODULES or module.split(".")[0] in EXCLUDED_PACKAGES


def module_closure(module: str, root: Path = PROJECT_ROOT) -> list[str]:
    """The module and every project module it imports, transitively, minus orchestration."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_path(name, root)
        if path is None:
            continue
        seen.add(name)
        imports, _ = _parse(*_file_key(path), root)
        for imported in imports:
            # importing a.b.c also runs the __init__ of a and a.b
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate not in seen and not _excluded(candidate):
                    todo.append(candidate)
    return sorted(m for m in seen if m == module or not _excluded(m))


def resources(modules: Iterable[str], root: Path = PROJECT_ROOT) -> list[Path]:
    """Prompt, SQL and data files named by a string constant in any of `modules`."""
    names: set[str] = set()
    for module in modules:
        path = module_path(module, root)
        if path is not None:
            names |= _parse(*_file_key(path), root)[1]
    found: set[Path] = set()
    for folder, suffix in RESOURCE_DIRS:
        directory = root / folder
        if not directory.is_dir():
            continue
        for file in directory.iterdir():
            named = file.name in names or (suffix and file.stem in names)
            if file.is_file() and named and (not suffix or file.suffix == suffix):
                found.add(file)
    return sorted(found)


def code_files(module: str, root: Path = PROJECT_ROOT) -> list[Path]:
    """Every file whose bytes go into the code version of a stage declared in `module`."""
    modules = module_closure(module, root)
    files = [p for m in modules if (p := module_path(m, root)) is not None]
    return files + resources(modules, root)


def hash_files(files: Iterable[Path], root: Path = PROJECT_ROOT) -> str:
    """Hash of the files' paths (relative to the project) and bytes."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: str(p)):
        try:
            name = str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            name = path.name
        digest.update(name.encode() + b"\0")
        digest.update(_bytes_hash(*_file_key(path)).encode())
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=4096)
def _bytes_hash(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def code_version(module: str, root: Path = PROJECT_ROOT) -> str:
    """The code version of a stage declared in `module` (see the module docstring)."""
    return hash_files(code_files(module, root), root)
