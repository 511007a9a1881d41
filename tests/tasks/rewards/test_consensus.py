"""Consensus step labels: kept where judge and Monte Carlo agree, disagreements counted per
round; PoT solutions get their execution outcome."""

from __future__ import annotations

import polars as pl
import pytest

from tasks.rewards.consensus import agreement_by_round, consensus_labels
from tasks.rewards.records import StepJudgment, StepLabel, StepRollout
from tasks.rewards.segment import StepParams, segment_solutions_frame
from tests.tasks.rewards.helpers import (
    answers_frame,
    instructions_frame,
    seeds_frame,
    solutions_frame,
)


def segmented() -> pl.DataFrame:
    frame, _ = segment_solutions_frame(
        solutions_frame(), answers_frame(), instructions_frame(), seeds_frame(), StepParams()
    )
    return frame


def judgments(first_errors: dict[str, int | None], failed: set[str] = frozenset()) -> pl.DataFrame:
    seg = segmented().filter(pl.col("kind") != "pot")
    rows = [
        {
            "solution_id": sid,
            "n_steps": n,
            "judged": sid not in failed,
            "first_error": None if sid in failed else first_errors.get(sid),
        }
        for sid, n in zip(seg["solution_id"], seg["n_steps"], strict=True)
    ]
    return pl.DataFrame(rows, schema={k: StepJudgment.schema()[k] for k in rows[0]})


def rollouts(hard: dict[tuple[str, int], bool | None]) -> pl.DataFrame:
    seg = segmented().filter(pl.col("kind") != "pot")
    rows = []
    for sid, n in zip(seg["solution_id"], seg["n_steps"], strict=True):
        for k in range(n):
            h = hard.get((sid, k), True)
            rows.append(
                {
                    "solution_id": sid,
                    "step_index": k,
                    "mc_soft": None if h is None else float(h),
                    "mc_hard": h,
                }
            )
    return pl.DataFrame(rows, schema={k: StepRollout.schema()[k] for k in rows[0]})


def test_consensus_keeps_agreement_and_counts_disagreement(pool):
    labels = consensus_labels(
        segmented(),
        judgments({"a:1": 0, "a1:0": 1}, failed={"b:1"}),
        rollouts({("a:1", 0): False, ("a:1", 1): False, ("a1:0", 1): True, ("a1x:0", 0): None}),
        pool,
    )
    assert labels.schema == StepLabel.schema()
    steps = {(r["solution_id"], r["step_index"]): r for r in labels.iter_rows(named=True)}
    assert steps[("a:1", 0)]["judge"] is False and steps[("a:1", 0)]["consensus"] is False
    assert steps[("a:1", 1)]["judge"] is None and steps[("a:1", 1)]["consensus"] is None
    assert steps[("a:0", 0)]["consensus"] is True
    disagree = steps[("a1:0", 1)]  # judge: wrong; monte carlo: reaches the answer
    assert disagree["consensus"] is None and disagree["note"] == "judge and monte carlo disagree"
    assert steps[("b:1", 0)]["judge"] is None and steps[("b:1", 0)]["consensus"] is None
    assert steps[("a1x:0", 0)]["mc_hard"] is None and steps[("a1x:0", 0)]["consensus"] is None
    assert steps[("a1:0", 0)]["step_text"] == "2 + 3 = 5. "
    by_round = agreement_by_round(labels)
    assert by_round["1"]["disagree"] == 1 and by_round["0"]["disagree"] == 0
    assert by_round["0"]["agree"] + by_round["0"]["disagree"] == by_round["0"]["both"]


def test_pot_rows_carry_the_execution_outcome(pool):
    labels = consensus_labels(segmented(), judgments({}), rollouts({}), pool)
    pot = labels.filter(pl.col("label_source") == "execution")
    outcome = dict(zip(pot["solution_id"], pot["consensus"], strict=True))
    assert outcome == {"a:2": True, "a:3": False, "a2:0": True}
    assert (pot["step_index"] == 0).all() and pot["judge"].null_count() == pot.height
    assert pot.filter(pl.col("solution_id") == "a:2")["step_text"].item() == "print(5)"
    note = pot.filter(pl.col("solution_id") == "a:3")["note"].item()
    assert note.startswith("program did not run")
    steps = labels.filter(pl.col("label_source") == "steps")
    assert steps.height == segmented()["n_steps"].sum()


def test_pot_without_a_verified_answer_is_unknown(pool):
    seg = segmented().with_columns(
        pl.when(pl.col("solution_id") == "a2:0")
        .then(None)
        .otherwise(pl.col("target"))
        .alias("target")
    )
    labels = consensus_labels(seg, judgments({}), rollouts({}), pool)
    row = labels.filter(pl.col("solution_id") == "a2:0").row(0, named=True)
    assert row["consensus"] is None and row["note"] == "no verified answer for the instruction"


def test_missing_judgment_is_a_one_line_error(pool):
    with pytest.raises(ValueError, match="has no row in step_judgments"):
        consensus_labels(segmented(), judgments({}).head(1), rollouts({}), pool)
