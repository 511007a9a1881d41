"""A stage's code version follows the code its function refers to, symbol by symbol, and only
that code: not the modules its module happens to import."""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
import shutil
import textwrap
from pathlib import Path

import pytest

from storage.code_version import EXCLUDED_SYMBOLS, code_version, coverage
from storage.settings import PROJECT_ROOT

ENGINES = ("infra/engines/vllm_engine.py", "infra/engines/openai_engine.py")


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


@functools.cache
def stages() -> dict[str, str]:
    """Stage name -> "module:function" of every stage declared under tasks/."""
    import tasks
    from tasks.stage import Stage

    found = {}
    for info in pkgutil.walk_packages(tasks.__path__, "tasks."):
        for value in vars(importlib.import_module(info.name)).values():
            if isinstance(value, Stage) and value.module == info.name:
                found[value.name] = f"{value.module}:{value.fn.__qualname__}"
    return found


def versions(tree: Path, names=None) -> dict[str, str]:
    return {n: code_version(t, tree) for n, t in stages().items() if names is None or n in names}


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")


def edit(path: Path, names: set[str] | None = None) -> None:
    """Change the source of the top-level definitions `names` of a file (every statement but
    the imports when None): a comment appended to each one's last line."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for stmt in ast.parse(text).body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            continue
        targets = [t for t in getattr(stmt, "targets", [getattr(stmt, "target", None)]) if t]
        bound = {getattr(stmt, "name", None)} | {
            n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)
        }
        if names is None or bound & names:
            lines[stmt.end_lineno - 1] += "  # edited"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _file(module: str) -> Path:
    return Path(*module.split(".")).with_suffix(".py")


def test_editing_an_engine_implementation_reversions_no_stage(tree):
    before = versions(tree)
    assert len(before) >= 30
    for path in ENGINES:
        edit(tree / path)
    after = versions(tree)
    assert sorted(n for n in before if after[n] != before[n]) == []
    for target in stages().values():
        assert not {str(p.relative_to(tree)) for p in coverage(target, tree).files} & set(ENGINES)
    # the stages that talk to an engine still cover what they send it: the request types
    assert "infra.engines.base:ChatRequest" in coverage(stages()["evolve"], tree).symbols


def test_editing_answer_extraction_reversions_solve_and_not_evolve(tree):
    before = versions(tree, {"solve", "evolve", "dedup"})
    edit(tree / "tasks" / "solutions" / "answers.py")
    after = versions(tree, {"solve", "evolve", "dedup"})
    assert after["solve"] != before["solve"]
    assert after["evolve"] == before["evolve"] and after["dedup"] == before["dedup"]


def test_a_function_counts_when_the_stage_calls_it_transitively_and_not_otherwise(tree):
    target = stages()["solve"]
    covered = coverage(target, tree)
    answers = "tasks.solutions.answers"
    # functions of a module the stage calls, that the stage never reaches
    defined = {
        n.name
        for n in ast.parse((tree / _file(answers)).read_text()).body
        if isinstance(n, ast.FunctionDef)
    }
    unused = {n for n in defined if f"{answers}:{n}" not in covered.symbols}
    assert unused, "solve calls every function of answers.py"
    edit(tree / _file(answers), unused)
    _append(tree / _file(target.split(":")[0]), "\n\ndef helper_nobody_calls():\n    return 1\n")
    assert code_version(target, tree) == covered.version
    # a function reached through at least one other function
    deep = sorted(
        s for s in covered.symbols if s.startswith(f"{answers}:") and len(covered.why(s)) >= 3
    )
    assert deep
    edit(tree / _file(answers), {deep[0].split(":")[1]})
    assert code_version(target, tree) != covered.version


def test_the_four_training_sets_have_their_own_versions(tree):
    names = {n for n, t in stages().items() if t.startswith("tasks.training.sets:")}
    assert len(names) == 4
    before = versions(tree, names)
    assert len(set(before.values())) == 4
    symbols = {n: set(coverage(stages()[n], tree).symbols) for n in names}
    for name in sorted(names):
        others = set().union(*(symbols[o] for o in names - {name}))
        builders = sorted(
            s.split(":")[1]
            for s in symbols[name] - others
            if s.startswith("tasks.training.sets:") and s != stages()[name]
        )
        assert builders, f"{name} calls nothing of its own"
        edit(tree / "tasks" / "training" / "sets.py", {builders[0]})
        after = versions(tree, names)
        assert {n for n in names if after[n] != before[n]} == {name}, builders[0]
        before = after


def test_prompts_and_sql_are_part_of_the_stages_that_name_them(tree):
    solve_dedup = {"solve", "dedup"}
    before = versions(tree, solve_dedup)
    _append(tree / "tasks" / "prompts" / "pot.txt", "\n")
    middle = versions(tree, solve_dedup)
    assert middle["solve"] != before["solve"] and middle["dedup"] == before["dedup"]
    _append(tree / "storage" / "sql" / "dedup_near.sql", "\n-- tuned\n")
    after = versions(tree, solve_dedup)
    assert after["dedup"] != middle["dedup"] and after["solve"] == middle["solve"]


def test_resources_are_those_named_in_the_covered_code_only():
    eliminate = {p.name for p in coverage(stages()["eliminate"]).resources}
    assert {"answer_probe.txt", "judge_equal.txt", "judge_solvable.txt", "stop_words.txt"} <= (
        eliminate
    )
    assert "cot_fewshot.txt" not in eliminate
    # the start pool's stage shares its module with `combine`, which names the evolution
    # prompts; the start pool names none
    assert coverage(stages()["start_pool"]).resources == ()


def test_orchestration_modules_change_no_stage(tree):
    names = {"solve", "evolve", "ingest"}
    before = versions(tree, names)
    for path in ("tasks/stage.py", "storage/datasets.py", "storage/catalog.py", "flows/data.py"):
        edit(tree / path)
    assert versions(tree, names) == before
    edit(tree / "tasks" / "seeds.py")
    assert versions(tree, names)["ingest"] != before["ingest"]


def test_lazy_imports_inside_functions_count():
    # solve imports the sandbox inside the stage body (it is heavy); it is still its code.
    files = {str(p.relative_to(PROJECT_ROOT)) for p in coverage(stages()["solve"]).files}
    assert "infra/sandbox/pool.py" in files and "tasks/solutions/answers.py" in files
    assert "tasks/stage.py" not in files and "tasks/evolution/evolve.py" not in files


def test_excluded_engine_openers_exist():
    """The symbol exclusions name real definitions (a rename would silently over-include)."""
    for module, name in EXCLUDED_SYMBOLS:
        assert callable(getattr(importlib.import_module(module), name))


def test_the_stage_lists_its_coverage():
    from tasks.solutions.solve import solve_batch

    covered = solve_batch.code_coverage()
    assert covered.version == solve_batch.code_version == coverage(stages()["solve"]).version
    assert covered.target == stages()["solve"]


# -- resolution, on a package written for the purpose ----------------------------------------

TOY = {
    "__init__.py": "",
    "shapes/__init__.py": "from .records import Shape as Shape\nfrom .records import *\n",
    "shapes/records.py": """
        from dataclasses import dataclass

        from tasks.toy.units import UNIT


        @dataclass
        class Shape:
            side: float = UNIT

            def area(self) -> float:
                return self.side**2


        class Unused:
            pass
    """,
    "units.py": "UNIT = 1.0\nOTHER = 2.0\n",
    "helpers.py": """
        import math


        def scale(x):
            return inner(x) * math.pi


        def inner(x):
            return x + 1


        def not_called(x):
            return x


        def by_name():
            return "toy_prompt"
    """,
    "whole.py": "def a():\n    return 1\n\n\ndef b():\n    return 2\n",
    "stages.py": """
        from tasks.stage import stage
        from tasks.toy import helpers as h
        from tasks.toy import whole
        from tasks.toy.shapes import Shape


        def registered(fn):
            return fn


        @registered
        @stage(outputs={"shapes": Shape})
        def make_shapes(n: int):
            from tasks.toy.helpers import by_name

            return [h.scale(i) for i in range(n)], by_name()


        @stage(outputs=["x"])
        def pass_module(n: int):
            return getattr(whole, "a")()


        @stage(outputs=["y"])
        def other(n: int):
            return n
    """,
}


@pytest.fixture
def toy(tree) -> Path:
    for name, text in TOY.items():
        path = tree / "tasks" / "toy" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    (tree / "tasks" / "prompts" / "toy_prompt.txt").write_text("hello {{x}}\n")
    return tree


def test_resolution_follows_symbols_through_re_exports(toy):
    covered = coverage("tasks.toy.stages:make_shapes", toy)
    assert set(covered.symbols) == {
        "tasks.toy.stages:make_shapes",
        "tasks.toy.stages:registered",
        "tasks.toy.shapes.records:Shape",  # named in the decorator, through the package
        "tasks.toy.units:UNIT",  # the class's default
        "tasks.toy.helpers:scale",  # `h.scale`
        "tasks.toy.helpers:inner",  # transitively
        "tasks.toy.helpers:by_name",  # imported inside the function
    }
    assert [p.name for p in covered.resources] == ["toy_prompt.txt"]
    assert covered.why("tasks.toy.units:UNIT") == [
        "tasks.toy.stages:make_shapes",
        "tasks.toy.shapes.records:Shape",
        "tasks.toy.units:UNIT",
    ]
    version = covered.version
    others = {"pass_module": code_version("tasks.toy.stages:pass_module", toy)}
    toy_dir = toy / "tasks" / "toy"
    for path, names in [
        ("helpers.py", {"not_called"}),
        ("units.py", {"OTHER"}),
        ("shapes/records.py", {"Unused"}),
        ("stages.py", {"other"}),
    ]:
        edit(toy_dir / path, names)
        assert code_version("tasks.toy.stages:make_shapes", toy) == version, path
    assert code_version("tasks.toy.stages:pass_module", toy) == others["pass_module"]
    for path, names in [
        ("units.py", {"UNIT"}),
        ("shapes/records.py", {"Shape"}),
        ("helpers.py", {"inner"}),
        ("stages.py", {"registered"}),
    ]:
        edit(toy_dir / path, names)
        assert code_version("tasks.toy.stages:make_shapes", toy) != version, path
        version = code_version("tasks.toy.stages:make_shapes", toy)
    (toy / "tasks" / "prompts" / "toy_prompt.txt").write_text("hello {{x}}!\n")
    assert code_version("tasks.toy.stages:make_shapes", toy) != version


def test_a_module_used_as_a_value_counts_whole(toy):
    covered = coverage("tasks.toy.stages:pass_module", toy)
    assert "tasks.toy.whole:*" in covered.symbols
    version = covered.version
    edit(toy / "tasks" / "toy" / "whole.py", {"b"})
    assert code_version("tasks.toy.stages:pass_module", toy) != version


def test_an_unresolvable_name_counts_its_module_whole(toy):
    _append(toy / "tasks" / "toy" / "stages.py", "\n\ndef dynamic():\n    return mystery()\n")
    assert "tasks.toy.stages:*" in coverage("tasks.toy.stages:dynamic", toy).symbols
    # a star import: the name is looked up in the module it comes from
    _append(
        toy / "tasks" / "toy" / "stages.py",
        "\n\nfrom tasks.toy.units import *\n\n\ndef starred():\n    return OTHER\n",
    )
    assert "tasks.toy.units:OTHER" in coverage("tasks.toy.stages:starred", toy).symbols
