"""Step labels by consensus of the judge and Monte Carlo (the `label_steps` stage).

Qwen2.5-Math-PRM found that Monte Carlo estimates and LLM-judge labels are each noisy alone and
that keeping only the steps where they agree makes better PRM data. `step_labels` holds, per
step of each labelled CoT solution, the judge's label (`tasks.rewards.step_judge`), Math-Shepherd's
soft and hard labels (`tasks.rewards.monte_carlo`) and `consensus`: the label where the judge
and the hard Monte Carlo label are both known and agree, null where they disagree or either is
missing. Disagreements are counted per round in the stage stats.

PoT solutions have no steps to judge: each gets one row with `label_source = "execution"`,
`step_index = 0`, the program as `step_text`, null judge and Monte Carlo labels, and as
`consensus` its outcome: true when the program ran and its printed answer is equivalent to the
target, false when it failed, printed nothing usable or printed another answer, null when the
instruction has no verified answer or the checker could not judge. CoT rows have
`label_source = "steps"`.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from infra.verifier import VerifierPool
from tasks.frames import require_columns
from tasks.rewards.records import StepLabel
from tasks.rewards.step_judge import judge_labels
from tasks.solutions.answers import check_equivalence
from tasks.stage import StageContext, StageOutput, stage


def pot_outcomes(
    pot: pl.DataFrame, pool: VerifierPool | None = None
) -> list[tuple[bool | None, str | None]]:
    """(outcome, note) per PoT row: ran and printed an answer equivalent to the target."""
    out: list[tuple[bool | None, str | None]] = []
    checks: list[int] = []
    for i, r in enumerate(pot.iter_rows(named=True)):
        if r["target"] is None:
            out.append((None, "no verified answer for the instruction"))
        elif r["program"] is None or r["program_error"] is not None:
            out.append((False, f"program did not run: {r['program_error'] or 'no program'}"))
        elif r["extracted_answer"] is None:
            out.append((False, "program printed no answer"))
        else:
            out.append((None, None))
            checks.append(i)
    rows = pot.to_dicts()
    verdicts = (
        check_equivalence(
            [rows[i]["extracted_answer"] for i in checks], [rows[i]["target"] for i in checks], pool
        )
        if checks
        else []
    )
    for i, verdict in zip(checks, verdicts, strict=True):
        out[i] = (verdict, None if verdict is not None else "checker could not judge")
    return out


def consensus_labels(
    segmented: pl.DataFrame,
    judgments: pl.DataFrame,
    rollouts: pl.DataFrame,
    pool: VerifierPool | None = None,
) -> pl.DataFrame:
    """`StepLabel`: one row per CoT step and one per PoT solution."""
    require_columns(
        segmented,
        ["solution_id", "instruction_id", "round", "kind", "steps", "target", "program"],
        "label_steps segmented_solutions",
    )
    require_columns(judgments, ["solution_id", "judged", "first_error"], "label_steps judgments")
    require_columns(
        rollouts, ["solution_id", "step_index", "mc_soft", "mc_hard"], "label_steps rollouts"
    )
    judged = {r["solution_id"]: r for r in judgments.iter_rows(named=True)}
    mc = {(r["solution_id"], r["step_index"]): r for r in rollouts.iter_rows(named=True)}
    rows: list[dict[str, Any]] = []
    cot = segmented.filter(pl.col("kind") != "pot")
    for r in cot.iter_rows(named=True):
        sid, steps = r["solution_id"], r["steps"]
        if sid not in judged:
            raise ValueError(f"solution {sid!r} has no row in step_judgments")
        j = judged[sid]
        labels = judge_labels(j["first_error"], len(steps), bool(j["judged"]))
        for k, (text, judge) in enumerate(zip(steps, labels, strict=True)):
            if (sid, k) not in mc:
                raise ValueError(f"solution {sid!r} step {k} has no row in step_rollouts")
            m = mc[(sid, k)]
            hard = m["mc_hard"]
            agree = judge is not None and hard is not None and judge == hard
            note = None
            if judge is not None and hard is not None and not agree:
                note = "judge and monte carlo disagree"
            rows.append(
                {
                    "solution_id": sid,
                    "instruction_id": r["instruction_id"],
                    "round": r["round"],
                    "kind": r["kind"],
                    "label_source": "steps",
                    "step_index": k,
                    "step_text": text,
                    "judge": judge,
                    "mc_soft": m["mc_soft"],
                    "mc_hard": hard,
                    "consensus": judge if agree else None,
                    "note": note,
                }
            )
    pot = segmented.filter(pl.col("kind") == "pot")
    for r, (outcome, note) in zip(pot.iter_rows(named=True), pot_outcomes(pot, pool), strict=True):
        rows.append(
            {
                "solution_id": r["solution_id"],
                "instruction_id": r["instruction_id"],
                "round": r["round"],
                "kind": r["kind"],
                "label_source": "execution",
                "step_index": 0,
                "step_text": r["program"] if r["program"] is not None else r["text"],
                "judge": None,
                "mc_soft": None,
                "mc_hard": None,
                "consensus": outcome,
                "note": note,
            }
        )
    return StepLabel.frame(rows).sort("round", "solution_id", "step_index")


def agreement_by_round(labels: pl.DataFrame) -> dict[str, dict[str, int]]:
    """Per round: steps, steps with both labels, agreements, disagreements, consensus kept."""
    steps = labels.filter(pl.col("label_source") == "steps")
    both = pl.col("judge").is_not_null() & pl.col("mc_hard").is_not_null()
    table = steps.group_by("round").agg(
        pl.len().alias("steps"),
        pl.col("judge").is_not_null().sum().alias("judge_labelled"),
        pl.col("mc_hard").is_not_null().sum().alias("mc_labelled"),
        both.sum().alias("both"),
        (both & (pl.col("judge") == pl.col("mc_hard"))).sum().alias("agree"),
        (both & (pl.col("judge") != pl.col("mc_hard"))).sum().alias("disagree"),
    )
    return {
        str(r["round"]): {k: int(v) for k, v in r.items() if k != "round"}
        for r in table.sort("round").iter_rows(named=True)
    }


@stage(name="label_steps", outputs={"step_labels": StepLabel})
def label_steps(
    ctx: StageContext,
    segmented_solutions: pl.DataFrame,
    step_judgments: pl.DataFrame,
    step_rollouts: pl.DataFrame,
) -> StageOutput:
    """Keep a step label where the judge and Monte Carlo agree; PoT gets its execution outcome."""
    labels = consensus_labels(segmented_solutions, step_judgments, step_rollouts)
    pot = labels.filter(pl.col("label_source") == "execution")
    steps = labels.filter(pl.col("label_source") == "steps")
    stats = {
        "steps": steps.height,
        "consensus": int(steps["consensus"].is_not_null().sum()),
        "disagreements": int((steps["note"] == "judge and monte carlo disagree").sum()),
        "by_round": agreement_by_round(labels),
        "pot_outcomes": {
            "correct": int(pot["consensus"].fill_null(False).sum()),
            "wrong": int((pot["consensus"] == False).sum()),  # noqa: E712 - polars comparison
            "unknown": int(pot["consensus"].is_null().sum()),
        },
    }
    return StageOutput({"step_labels": labels}, stats)
