"""Hybrid CoT/PoT solutions (MAmmoTH) and the self-consistency vote (the `solve` stage).

`write_solutions` draws `k_cot` chain-of-thought samples and `k_pot` program-of-thought programs
(template `pot`, "Let's write a program.") per instruction. Programs run only through the
sandbox (`run_many`). Hybrid decoding: a PoT slot whose program is missing, fails, or prints
nothing usable falls back to a fresh CoT sample; that row has `kind = "pot_fallback_cot"` and
still records the failed program and why it failed. Every sample slot gets exactly one row:
rows = instructions x (k_cot + k_pot). The stage then votes (`tasks.solutions.voting`): the
majority answer of each instruction, its agreement and difficulty, checked against the seed's
reference where there is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from infra.engines import EngineConfig
from infra.engines.base import ChatRequest, ChatResponse, Engine, SamplingParams
from infra.sandbox import SandboxSettings
from tasks.frames import require_columns
from tasks.sampling import Sampling
from tasks.solutions.answers import extract_answer, extract_program_answer
from tasks.solutions.programs import ProgramRunner, extract_program, program_failure
from tasks.solutions.records import Answer, SampledSolution, Solution
from tasks.solutions.voting import vote_answers
from tasks.stage import Shard, StageContext, StageOutput, stage
from tasks.templates import Template, load_template

SolutionSampling = Sampling.defaults(
    "SolutionSampling",
    "Sampling of the CoT and PoT solutions; max_tokens limits a CoT solution.",
    temperature=0.7,
    top_p=0.95,
    max_tokens=384,
)


class SolutionParams(BaseModel):
    """Chain-of-thought and program-of-thought solutions, and the self-consistency vote."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="write and verify solutions")
    k_cot: int = Field(2, ge=0, le=64, description="chain-of-thought samples per instruction")
    k_pot: int = Field(2, ge=0, le=64, description="program-of-thought samples per instruction")
    sampling: SolutionSampling = Field(
        default_factory=SolutionSampling,
        description="sampling of the solutions; max_tokens limits a CoT solution",
    )
    pot_max_tokens: int = Field(384, ge=1, description="token limit of a program")
    fallback: bool = Field(
        True,
        description="MAmmoTH's hybrid decoding: a failed program's slot gets a CoT sample",
    )
    agreement_threshold: float = Field(
        0.5,
        ge=0,
        le=1,
        description="majority agreement below which an instruction is unverified (kept out "
        "of training sets)",
    )
    seed: int = Field(0, description="sampling seed")
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings, description="program limits")

    def fingerprint(self) -> dict[str, Any]:
        """`enabled` decides whether the stage runs, not what it writes."""
        data = self.model_dump(mode="json", exclude={"enabled", "sandbox"})
        return {**data, "sandbox": self.sandbox.fingerprint()}

    def cot_sampling(self) -> SamplingParams:
        return self.sampling.engine_params(seed=self.seed)

    def pot_sampling(self) -> SamplingParams:
        return replace(self.cot_sampling(), max_tokens=self.pot_max_tokens)


COT_TEMPLATE = "cot_fewshot"


POT_TEMPLATE = "pot"


FALLBACK_SEED_OFFSET = 100_003


# The defaults of `write_solutions` are those of the stage (`SolutionParams`).
DEFAULT_COT_SAMPLING = SolutionParams().cot_sampling()


DEFAULT_POT_SAMPLING = SolutionParams().pot_sampling()


def solution_id(instruction_id: str, sample: int) -> str:
    return f"{instruction_id}:{sample}"


def chat_requests(
    template: Template, questions: Sequence[str], sampling: SamplingParams
) -> list[ChatRequest]:
    return [
        ChatRequest(
            messages=tuple(template.messages(instruction=q)),
            sampling=sampling,
            template_version=template.version,
        )
        for q in questions
    ]


def _completion_fields(response: ChatResponse, k: int) -> list[tuple[str | None, str]]:
    """(text, finish_reason) for k sample slots; a failed or short response fills with errors."""
    out: list[tuple[str | None, str]] = [(c.text, c.finish_reason) for c in response.completions]
    out = out[:k]
    return out + [(None, "error")] * (k - len(out))


