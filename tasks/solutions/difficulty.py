"""Did upward evolution make problems harder and downward easier? Each evolution's difficulty
(1 - agreement of its solutions) is compared with its parent's, per round and direction."""

from __future__ import annotations

import polars as pl

from tasks.frames import require_columns
from tasks.solutions.records import Difficulty
from tasks.stage import StageOutput, stage


def difficulty_by_direction(instructions: pl.DataFrame, answers: pl.DataFrame) -> pl.DataFrame:
    """Per (round, direction): mean difficulty of evolutions vs their parents, and the delta.

    `answers` must hold the difficulty of the parents too (e.g. seed answers concatenated with
    every round's answers). `mean_delta` is over the pairs where both have a difficulty, so it
    is a paired comparison; `n_pairs` says how many there were.
    """
    require_columns(
        instructions, ["id", "parent_id", "round", "direction"], "difficulty_by_direction"
    )
    require_columns(answers, ["instruction_id", "difficulty"], "difficulty_by_direction answers")
    difficulty = answers.select(pl.col("instruction_id").alias("id"), pl.col("difficulty")).unique(
        "id", keep="first"
    )
    evolutions = instructions.filter(pl.col("parent_id").is_not_null()).select(
        "id", "parent_id", "round", "direction"
    )
    joined = evolutions.join(difficulty, on="id", how="left").join(
        difficulty.rename({"id": "parent_id", "difficulty": "parent_difficulty"}),
        on="parent_id",
        how="left",
    )
    paired = pl.col("difficulty").is_not_null() & pl.col("parent_difficulty").is_not_null()
    return (
        joined.group_by("round", "direction")
        .agg(
            pl.len().cast(pl.Int64).alias("n_evolutions"),
            paired.sum().cast(pl.Int64).alias("n_pairs"),
            pl.col("difficulty").filter(paired).mean().alias("mean_difficulty"),
            pl.col("parent_difficulty").filter(paired).mean().alias("mean_parent_difficulty"),
            (pl.col("difficulty") - pl.col("parent_difficulty"))
            .filter(paired)
            .mean()
            .alias("mean_delta"),
        )
        .sort("round", "direction")
    )


@stage(name="difficulty", outputs={"difficulty": Difficulty})
def report_difficulty(instructions: pl.DataFrame, answers: pl.DataFrame | None) -> StageOutput:
    """Mean difficulty of upward and downward evolutions vs their parents, per round."""
    if answers is None:
        frame = Difficulty.empty()
    else:
        frame = difficulty_by_direction(instructions, answers)
    return StageOutput({"difficulty": frame}, {"rows": frame.height})
