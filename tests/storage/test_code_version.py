"""A stage's code version follows the code it imports, and only that code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from storage.code_version import code_files, code_version, module_closure
from storage.settings import PROJECT_ROOT


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of the project's packages to edit."""
    for package in ("flows", "tasks", "storage", "infra"):
        shutil.copytree(
            PROJECT_ROOT / package,
            tmp_path / package,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    return tmp_path


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")


def test_editing_answer_extraction_changes_solve_and_not_evolve(tree):
    solve, evolve = "tasks.solutions.solve", "tasks.evolution.evolve"
    before = {m: code_version(m, tree) for m in (solve, evolve)}
    _append(tree / "tasks" / "solutions" / "answers.py", "\n# a changed extractor\n")
    after = {m: code_version(m, tree) for m in (solve, evolve)}
    assert after[solve] != before[solve]
    assert after[evolve] == before[evolve]


def test_prompts_and_sql_are_part_of_the_stages_that_name_them(tree):
    solve, dedup = "tasks.solutions.solve", "tasks.evolution.dedup"
    before = {m: code_version(m, tree) for m in (solve, dedup)}
    _append(tree / "tasks" / "prompts" / "pot.txt", "\n")
    middle = {m: code_version(m, tree) for m in (solve, dedup)}
    assert middle[solve] != before[solve] and middle[dedup] == before[dedup]
    _append(tree / "storage" / "sql" / "dedup_near.sql", "\n-- tuned\n")
    after = {m: code_version(m, tree) for m in (solve, dedup)}
    assert after[dedup] != middle[dedup] and after[solve] == middle[solve]


def test_orchestration_modules_change_no_stage(tree):
    stages = ["tasks.solutions.solve", "tasks.evolution.evolve", "tasks.seeds"]
    before = {m: code_version(m, tree) for m in stages}
    for path in ("tasks/stage.py", "storage/datasets.py", "storage/catalog.py", "flows/data.py"):
        _append(tree / path, "\n# refactored\n")
    assert {m: code_version(m, tree) for m in stages} == before


def test_lazy_imports_inside_functions_count():
    # solve imports the sandbox inside the stage body (it is heavy); it is still its code.
    closure = module_closure("tasks.solutions.solve")
    assert "infra.sandbox" in closure and "tasks.solutions.answers" in closure
    assert "tasks.stage" not in closure and "tasks.evolution.evolve" not in closure


def test_resources_are_found_by_name():
    names = {p.name for p in code_files("tasks.evolution.eliminate")}
    assert {"answer_probe.txt", "judge_equal.txt", "judge_solvable.txt", "stop_words.txt"} <= names
    assert "cot_fewshot.txt" not in names