def write_solutions(
    instructions: pl.DataFrame,
    engine: Engine,
    sandbox: ProgramRunner,
    k_cot: int = 4,
    k_pot: int = 4,
    cot_sampling: SamplingParams = DEFAULT_COT_SAMPLING,
    pot_sampling: SamplingParams = DEFAULT_POT_SAMPLING,
    fallback: bool = True,
) -> pl.DataFrame:
    """k_cot CoT samples and k_pot PoT programs per instruction, one row per sample slot.

    Columns: `SampledSolution`. PoT rows carry the program, its stdout and, when it gave no
    answer, `program_error`. With `fallback`, a failed PoT slot is re-answered by a CoT sample
    (`kind = "pot_fallback_cot"`, `text` is the CoT, the failed program stays for audit).
    """
    require_columns(instructions, ["id", "text"], "write_solutions instructions")
    if k_cot < 0 or k_pot < 0 or k_cot + k_pot < 1:
        raise ValueError(f"need k_cot, k_pot >= 0 and k_cot + k_pot >= 1, got {k_cot}, {k_pot}")
    cot_t, pot_t = load_template(COT_TEMPLATE), load_template(POT_TEMPLATE)
    ids = instructions["id"].to_list()
    questions = instructions["text"].to_list()
    model = engine.identity
    rows: list[dict[str, Any]] = []

    # CoT and PoT requests go to the engine as one batch: batched decoding is what makes
    # the engines fast, and the two kinds are independent.
    cot_requests = chat_requests(cot_t, questions, replace(cot_sampling, n=k_cot)) if k_cot else []
    pot_requests = chat_requests(pot_t, questions, replace(pot_sampling, n=k_pot)) if k_pot else []
    all_responses = engine.generate(cot_requests + pot_requests)
    cot_responses, pot_responses = (
        all_responses[: len(cot_requests)],
        all_responses[len(cot_requests) :],
    )

    if k_cot:
        for iid, response in zip(ids, cot_responses, strict=True):
            for s, (text, finish) in enumerate(_completion_fields(response, k_cot)):
                rows.append(
                    {
                        "id": solution_id(iid, s),
                        "instruction_id": iid,
                        "kind": "cot",
                        "sample": s,
                        "text": text,
                        "program": None,
                        "program_stdout": None,
                        "program_error": None,
                        "extracted_answer": extract_answer(text),
                        "finish_reason": finish,
                        "model": model,
                        "template_version": cot_t.version,
                    }
                )

    if k_pot:
        pot_rows: list[dict[str, Any]] = []
        for iid, response in zip(ids, pot_responses, strict=True):
            for s, (text, finish) in enumerate(_completion_fields(response, k_pot)):
                program = extract_program(text)
                pot_rows.append(
                    {
                        "id": solution_id(iid, k_cot + s),
                        "instruction_id": iid,
                        "kind": "pot",
                        "sample": k_cot + s,
                        "text": text,
                        "program": program,
                        "program_stdout": None,
                        "program_error": (
                            "engine error"
                            if text is None
                            else None
                            if program
                            else "no program in completion"
                        ),
                        "extracted_answer": None,
                        "finish_reason": finish,
                        "model": model,
                        "template_version": pot_t.version,
                    }
                )
        to_run = [r for r in pot_rows if r["program"]]
        results = sandbox.run_many([r["program"] for r in to_run]) if to_run else []
        if len(results) != len(to_run):
            raise RuntimeError(
                f"sandbox returned {len(results)} results for {len(to_run)} programs"
            )
        for row, result in zip(to_run, results, strict=True):
            row["program_stdout"] = result.stdout
            row["program_error"] = program_failure(result)
            if row["program_error"] is None:
                row["extracted_answer"] = extract_program_answer(result.stdout)
        if fallback:
            _fallback_to_cot(
                pot_rows, engine, cot_t, cot_sampling, dict(zip(ids, questions, strict=True))
            )
        rows.extend(pot_rows)

    order = {iid: i for i, iid in enumerate(ids)}
    rows.sort(key=lambda r: (order[r["instruction_id"]], r["sample"]))
    return SampledSolution.frame(rows)


def _fallback_to_cot(
    pot_rows: list[dict[str, Any]],
    engine: Engine,
    cot_t: Template,
    sampling: SamplingParams,
    questions: dict[str, str],
) -> None:
    """Replace each failed PoT slot's answer by a fresh CoT sample (one request per instruction)."""
    failed: dict[str, list[dict[str, Any]]] = {}
    for row in pot_rows:
        if row["program_error"] is not None:
            failed.setdefault(row["instruction_id"], []).append(row)
    if not failed:
        return
    iids = list(failed)
    requests = [
        ChatRequest(
            messages=tuple(cot_t.messages(instruction=questions[iid])),
            sampling=replace(
                sampling, n=len(failed[iid]), seed=sampling.seed + FALLBACK_SEED_OFFSET
            ),
            template_version=cot_t.version,
        )
        for iid in iids
    ]
    for iid, response in zip(iids, engine.generate(requests), strict=True):
        slots = failed[iid]
        for row, (text, finish) in zip(
            slots, _completion_fields(response, len(slots)), strict=True
        ):
            row.update(
                kind="pot_fallback_cot",
                text=text,
                extracted_answer=extract_answer(text),
                finish_reason=finish,
                template_version=cot_t.version,
            )


@stage(
    name="solve",
    outputs={"solutions": Solution, "answers": Answer},
    # Shards by content, not by round: a round's few new instructions would make batches of a
    # few rows (the demo's eight rounds were eight sequential batches of 1-8 rows); new rows
    # still change only the shard they land in.
    shard=Shard("instructions", lookups={"seeds": ("id", "id")}),
)
def solve_batch(
    ctx: StageContext,
    instructions: pl.DataFrame,
    seeds: pl.DataFrame,
    engine: EngineConfig,
    params: SolutionParams,
) -> StageOutput:
    """k CoT + k PoT solutions per instruction (programs in the sandbox), majority vote.

    Instructions of every round are solved; a shard solved before (same rows) is a cache hit,
    and a recomputed shard sends only its new requests (the request cache). Seeds carry their
    reference answer."""
    references = dict(zip(seeds["id"], seeds["answer"], strict=True))
    cot, pot = params.cot_sampling(), params.pot_sampling()
    with params.sandbox.open() as sandbox:
        samples = write_solutions(
            instructions,
            ctx.engine(engine),
            sandbox,
            params.k_cot,
            params.k_pot,
            cot,
            pot,
            fallback=params.fallback,
        )
    answers, solutions = vote_answers(samples, references or None, params.agreement_threshold)
    rounds = instructions.select(pl.col("id").alias("instruction_id"), pl.col("round"))
    answers = answers.join(rounds, on="instruction_id", how="left")
    stats = {
        "instructions": instructions.height,
        "samples": solutions.height,
        "verified": int(answers["verified"].sum()),
        "reference_match": int(answers["reference_match"].fill_null(False).sum()),
    }
    return StageOutput({"solutions": solutions, "answers": answers}, stats)
