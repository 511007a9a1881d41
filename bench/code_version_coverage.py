"""What each stage's code version covers, per module (before) and per symbol (after).

Before: the module-closure method of commit 5b05754 (`git show 5b05754:storage/code_version.py`,
loaded as its own module): a stage's version hashed its module, every project module that module
imports transitively, and the resources named anywhere in them. After: `storage.code_version`,
the stage function and the symbols it refers to, transitively.

For every stage declared under tasks/ (found by importing every tasks module and collecting its
`Stage` objects) the table lists the .py files, symbols and resource files each version covers.
Then, on a copy of the tree, every top-level definition of a file is edited (a comment appended
to its last line, so each definition's source changes) and the stages whose version changes are
counted, before and after, for the engine implementations and for answer extraction.

    python bench/code_version_coverage.py [--base 5b05754] [--detail STAGE]

Prints a markdown table; reads no data and runs no stage.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import pkgutil
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage import code_version as after  # noqa: E402

PACKAGES = ("flows", "tasks", "storage", "infra")
TOUCHED = (
    "infra/engines/vllm_engine.py",
    "infra/engines/openai_engine.py",
    "infra/engines/embedded.py",
    "tasks/solutions/answers.py",
)


def old_method(base: str) -> ModuleType:
    """storage/code_version.py as of `base`, imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{base}:storage/code_version.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_code_version.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("old_code_version", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stages() -> list[tuple[str, str, str]]:
    """(stage name, module, function qualname) of every stage declared under tasks/."""
    import tasks
    from tasks.stage import Stage

    found = []
    for info in pkgutil.walk_packages(tasks.__path__, "tasks."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, Stage) and value.module == info.name:
                found.append((value.name, value.module, value.fn.__qualname__))
    return sorted(set(found), key=lambda s: (s[1], s[0]))


def edit_every_definition(path: Path) -> None:
    """Append a comment to the last line of every top-level statement but the imports."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for stmt in ast.parse(text).body:
        if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
            lines[stmt.end_lineno - 1] += "  # edited"
    edited = "\n".join(lines) + "\n"
    ast.parse(edited)
    path.write_text(edited, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="5b05754", help="commit of the module-closure method")
    parser.add_argument("--detail", help="also list the symbols and files of this stage")
    args = parser.parse_args()
    before = old_method(args.base)
    declared = stages()

    def versions(root: Path) -> dict[str, tuple[str, str]]:
        return {
            name: (
                before.code_version(module, root),
                after.code_version(f"{module}:{fn}", root),
            )
            for name, module, fn in declared
        }

    print(
        "| stage | module | before: .py files | before: resources | after: .py files "
        "| after: symbols | after: resources |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    totals = [0, 0, 0, 0, 0]
    for name, module, fn in declared:
        old_files = before.code_files(module, ROOT)
        old_py = [p for p in old_files if p.suffix == ".py"]
        new = after.coverage(f"{module}:{fn}", ROOT)
        row = [len(old_py), len(old_files) - len(old_py), len(new.files), len(new.symbols),
               len(new.resources)]  # fmt: skip
        totals = [t + r for t, r in zip(totals, row, strict=True)]
        print(f"| {name} | {module} | " + " | ".join(map(str, row)) + " |")
        if name == args.detail:
            print("\n".join(f"|   {s} |" for s in new.symbols + tuple(map(str, new.resources))))
    n = len(declared)
    print(f"| mean of {n} |  | " + " | ".join(f"{t / n:.1f}" for t in totals) + " |")
    distinct = [len({v[i] for v in versions(ROOT).values()}) for i in (0, 1)]
    print(f"| distinct code versions | | {distinct[0]} | | {distinct[1]} | | |")

    print()
    print("| every definition of this file edited | stages re-versioned before | after |")
    print("|---|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder)
        for package in PACKAGES:
            shutil.copytree(ROOT / package, tree / package,
                            ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        base = versions(tree)
        for touched in TOUCHED:
            path = tree / touched
            original = path.read_bytes()
            edit_every_definition(path)
            edited = versions(tree)
            path.write_bytes(original)
            changed = [sorted(s for s in base if base[s][i] != edited[s][i]) for i in (0, 1)]
            print(f"| {touched} | {len(changed[0])} of {n} | {len(changed[1])} of {n}"
                  f"{': ' + ', '.join(changed[1]) if changed[1] else ''} |")  # fmt: skip


if __name__ == "__main__":
    main()
