"""Which solutions get step labels, their steps, and the answer a step must lead to (the
`segment_solutions` stage).

One row per selected solution (`SegmentedSolution`), so that the labelling stages can be sharded
by solution and a solution's steps never straddle two shards. Rows are sorted by (round,
solution id): a new round's solutions land in new shards and the earlier shards stay cached.

- CoT solutions (`cot`, and `pot_fallback_cot`, whose text is a CoT) get `steps` from
  `tasks.rewards.steps.segment_steps`. Monte Carlo rollouts dominate the cost of labelling, so
  at most `max_solutions_per_round` of them per round are selected, by a seeded draw;
- PoT solutions are not segmented: their label is the outcome of running the program
  (`tasks.rewards.consensus`), which costs no engine call, so all of them are kept;
- `target` is the answer a correct solution reaches: the seed's reference answer for seeds
  (`target_source = "reference"`), the verified majority answer for evolved instructions
  (`"majority"`), null for an unverified instruction (Monte Carlo skips those and counts them).

Solutions that are not selected are counted in the stats by reason: `no_text` (the engine
failed), `too_many_steps` (over `max_steps`), `over_cap` (the per-round cap).
"""

from __future__ import annotations

from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from tasks.frames import require_columns
from tasks.rewards.judging import unit_draw
from tasks.rewards.records import SegmentedSolution
from tasks.rewards.steps import segment_steps
from tasks.stage import StageContext, StageOutput, stage


class StepParams(BaseModel):
    """Which solutions get step labels (the Monte Carlo cost scales with them)."""

    model_config = ConfigDict(extra="forbid")

    max_solutions_per_round: int | None = Field(
        None, ge=0, description="CoT solutions step-labelled per round, seeded draw (None: all)"
    )
    max_steps: int = Field(40, ge=1, description="CoT solutions with more steps are skipped")
    seed: int = 0


def segment_solutions_frame(
    solutions: pl.DataFrame,
    answers: pl.DataFrame,
    instructions: pl.DataFrame,
    seeds: pl.DataFrame | None,
    params: StepParams,
) -> tuple[pl.DataFrame, dict[str, int]]:
    """(segmented solutions, counts of the solutions left out by reason)."""
    require_columns(
        solutions,
        ["id", "instruction_id", "kind", "text", "program", "program_error", "extracted_answer"],
        "segment solutions",
    )
    require_columns(answers, ["instruction_id", "answer", "verified"], "segment answers")
    require_columns(instructions, ["id", "round", "text"], "segment instructions")
    problems = instructions.unique("id", keep="first").select(
        pl.col("id").alias("instruction_id"), "round", pl.col("text").alias("problem")
    )
    missing = solutions.join(problems, on="instruction_id", how="anti")
    if missing.height:
        raise ValueError(
            f"solution {missing['id'][0]!r}: instruction {missing['instruction_id'][0]!r} "
            "is not in instructions"
        )
    references: dict[str, str] = {}
    if seeds is not None and seeds.height:
        require_columns(seeds, ["id", "answer"], "segment seeds")
        references = {i: a for i, a in zip(seeds["id"], seeds["answer"], strict=True) if a}
    majority = {
        i: a
        for i, a, ok in zip(
            answers["instruction_id"], answers["answer"], answers["verified"], strict=True
        )
        if ok and a is not None
    }
    frame = solutions.join(problems, on="instruction_id", how="left")
    counts = {"no_text": 0, "too_many_steps": 0, "over_cap": 0}
    cot_rows: list[dict[str, Any]] = []
    pot_rows: list[dict[str, Any]] = []
    for r in frame.iter_rows(named=True):
        if r["text"] is None and not (r["kind"] == "pot" and r["program"]):
            counts["no_text"] += 1
            continue
        iid = r["instruction_id"]
        if iid in references:
            target, source = references[iid], "reference"
        elif iid in majority:
            target, source = majority[iid], "majority"
        else:
            target, source = None, None
        row = {
            "solution_id": r["id"],
            "instruction_id": iid,
            "round": r["round"],
            "kind": r["kind"],
            "problem": r["problem"],
            "text": r["text"],
            "steps": None,
            "n_steps": None,
            "extracted_answer": r["extracted_answer"],
            "program": r["program"],
            "program_error": r["program_error"],
            "target": target,
            "target_source": source,
        }
        if r["kind"] == "pot":
            pot_rows.append(row)
            continue
        steps = segment_steps(r["text"] or "")
        if not steps:
            counts["no_text"] += 1
            continue
        if len(steps) > params.max_steps:
            counts["too_many_steps"] += 1
            continue
        row |= {"steps": steps, "n_steps": len(steps)}
        cot_rows.append(row)
    if params.max_solutions_per_round is not None:
        kept = []
        by_round: dict[int, list[dict[str, Any]]] = {}
        for row in cot_rows:
            by_round.setdefault(row["round"], []).append(row)
        for rnd, rows in by_round.items():
            rows.sort(key=lambda x: unit_draw("step-solutions", params.seed, rnd, x["solution_id"]))
            kept.extend(rows[: params.max_solutions_per_round])
            counts["over_cap"] += max(0, len(rows) - params.max_solutions_per_round)
        cot_rows = kept
    out = SegmentedSolution.frame(cot_rows + pot_rows, orient="row")
    return out.sort("round", "solution_id"), counts


@stage(name="segment_solutions", outputs={"segmented_solutions": SegmentedSolution})
def segment_solutions(
    ctx: StageContext,
    solutions: pl.DataFrame,
    answers: pl.DataFrame,
    instructions: pl.DataFrame,
    seeds: pl.DataFrame | None,
    params: StepParams,
) -> StageOutput:
    """Select the solutions to label (capped per round), split CoT ones into steps, attach the
    answer to reach (seed reference or verified majority)."""
    frame, left_out = segment_solutions_frame(solutions, answers, instructions, seeds, params)
    cot = frame.filter(pl.col("kind") != "pot")
    stats = {
        "solutions": solutions.height,
        "selected": frame.height,
        "cot": cot.height,
        "pot": frame.height - cot.height,
        "steps": int(cot["n_steps"].sum() or 0),
        "without_target": int(frame["target"].is_null().sum()),
        "left_out": left_out,
    }
    assert solutions.height == frame.height + sum(left_out.values()), "segment lost solutions"
    return StageOutput({"segmented_solutions": frame}, stats)
