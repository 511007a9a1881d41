"""Rewards per (instruction, solution): r = rI · rA (the `compute_rewards` stage).

- `r_i`: the instruction reward from the sibling ranking (`tasks.rewards.rankings`): the judge's
  mean score over the three criteria mapped to [0, 1], one scale for all groups; `r_i_sibling`:
  the share of its siblings the instruction beats (normalised within the parent's group).
  Both are null for an instruction that was not ranked: a seed (no parent to rank against), a
  parent outside the sampled share, or a group whose judge calls both failed.
- `r_a`: the answer reward from the step labels (`tasks.rewards.consensus`), each step scored
  by `step_score` (consensus, judge, mc_hard: 1 or 0; mc_soft: the share) and aggregated by
  `aggregation` (min, the default, or product). A PoT solution's only label is its execution
  outcome. A null step makes r_a null unless a known step already scores 0 (then min and
  product are 0 whatever the unknown steps are). A solution without step labels (not selected)
  has r_a null.
- `r = r_i * r_a`, null when either is null: a reward that could not be judged is null, never 0.

`r_i_note` / `r_a_note` say why a value is null; the stage stats count them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from tasks.frames import require_columns
from tasks.rewards.records import Reward
from tasks.stage import StageContext, StageOutput, stage

Aggregation = Literal["min", "product"]
StepScore = Literal["consensus", "judge", "mc_soft", "mc_hard"]


class ScoringParams(BaseModel):
    """How step labels become the answer reward rA."""

    model_config = ConfigDict(extra="forbid")

    aggregation: Aggregation = Field("min", description="min or product of the step scores")
    step_score: StepScore = Field(
        "consensus",
        description="which step label scores a step: consensus, judge, mc_soft, mc_hard",
    )


def aggregate_steps(scores: Sequence[float | None], how: Aggregation = "min") -> float | None:
    """min or product of step scores in [0, 1]; None when a null step could change the result."""
    if not scores:
        return None
    known = [s for s in scores if s is not None]
    if any(s == 0 for s in known):
        return 0.0
    if len(known) < len(scores):
        return None
    if how == "min":
        return float(min(known))
    if how == "product":
        return float(math.prod(known))
    raise ValueError(f"aggregation must be 'min' or 'product', got {how!r}")


def step_score_values(labels: pl.DataFrame, step_score: StepScore) -> dict[str, list[float | None]]:
    """Per solution, the score of each step in order (PoT: the execution outcome)."""
    require_columns(
        labels,
        ["solution_id", "label_source", "step_index", "consensus", step_score],
        "step labels",
    )
    ordered = labels.sort("solution_id", "step_index")
    out: dict[str, list[float | None]] = {}
    for r in ordered.iter_rows(named=True):
        value = r["consensus"] if r["label_source"] == "execution" else r[step_score]
        score = None if value is None else float(value)
        out.setdefault(r["solution_id"], []).append(score)
    return out


def instruction_rewards(rankings: pl.DataFrame) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """(sibling id -> {r_i, r_i_sibling}, ids that were in a group whose judging failed)."""
    require_columns(rankings, ["scores", "order_a", "unrankable"], "instruction_rankings")
    scored: dict[str, dict[str, Any]] = {}
    failed: set[str] = set()
    for r in rankings.iter_rows(named=True):
        if r["scores"] is None:
            failed.update(r["order_a"] or [])
            failed.update(r["unrankable"] or [])
            continue
        for s in r["scores"]:
            scored[s["id"]] = {"r_i": s["r_i"], "r_i_sibling": s["r_i_sibling"]}
        failed.update(r["unrankable"] or [])
    return scored, failed


def reward_table(
    solutions: pl.DataFrame,
    instructions: pl.DataFrame,
    rankings: pl.DataFrame,
    labels: pl.DataFrame,
    params: ScoringParams,
) -> pl.DataFrame:
    """`Reward`, one row per solution."""
    require_columns(solutions, ["id", "instruction_id", "kind"], "compute_rewards solutions")
    require_columns(instructions, ["id", "round"], "compute_rewards instructions")
    rounds = dict(instructions.unique("id", keep="first").select("id", "round").iter_rows())
    scored, failed = instruction_rewards(rankings)
    steps = step_score_values(labels, params.step_score)
    rows = []
    for sid, iid, kind in solutions.select("id", "instruction_id", "kind").iter_rows():
        if iid not in rounds:
            raise ValueError(f"solution {sid!r}: instruction {iid!r} is not in instructions")
        rnd = rounds[iid]
        r_i = r_i_sibling = None
        r_i_note = r_a_note = None
        if iid in scored:
            r_i, r_i_sibling = scored[iid]["r_i"], scored[iid]["r_i_sibling"]
        elif rnd == 0:
            r_i_note = "seed: no parent to rank against"
        elif iid in failed:
            r_i_note = "ranking failed"
        else:
            r_i_note = "parent not sampled for ranking"
        if sid in steps:
            r_a = aggregate_steps(steps[sid], params.aggregation)
            if r_a is None:
                r_a_note = "a step label is missing"
        else:
            r_a = None
            r_a_note = "not selected for step labels"
        rows.append(
            {
                "instruction_id": iid,
                "solution_id": sid,
                "round": rnd,
                "kind": kind,
                "r_i": r_i,
                "r_i_sibling": r_i_sibling,
                "r_a": r_a,
                "r": r_i * r_a if r_i is not None and r_a is not None else None,
                "r_i_note": r_i_note,
                "r_a_note": r_a_note,
            }
        )
    return Reward.frame(rows)


@stage(name="compute_rewards", outputs={"rewards": Reward})
def compute_rewards(
    ctx: StageContext,
    solutions: pl.DataFrame,
    instructions: pl.DataFrame,
    instruction_rankings: pl.DataFrame,
    step_labels: pl.DataFrame,
    params: ScoringParams,
) -> StageOutput:
    """r = rI · rA per solution, with rI from the ranking and rA from the step labels."""
    frame = reward_table(solutions, instructions, instruction_rankings, step_labels, params)
    stats = {
        "rows": frame.height,
        "r": int(frame["r"].is_not_null().sum()),
        "r_i": int(frame["r_i"].is_not_null().sum()),
        "r_a": int(frame["r_a"].is_not_null().sum()),
        "null_r_i": dict(frame["r_i_note"].drop_nulls().value_counts().iter_rows()),
        "null_r_a": dict(frame["r_a_note"].drop_nulls().value_counts().iter_rows()),
        "mean_r": frame["r"].mean(),
    }
    return StageOutput({"rewards": frame}, stats)
