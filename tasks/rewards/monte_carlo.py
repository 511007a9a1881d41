"""The Monte Carlo labeller of solution steps (the `rollout_steps` stage), after Math-Shepherd.

From the prefix that ends with step k, the engine completes the solution `n` times (template
`step_rollout.txt`, sampled); a completion reaches the target when its final answer is
equivalent to it (`tasks.solutions.answers.check_equivalence`). Step k's labels:

- `mc_soft` = share of the judged completions that reach the target (soft estimation);
- `mc_hard` = whether any does (hard estimation).

The target is the seed's reference answer or the verified majority answer of the instruction
(`tasks.rewards.segment`). Solutions of unverified instructions have no target: their rows are
written with null labels and `source = "skipped"`, and counted.

The last step needs no rollout when the solution states a final answer: the solution itself is
the completion, so its label is whether that answer is equivalent to the target
(`source = "final_answer"`). A completion the checker could not judge (None) or a failed request
does not count in the denominator; with nothing judged the labels are null.
"""

from __future__ import annotations

from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from infra.engines import EngineConfig
from infra.engines.base import ChatRequest, Engine
from infra.verifier import VerifierPool
from tasks.frames import require_columns
from tasks.rewards.judging import stable_int
from tasks.rewards.records import StepRollout
from tasks.sampling import Sampling
from tasks.solutions.answers import check_equivalence, extract_answer
from tasks.stage import Shard, StageContext, StageOutput, stage
from tasks.templates import load_template

TEMPLATE = "step_rollout"


RolloutSampling = Sampling.defaults(
    "RolloutSampling",
    "Sampling of the Monte Carlo rollouts; max_tokens limits a completion.",
    temperature=0.7,
    top_p=0.95,
    max_tokens=512,
)


class MonteCarloParams(BaseModel):
    """Math-Shepherd rollouts from every step prefix."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(8, ge=1, le=64, description="completions per step prefix")
    sampling: RolloutSampling = Field(
        default_factory=RolloutSampling, description="sampling of the rollouts"
    )
    seed: int = 0


def rollout_request(
    problem: str, prefix: str, solution_id: str, step: int, params: MonteCarloParams
) -> ChatRequest:
    template = load_template(TEMPLATE)
    return ChatRequest(
        messages=tuple(template.messages(problem=problem.strip(), prefix=prefix.strip())),
        sampling=params.sampling.engine_params(
            seed=stable_int("rollout", params.seed, solution_id, step, bits=31), n=params.n
        ),
        template_version=template.version,
    )


def monte_carlo_labels(
    segmented: pl.DataFrame,
    engine: Engine,
    params: MonteCarloParams,
    pool: VerifierPool | None = None,
) -> pl.DataFrame:
    """`StepRollout`, one row per step of each segmented CoT solution."""
    require_columns(
        segmented,
        ["solution_id", "kind", "problem", "steps", "extracted_answer", "target"],
        "rollout_steps",
    )
    cot = segmented.filter(pl.col("kind") != "pot")
    rows: list[dict[str, Any]] = []
    requests: list[ChatRequest] = []
    asked: list[tuple[int, str]] = []  # (row index, prefix) per request
    finals: list[tuple[int, str | None]] = []  # (row index, the solution's answer)
    for r in cot.iter_rows(named=True):
        steps, target = r["steps"], r["target"]
        for k in range(len(steps)):
            row = {
                "solution_id": r["solution_id"],
                "step_index": k,
                "source": "skipped",
                "n_rollouts": 0,
                "n_judged": 0,
                "n_correct": 0,
                "mc_soft": None,
                "mc_hard": None,
                "note": None,
                "_target": target,
            }
            rows.append(row)
            if target is None:
                row["note"] = "no verified answer for the instruction"
                continue
            if k == len(steps) - 1 and r["extracted_answer"] is not None:
                row["source"] = "final_answer"
                finals.append((len(rows) - 1, r["extracted_answer"]))
                continue
            row["source"] = "rollouts"
            row["n_rollouts"] = params.n
            prefix = "".join(steps[: k + 1])
            asked.append((len(rows) - 1, prefix))
            requests.append(rollout_request(r["problem"], prefix, r["solution_id"], k, params))
    responses = engine.generate(requests) if requests else []
    if len(responses) != len(requests):
        raise RuntimeError(f"engine returned {len(responses)} responses for {len(requests)}")

    predictions: list[str | None] = []
    targets: list[str | None] = []
    owners: list[int] = []
    for (index, prefix), response in zip(asked, responses, strict=True):
        if not response.ok:
            rows[index]["note"] = f"engine error: {response.error}"
            continue
        for completion in response.completions:
            predictions.append(extract_answer(prefix + "\n" + completion.text))
            targets.append(rows[index]["_target"])
            owners.append(index)
    for index, answer in finals:
        predictions.append(answer)
        targets.append(rows[index]["_target"])
        owners.append(index)
    verdicts = check_equivalence(predictions, targets, pool) if predictions else []
    for index, verdict in zip(owners, verdicts, strict=True):
        if verdict is None:
            continue
        rows[index]["n_judged"] += 1
        rows[index]["n_correct"] += int(verdict)
    for row in rows:
        if row["n_judged"]:
            row["mc_soft"] = row["n_correct"] / row["n_judged"]
            row["mc_hard"] = row["n_correct"] > 0
        elif row["source"] != "skipped" and row["note"] is None:
            row["note"] = "no completion could be judged"
    return pl.DataFrame(
        [{k: v for k, v in row.items() if k != "_target"} for row in rows],
        schema=StepRollout.schema(),
    )


@stage(
    name="rollout_steps",
    outputs={"step_rollouts": StepRollout},
    shard=Shard("segmented_solutions", key="solution_id"),
)
def rollout_steps(
    ctx: StageContext,
    segmented_solutions: pl.DataFrame,
    engine: EngineConfig,
    params: MonteCarloParams,
) -> StageOutput:
    """n completions from every step prefix; a step's label is the share that reach the answer."""
    frame = monte_carlo_labels(segmented_solutions, ctx.engine(engine), params)
    cot = segmented_solutions.filter(pl.col("kind") != "pot")
    stats = {
        "solutions": cot.height,
        "skipped_unverified": int(cot["target"].is_null().sum()),
        "steps": frame.height,
        "rollouts": int(frame["n_rollouts"].sum() or 0),
        "labelled": int(frame["mc_hard"].is_not_null().sum()),
        "unlabelled": int(frame["mc_hard"].is_null().sum()),
    }
    return StageOutput({"step_rollouts": frame}, stats)
