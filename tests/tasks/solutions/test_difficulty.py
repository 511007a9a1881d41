"""Difficulty of evolutions vs their parents, per round and direction."""

from __future__ import annotations

import polars as pl
import pytest

from tasks.solutions.difficulty import difficulty_by_direction


def test_difficulty_by_direction():
    instructions = pl.DataFrame(
        {
            "id": ["s", "u1", "u2", "d1", "u3", "x"],
            "parent_id": [None, "s", "s", "s", "u1", "s"],
            "round": [0, 1, 1, 1, 2, 1],
            "direction": [None, "upward", "upward", "downward", "upward", "downward"],
        }
    )
    answers = pl.DataFrame(
        {
            "instruction_id": ["s", "u1", "u2", "d1", "u3"],  # x was never solved
            "difficulty": [0.25, 0.5, 0.75, 0.0, 1.0],
        }
    )
    out = difficulty_by_direction(instructions, answers)
    rows = {(r["round"], r["direction"]): r for r in out.to_dicts()}
    assert set(rows) == {(1, "downward"), (1, "upward"), (2, "upward")}
    up = rows[(1, "upward")]
    assert (up["n_evolutions"], up["n_pairs"]) == (2, 2)
    assert up["mean_difficulty"] == pytest.approx(0.625)
    assert up["mean_parent_difficulty"] == pytest.approx(0.25)
    assert up["mean_delta"] == pytest.approx(0.375)
    down = rows[(1, "downward")]
    assert (down["n_evolutions"], down["n_pairs"], down["mean_delta"]) == (
        2,
        1,
        pytest.approx(-0.25),
    )
    assert rows[(2, "upward")]["mean_delta"] == pytest.approx(0.5)
