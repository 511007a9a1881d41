"""r = rI · rA: aggregation, nulls (never 0 for could not judge) and the reasons for them."""

from __future__ import annotations

import polars as pl
import pytest

from tasks.rewards.scores import ScoringParams, aggregate_steps, reward_table
from tests.tasks.rewards.helpers import instructions_frame, solutions_frame


def test_aggregate_min_and_product():
    assert aggregate_steps([1.0, 0.5, 0.8], "min") == 0.5
    assert aggregate_steps([1.0, 0.5, 0.8], "product") == pytest.approx(0.4)
    assert aggregate_steps([1.0, None], "min") is None  # the unknown step could be lower
    assert aggregate_steps([None, 0.0, None], "min") == 0.0  # a known 0 decides min and product
    assert aggregate_steps([None, 0.0], "product") == 0.0
    assert aggregate_steps([], "min") is None
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_steps([1.0], "mean")  # type: ignore[arg-type]


def rankings() -> pl.DataFrame:
    """Group a@1 ranked (a1 above a1x), group a1@2 failed, group b@1 never sampled."""
    score = lambda i, s, rs: {  # noqa: E731
        "id": i,
        "source": "instructions",
        "definition": s,
        "precision": s,
        "integrity": s,
        "score": s,
        "r_i": (s - 1) / 9,
        "r_i_sibling": rs,
    }
    return pl.DataFrame(
        [
            {
                "group_id": "a@1",
                "scores": [score("a1", 10.0, 1.0), score("a1x", 4.0, 0.0)],
                "order_a": ["a1x", "a1"],
                "unrankable": [],
            },
            {"group_id": "a1@2", "scores": None, "order_a": ["a2"], "unrankable": []},
        ]
    )


def labels() -> pl.DataFrame:
    rows = [
        ("a:0", "steps", 0, True, True, 1.0, True),
        ("a:0", "steps", 1, True, True, 0.5, True),
        ("a1:0", "steps", 0, True, True, 1.0, True),
        ("a1:0", "steps", 1, True, None, 0.5, None),  # monte carlo unknown → consensus null
        ("a1:1", "steps", 0, False, False, 0.0, False),
        ("a1:1", "steps", 1, None, True, 1.0, None),
        ("a1x:0", "steps", 0, True, True, 0.75, True),
        ("a2:0", "execution", 0, None, None, None, True),
    ]
    return pl.DataFrame(
        rows,
        schema=[
            "solution_id",
            "label_source",
            "step_index",
            "judge",
            "mc_hard",
            "mc_soft",
            "consensus",
        ],
        orient="row",
    )


def table(**params) -> pl.DataFrame:
    return reward_table(
        solutions_frame(), instructions_frame(), rankings(), labels(), ScoringParams(**params)
    )


def test_one_row_per_solution_with_r_equal_to_the_product():
    frame = table()
    assert frame.height == solutions_frame().height
    known = frame.filter(pl.col("r").is_not_null())
    assert ((known["r"] - known["r_i"] * known["r_a"]).abs() < 1e-12).all()
    rows = {r["solution_id"]: r for r in frame.iter_rows(named=True)}
    assert rows["a1x:0"]["r_i"] == pytest.approx(1 / 3) and rows["a1x:0"]["r_i_sibling"] == 0.0
    assert rows["a1x:0"]["r_a"] == 1.0 and rows["a1x:0"]["r"] == pytest.approx(1 / 3)
    assert rows["a1:1"]["r_a"] == 0.0 and rows["a1:1"]["r"] == 0.0  # judged wrong: a real 0


def test_nulls_have_reasons_and_are_never_zero():
    rows = {r["solution_id"]: r for r in table().iter_rows(named=True)}
    assert rows["a:0"]["r_i"] is None and rows["a:0"]["r_i_note"].startswith("seed")
    assert rows["a:0"]["r"] is None and rows["a:0"]["r_a"] == 1.0
    assert rows["a2:0"]["r_i_note"] == "ranking failed" and rows["a2:0"]["r_a"] == 1.0
    assert rows["b1:0"]["r_i_note"] == "parent not sampled for ranking"
    assert rows["b1:0"]["r_a_note"] == "not selected for step labels" and rows["b1:0"]["r"] is None
    assert rows["a1:0"]["r_a"] is None and rows["a1:0"]["r_a_note"] == "a step label is missing"
    assert rows["a1:0"]["r"] is None


def test_step_score_and_aggregation_are_configurable():
    soft = {r["solution_id"]: r for r in table(step_score="mc_soft").iter_rows(named=True)}
    assert soft["a1:0"]["r_a"] == 0.5 and soft["a1x:0"]["r_a"] == 0.75
    product = {
        r["solution_id"]: r
        for r in table(step_score="mc_soft", aggregation="product").iter_rows(named=True)
    }
    assert product["a:0"]["r_a"] == 0.5 and product["a1:1"]["r_a"] == 0.0
    judge = {r["solution_id"]: r for r in table(step_score="judge").iter_rows(named=True)}
    assert judge["a1:0"]["r_a"] == 1.0 and judge["a2:0"]["r_a"] == 1.0  # PoT: its outcome
