"""WizardMath step 1: SFT answers. Each seed is re-solved few-shot, step by step, ending in
`The answer is: X` (template `cot_fewshot`), and the first sample whose answer is equivalent to
the seed's reference is kept.

Up to `samples_per_seed` samples are drawn, one round at a time for the seeds still unsolved
(each round a new sampling seed, so the request cache never serves the same sample twice).
Every seed gets one row; an unsolved seed has a null solution and a `reason` saying why
(wrong_answer, no_answer, unjudged, engine_error, no_reference).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from infra.engines import EngineConfig
from infra.engines.base import Engine, SamplingParams
from infra.verifier import VerifierPool
from tasks.frames import require_columns
from tasks.sampling import Sampling
from tasks.solutions.answers import check_equivalence, extract_answer
from tasks.solutions.records import SftAnswer
from tasks.solutions.solve import COT_TEMPLATE, chat_requests
from tasks.stage import Shard, StageContext, StageOutput, stage
from tasks.templates import load_template

SftSampling = Sampling.defaults(
    "SftSampling",
    "Sampling of the SFT answers; max_tokens limits a solution.",
    temperature=0.7,
    max_tokens=384,
)


class SftParams(BaseModel):
    """WizardMath step 1: re-solve the seeds step by step, keep the correct solutions."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="re-solve the seeds")
    samples_per_seed: int = Field(
        2, ge=1, le=64, description="tries per seed until one matches the reference"
    )
    sampling: SftSampling = Field(
        default_factory=SftSampling, description="sampling of the step-by-step solutions"
    )
    seed: int = Field(0, description="sampling seed")

    def fingerprint(self) -> dict[str, Any]:
        """`enabled` decides whether the stage runs, not what it writes."""
        return self.model_dump(mode="json", exclude={"enabled"})


def sft_answers(
    seeds: pl.DataFrame,
    engine: Engine,
    samples_per_seed: int = 4,
    sampling: SamplingParams | None = None,
    pool: VerifierPool | None = None,
) -> pl.DataFrame:
    """Re-solve each seed step by step; keep the first sample whose answer matches the reference.

    One row per seed (`SftAnswer`): `solution` is the kept sample (null when none matched),
    `predicted` the kept or last extracted answer, `tries` the samples drawn for that seed.
    `sampling` defaults to the stage's (`SftParams`).
    """
    sampling = sampling or SftParams().sampling.engine_params()
    require_columns(seeds, ["id", "question", "answer"], "sft_answers seeds")
    if samples_per_seed < 1:
        raise ValueError(f"samples_per_seed must be >= 1, got {samples_per_seed}")
    template = load_template(COT_TEMPLATE)
    rows = seeds.select("id", "question", "answer").to_dicts()
    state: list[dict[str, Any]] = [
        {
            "seed_id": r["id"],
            "solution": None,
            "predicted": None,
            "correct": False,
            "tries": 0,
            "reason": "no_reference" if not (r["answer"] or "").strip() else None,
            "model": engine.identity,
            "template_version": template.version,
        }
        for r in rows
    ]
    open_rows = [i for i, s in enumerate(state) if s["reason"] is None]
    for attempt in range(samples_per_seed):
        if not open_rows:
            break
        params = replace(sampling, n=1, seed=sampling.seed + attempt)
        responses = engine.generate(
            chat_requests(template, [rows[i]["question"] for i in open_rows], params)
        )
        predicted = []
        for i, response in zip(open_rows, responses, strict=True):
            state[i]["tries"] += 1
            if not response.ok or not response.completions:
                state[i]["reason"] = "engine_error"
                predicted.append(None)
                continue
            answer = extract_answer(response.text)
            state[i]["predicted"] = answer
            state[i]["reason"] = "no_answer" if answer is None else None
            predicted.append(answer)
        verdicts = check_equivalence(predicted, [rows[i]["answer"] for i in open_rows], pool)
        still_open = []
        for i, response, answer, verdict in zip(
            open_rows, responses, predicted, verdicts, strict=True
        ):
            if verdict is True:
                state[i].update(solution=response.text, correct=True, reason="correct")
                continue
            if answer is not None:
                state[i]["reason"] = "wrong_answer" if verdict is False else "unjudged"
            still_open.append(i)
        open_rows = still_open
    return SftAnswer.frame(state)


@stage(name="sft_answers", outputs={"sft_answers": SftAnswer}, shard=Shard("seeds"))
def write_sft_answers(
    ctx: StageContext, seeds: pl.DataFrame, engine: EngineConfig, params: SftParams
) -> StageOutput:
    """Re-solve seeds few-shot step by step; keep solutions whose answer matches the reference."""
    frame = sft_answers(
        seeds,
        ctx.engine(engine),
        params.samples_per_seed,
        params.sampling.engine_params(seed=params.seed),
    )
    return StageOutput(
        {"sft_answers": frame}, {"seeds": frame.height, "correct": int(frame["correct"].sum())}
    )
