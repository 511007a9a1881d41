"""The judge labeller of solution steps (the `judge_steps` stage), ProcessBench's protocol.

The judge reads the problem and the solution's steps, each in `<step_i>` tags indexed from 0
(template `judge_steps.txt`), and returns `{"reason": ..., "first_error_step": N}` under a
JSON schema that bounds N to -1 .. n_steps - 1 (-1: every step is correct). Step labels follow
from N: steps before it are correct, step N is incorrect, later steps are unlabelled (null),
because after an error the judge's view of a step is no longer about that step alone.

A failed request or a reply that is not the requested JSON leaves every label of that solution
null (`judged = false`, the reason in `error`): could not judge, never "correct".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from infra.engines import EngineConfig
from infra.engines.base import ChatRequest, Engine
from tasks.frames import require_columns
from tasks.rewards.judging import JudgeError, json_object, reply_text
from tasks.rewards.records import StepJudgment
from tasks.sampling import Sampling
from tasks.stage import Shard, StageContext, StageOutput, stage
from tasks.templates import load_template

TEMPLATE = "judge_steps"


StepJudgeSampling = Sampling.defaults(
    "StepJudgeSampling", "Sampling of the step judge (greedy).", max_tokens=512
)


class StepJudgeParams(BaseModel):
    """The step judge (first incorrect step, ProcessBench's protocol)."""

    model_config = ConfigDict(extra="forbid")

    reason_max_chars: int = Field(
        200, ge=8, le=4000, description="length cap of the judge's reason (decoded, so it costs)"
    )
    sampling: StepJudgeSampling = Field(
        default_factory=StepJudgeSampling, description="sampling of the judge's JSON reply"
    )


def first_error_schema(n_steps: int, reason_max_chars: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "maxLength": reason_max_chars},
            "first_error_step": {"type": "integer", "minimum": -1, "maximum": n_steps - 1},
        },
        "required": ["reason", "first_error_step"],
        "additionalProperties": False,
    }


def tagged_steps(steps: Sequence[str]) -> str:
    """The steps as ProcessBench shows them: `<step_0>\\n...\\n</step_0>` blocks."""
    return "\n\n".join(f"<step_{i}>\n{s.strip()}\n</step_{i}>" for i, s in enumerate(steps))


def step_judge_requests(
    problems: Sequence[str], steps: Sequence[Sequence[str]], params: StepJudgeParams
) -> list[ChatRequest]:
    template = load_template(TEMPLATE)
    return [
        ChatRequest(
            messages=tuple(template.messages(problem=p.strip(), steps=tagged_steps(s))),
            sampling=params.sampling.engine_params(),
            json_schema=first_error_schema(len(s), params.reason_max_chars),
            template_version=template.version,
        )
        for p, s in zip(problems, steps, strict=True)
    ]


def parse_first_error(reply: str, n_steps: int) -> tuple[int | None, str | None]:
    """(first incorrect step or None for "all correct", reason); JudgeError otherwise."""
    obj = {str(k).strip().lower(): v for k, v in json_object(reply).items()}
    value = obj.get("first_error_step")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise JudgeError(f"first_error_step must be an integer, got {value!r}")
    if not -1 <= value < n_steps:
        raise JudgeError(f"first_error_step {value} outside -1..{n_steps - 1}")
    reason = obj.get("reason")
    return (None if value == -1 else value), (str(reason).strip() if reason is not None else None)


def judge_labels(first_error: int | None, n_steps: int, judged: bool) -> list[bool | None]:
    """Per-step labels: correct before the first error, incorrect at it, null after it."""
    if not judged:
        return [None] * n_steps
    if first_error is None:
        return [True] * n_steps
    return [True] * first_error + [False] + [None] * (n_steps - first_error - 1)


def judge_first_errors(
    problems: Sequence[str],
    steps: Sequence[Sequence[str]],
    engine: Engine,
    params: StepJudgeParams,
) -> list[dict[str, Any]]:
    """One judgment per solution: {judged, first_error, reason, error}."""
    requests = step_judge_requests(problems, steps, params)
    responses = engine.generate(requests) if requests else []
    if len(responses) != len(requests):
        raise RuntimeError(f"engine returned {len(responses)} responses for {len(requests)}")
    out = []
    for s, response in zip(steps, responses, strict=True):
        try:
            first, reason = parse_first_error(reply_text(response), len(s))
            out.append({"judged": True, "first_error": first, "reason": reason, "error": None})
        except JudgeError as exc:
            out.append({"judged": False, "first_error": None, "reason": None, "error": str(exc)})
    return out


def judge_solution_steps(
    segmented: pl.DataFrame, engine: Engine, params: StepJudgeParams
) -> pl.DataFrame:
    """`StepJudgment`, one row per segmented CoT solution (PoT rows are not judged)."""
    require_columns(segmented, ["solution_id", "kind", "problem", "steps"], "judge_steps")
    cot = segmented.filter(pl.col("kind") != "pot")
    steps = cot["steps"].to_list()
    judgments = judge_first_errors(cot["problem"].to_list(), steps, engine, params)
    version = load_template(TEMPLATE).version
    rows = [
        {
            "solution_id": sid,
            "n_steps": len(s),
            **j,
            "judge_model": engine.identity,
            "template_version": version,
        }
        for sid, s, j in zip(cot["solution_id"], steps, judgments, strict=True)
    ]
    return StepJudgment.frame(rows)


@stage(
    name="judge_steps",
    outputs={"step_judgments": StepJudgment},
    shard=Shard("segmented_solutions", key="solution_id"),
)
def judge_steps(
    ctx: StageContext,
    segmented_solutions: pl.DataFrame,
    judge: EngineConfig,
    params: StepJudgeParams,
) -> StageOutput:
    """The judge names each CoT solution's first incorrect step (or none)."""
    frame = judge_solution_steps(segmented_solutions, ctx.engine(judge), params)
    stats = {
        "solutions": frame.height,
        "judged": int(frame["judged"].sum()),
        "failed": int((~frame["judged"]).sum()),
        "with_error": int(frame["first_error"].is_not_null().sum()),
    }
    return StageOutput({"step_judgments": frame}, stats)
