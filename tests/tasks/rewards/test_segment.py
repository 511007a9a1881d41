"""Selecting and segmenting solutions: targets, the per-round cap, PoT kept whole, counts."""

from __future__ import annotations

import polars as pl
import pytest

from tasks.rewards.segment import StepParams, segment_solutions_frame
from tests.tasks.rewards.helpers import (
    answers_frame,
    instructions_frame,
    seeds_frame,
    solutions_frame,
)


def segment(**params):
    return segment_solutions_frame(
        solutions_frame(),
        answers_frame(),
        instructions_frame(),
        seeds_frame(),
        StepParams(**params),
    )


def test_targets_come_from_references_and_verified_majorities():
    frame, left_out = segment()
    target = dict(zip(frame["solution_id"], frame["target"], strict=True))
    source = dict(zip(frame["solution_id"], frame["target_source"], strict=True))
    assert target["a:0"] == "5" and source["a:0"] == "reference"
    assert target["a1:0"] == "9" and source["a1:0"] == "majority"
    assert target["a1x:0"] is None and source["a1x:0"] is None  # unverified majority
    assert target["b1:0"] is None
    assert left_out == {"no_text": 1, "too_many_steps": 0, "over_cap": 0}
    assert frame.height + 1 == solutions_frame().height


def test_cot_is_split_and_pot_is_kept_whole():
    frame, _ = segment()
    rows = {r["solution_id"]: r for r in frame.iter_rows(named=True)}
    assert rows["a:0"]["steps"] == ["Step 1: 2 + 3 = 5.\n", "The answer is: 5"]
    assert rows["a1:0"]["steps"] == ["2 + 3 = 5. ", "5 + 4 = 9.\n", "The answer is: 9"]
    assert rows["b:1"]["kind"] == "pot_fallback_cot" and rows["b:1"]["n_steps"] == 2
    assert rows["a:2"]["steps"] is None and rows["a:2"]["program"] == "print(5)"
    assert frame["round"].to_list() == sorted(frame["round"].to_list())


def test_cap_per_round_is_seeded_and_counted():
    frame, left_out = segment(max_solutions_per_round=1)
    cot = frame.filter(pl.col("kind") != "pot")
    assert cot.group_by("round").len()["len"].max() == 1
    assert left_out["over_cap"] == 5  # round 0: 3 CoT, round 1: 4 CoT
    assert frame.filter(pl.col("kind") == "pot").height == 3  # PoT is not capped
    again, _ = segment(max_solutions_per_round=1)
    assert again.equals(frame)
    other = [
        segment(max_solutions_per_round=1, seed=s)[0]["solution_id"].to_list() for s in range(6)
    ]
    assert len({tuple(x) for x in other}) > 1


def test_too_many_steps_are_left_out():
    frame, left_out = segment(max_steps=2)
    assert left_out["too_many_steps"] == 1  # a1:0 has three steps
    assert "a1:0" not in frame["solution_id"].to_list()


def test_unknown_instruction_is_a_one_line_error():
    bad = solutions_frame().with_columns(pl.lit("zz").alias("instruction_id"))
    with pytest.raises(ValueError, match="instruction 'zz' is not in instructions"):
        segment_solutions_frame(bad, answers_frame(), instructions_frame(), None, StepParams())
