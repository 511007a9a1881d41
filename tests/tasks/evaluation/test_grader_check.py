"""Grader check: every benchmark's reference solutions, graded by the evaluation's own code
against its own reference answers, pass, or fail for a listed and explained reason."""

from __future__ import annotations

import polars as pl
import pytest

from tasks.benchmarks import REGISTRY, benchmark_source, read_items
from tasks.evaluation.grader_check import EXPLAINED, asdiv_formula_value, check_references


@pytest.mark.parametrize(
    ("formula", "kind", "value"),
    [
        ("7+2=9", "Addition", "9"),
        ("(3*100)+(8*10)+(3*1)=383", "Number-Operation", "383"),
        ("15:18=5:6", "Ratio", "5:6"),
        ("95-52-29=14", "TVQ-Final", "14"),
        ("47/5=9 r2", "Floor-Division", "9"),
        ("47/5=9 r2", "Surplus", "2"),
        ("47/5=9 r2", "Ceil-Division", "10"),
        ("45/5=9 r0", "Ceil-Division", "9"),
        ("2, 6, 18, 54, 162", "Sequential-Operation", "162"),
        ("4+5=9 apples < 10 apples", "Comparison", "9 apples < 10 apples"),
        ("24-6=18 (cookies)", "Subtraction", "18"),
    ],
)
def test_asdiv_formula_values(formula, kind, value):
    assert asdiv_formula_value(formula, kind) == value


def test_every_reference_solution_grades_as_its_answer_or_is_explained(shared_data, pool):
    from infra.sandbox import Sandbox, isolation_available

    ok, why = isolation_available()
    if not ok:
        pytest.skip(f"sandbox isolation unavailable: {why}")
    items = pl.concat([read_items(benchmark_source(name)) for name in REGISTRY])
    with Sandbox(workers=2) as sandbox:
        checked = check_references(items, sandbox, pool)
    assert checked.height == items.height
    failed = checked.filter(pl.col("correct").is_null() | ~pl.col("correct"))
    print(f"\n{failed.height} of {checked.height} reference solutions do not grade as correct:")
    for r in failed.sort("benchmark", "explanation").iter_rows(named=True):
        print(
            f"  {r['benchmark']}:{r['id']} ({r['subject']}) {r['derived']!r} vs {r['answer']!r}: "
            f"{r['explanation']}"
        )
    unexplained = failed.filter(pl.col("explanation").is_null())
    assert unexplained.is_empty(), unexplained.select("benchmark", "id", "derived", "answer")
    per = dict(checked.group_by("benchmark").agg(pl.col("correct").mean()).iter_rows())
    # Sets whose references state their answer directly grade at 100%.
    assert per["gsm8k"] == per["math500"] == per["mawps"] == per["sat_math"] == 1.0
    assert per["svamp"] == 0.999  # one data error
    assert per["mmlu_stem"] == pytest.approx(3017 / 3018)  # two options with the same text
    # Each explanation is still needed: a rule that explains nothing is stale.
    used = set(failed["explanation"])
    assert {e.reason for e in EXPLAINED} == used
