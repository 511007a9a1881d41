"""Decoding modes and grading: the `eval_requests` plan and the `evaluate` stage.

Modes (WizardMath and MAmmoTH evaluation protocols):

- `cot`: the question in the prompt format with " Let's think step by step." (Alpaca:
  `eval_alpaca_cot`, WizardMath's evaluation prompt, sent raw, without the model's chat
  template, as the SFT checkpoints learnt it; chat: `eval_chat_cot`, the question and
  "Please reason step by step, and put your final answer within \\boxed{}" through the model's
  chat template), greedy; the answer is the last "The answer is: X" / `\\boxed{}` / `#### X`.
- `pot`: MAmmoTH's "Let's write a program." trigger (`eval_*_pot`), greedy; the program runs only
  in the sandbox and its last printed line is the answer. A missing program, an error, a
  timeout or no output is no answer.
- `hybrid`: pot, falling back to the greedy cot answer when the program is missing, fails, times
  out or prints nothing usable (the fallback request is the cot mode's own request, so with both
  modes it comes from the request cache).
- `maj@k`: self-consistency over k sampled cot answers (`tasks.solutions.voting`): answers are
  grouped by math equivalence, the largest group wins and ties go to the group sampled first.

Multiple-choice items (SAT-Math, MMLU-STEM) list their options as "Answer Choices: (A) ... (B) ..."
(MAmmoTH's format); an answer names an option by letter or by the option's text
(`tasks.solutions.answers.choose_options`) and is graded by letter. Open answers are graded by
`check_equivalence`, the factory's own answer checker. A failed engine request leaves the item
unjudged (`correct` null, `error` set); a completion without an answer is wrong.

The plan (`eval_requests`, one row per model x benchmark x item x mode, sorted by model) lets the
`evaluate` stage shard by model: a shard's rows belong to one model, and a model added to a
later run only adds shards.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from infra.engines import EngineConfig
from infra.engines.base import ChatRequest, ChatResponse, Engine, SamplingParams
from infra.sandbox import SandboxSettings
from infra.verifier import VerifierPool
from storage.datasets import DatasetStore
from tasks.evaluation.models import (
    ARTIFACT_IDENTITY,
    FOLDER_IDENTITY,
    ModelFolders,
    ModelTarget,
)
from tasks.evaluation.records import EvalRequest, EvalResult
from tasks.frames import require_columns
from tasks.sampling import Sampling
from tasks.solutions.answers import (
    LETTERS,
    check_equivalence,
    choose_options,
    extract_answer,
    extract_choice,
    extract_program_answer,
)
from tasks.solutions.programs import ProgramRunner, extract_program, program_failure
from tasks.solutions.voting import majority_votes
from tasks.stage import Shard, StageContext, StageOutput, stage
from tasks.templates import Template, load_template

MODE_PATTERN = re.compile(r"^(cot|pot|hybrid|maj@(k|\d+))$")
# Alpaca-trained models may run on into a new "### Instruction"; cut there.
ALPACA_STOPS = ("\n### Instruction", "\n### Response")


MajoritySampling = Sampling.defaults(
    "MajoritySampling",
    "Sampling of maj@k's chains of thought.",
    temperature=0.7,
    top_p=0.95,
    max_tokens=512,
)


class DecodingParams(BaseModel):
    """Token budgets of the greedy modes and the sampling of maj@k."""

    model_config = ConfigDict(extra="forbid")

    cot_max_tokens: int = Field(512, ge=16, description="new tokens of a greedy chain of thought")
    pot_max_tokens: int = Field(512, ge=16, description="new tokens of a greedy program")
    maj_sampling: MajoritySampling = Field(
        default_factory=MajoritySampling,
        description="sampling of maj@k's chains of thought (its own token limit)",
    )
    seed: int = Field(0, description="maj@k sampling seed")

    @model_validator(mode="after")
    def _sampled(self) -> DecodingParams:
        if self.maj_sampling.temperature <= 0:
            raise ValueError("maj_sampling.temperature must be > 0 (maj@k votes over samples)")
        return self


def parse_mode(mode: str, k: int) -> tuple[str, int]:
    """`cot` → ("cot", 1); `maj@k` → ("maj", k); `maj@16` → ("maj", 16)."""
    m = MODE_PATTERN.match(mode)
    if not m:
        raise ValueError(f"unknown mode {mode!r} (cot, pot, hybrid, maj@k or maj@<n>)")
    if not mode.startswith("maj@"):
        return mode, 1
    samples = k if m.group(2) == "k" else int(m.group(2))
    if samples < 1:
        raise ValueError(f"mode {mode!r}: maj@ needs at least one sample")
    return "maj", samples


def mode_label(mode: str, k: int) -> str:
    kind, samples = parse_mode(mode, k)
    return f"maj@{samples}" if kind == "maj" else kind


# ---------------------------------------------------------------------------------------------
# The plan


def plan_requests(
    items: pl.DataFrame, models: list[ModelTarget], modes: list[str], k: int
) -> pl.DataFrame:
    """One row per model x item x mode, grouped by model (the `evaluate` shards split there)."""
    require_columns(items, ["benchmark", "id", "question", "answer", "choices"], "eval items")
    labels = [mode_label(m, k) for m in modes]
    if len(set(labels)) != len(labels):
        raise ValueError(f"modes repeat: {modes}")
    rows: list[dict[str, Any]] = []
    item_rows = items.to_dicts()
    for model in models:
        for item in item_rows:
            for mode in modes:
                _, samples = parse_mode(mode, k)
                label = mode_label(mode, k)
                rows.append(
                    {
                        "id": f"{model.label}|{item['benchmark']}|{item['id']}|{label}",
                        "model": model.label,
                        # Never a path: a checkpoint by its ref, a folder by its identity.
                        "model_ref": model.artifact
                        or (model.identity if model.is_folder else model.model),
                        "engine_model": model.planned_model,
                        "model_identity": model.identity,
                        "prompt_format": model.prompt_format,
                        "benchmark": item["benchmark"],
                        "item_id": item["id"],
                        "mode": label,
                        "samples": samples,
                        "question": item["question"],
                        "answer": item["answer"],
                        "choices": item["choices"],
                    }
                )
    return EvalRequest.frame(rows)


@stage(name="eval_requests", outputs={"eval_requests": EvalRequest})
def plan_evaluation(
    eval_items: pl.DataFrame, models: list[ModelTarget], modes: list[str], k: int
) -> StageOutput:
    """Plan the evaluation: one request row per model x benchmark item x decoding mode."""
    plan = plan_requests(eval_items, models, modes, k)
    return StageOutput(
        {"eval_requests": plan},
        {
            "requests": plan.height,
            "models": len(models),
            "modes": [mode_label(m, k) for m in modes],
        },
    )


# ---------------------------------------------------------------------------------------------
# Prompts


def instruction_text(question: str, choices: list[str] | None) -> str:
    """The question, with MAmmoTH's "Answer Choices: (A) ... (B) ..." line for choices."""
    if not choices:
        return question
    listed = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return f"{question}\nAnswer Choices: {listed}"


def prompt_templates(prompt_format: str) -> dict[str, Template]:
    if prompt_format not in ("alpaca", "chat"):
        raise ValueError(f"unknown prompt format {prompt_format!r} (alpaca, chat)")
    return {kind: load_template(f"eval_{prompt_format}_{kind}") for kind in ("cot", "pot")}


def _request(
    template: Template, text: str, sampling: SamplingParams, raw: bool = False
) -> ChatRequest:
    return ChatRequest(
        messages=tuple(template.messages(instruction=text)),
        sampling=sampling,
        template_version=template.version,
        raw=raw,
    )


def _tokens(response: ChatResponse) -> tuple[int, int]:
    return response.prompt_tokens, sum(c.completion_tokens for c in response.completions)


def _first(response: ChatResponse) -> tuple[str | None, str | None]:
    if not response.completions:
        return None, "error"
    return response.completions[0].text, response.completions[0].finish_reason


def vote_letters(letters: list[str | None]) -> tuple[str | None, float]:
    """The most frequent option letter and its share of all samples; ties go to the letter
    sampled first (as `majority_votes` does for open answers)."""
    counts = Counter(x for x in letters if x)
    if not counts:
        return None, 0.0
    top = max(counts.values())
    winner = next(x for x in letters if x and counts[x] == top)
    return winner, top / len(letters)


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_requests(
    requests: pl.DataFrame,
    engine: Engine,
    sandbox: ProgramRunner | None,
    decoding: DecodingParams = DecodingParams(),
    pool: VerifierPool | None = None,
) -> pl.DataFrame:
    """Answer and grade every planned request (`EvalRequest` rows) with one engine.

    Returns one `EvalResult` row per request, in order. All first requests go to the engine
    as one batch, programs to the sandbox as one batch, hybrid fallbacks as a second batch.
    """
    require_columns(requests, EvalRequest.columns(), "evaluate_requests")
    rows = requests.to_dicts()
    samplings: dict[str, dict[str, SamplingParams]] = {}
    templates: dict[str, dict[str, Template]] = {}
    for fmt in {r["prompt_format"] for r in rows}:
        templates[fmt] = prompt_templates(fmt)
        stop = ALPACA_STOPS if fmt == "alpaca" else ()
        samplings[fmt] = {
            "cot": SamplingParams(temperature=0.0, max_tokens=decoding.cot_max_tokens, stop=stop),
            "pot": SamplingParams(temperature=0.0, max_tokens=decoding.pot_max_tokens, stop=stop),
            "maj": decoding.maj_sampling.engine_params(seed=decoding.seed, stop=stop),
        }

    def cot_request(row: dict[str, Any]) -> ChatRequest:
        text = instruction_text(row["question"], row["choices"])
        fmt = row["prompt_format"]
        return _request(templates[fmt]["cot"], text, samplings[fmt]["cot"], fmt == "alpaca")

    first: list[ChatRequest] = []
    for row in rows:
        fmt, mode = row["prompt_format"], row["mode"]
        text = instruction_text(row["question"], row["choices"])
        if mode in ("pot", "hybrid"):
            first.append(
                _request(templates[fmt]["pot"], text, samplings[fmt]["pot"], fmt == "alpaca")
            )
        elif mode.startswith("maj@"):
            sampling = replace(samplings[fmt]["maj"], n=row["samples"])
            first.append(_request(templates[fmt]["cot"], text, sampling, fmt == "alpaca"))
        else:
            first.append(cot_request(row))
    responses = engine.generate(first) if first else []

    out: list[dict[str, Any]] = []
    for row, request, response in zip(rows, first, responses, strict=True):
        text, finish = _first(response)
        prompt_tokens, completion_tokens = _tokens(response)
        out.append(
            {
                "id": row["id"],
                "model": row["model"],
                "model_ref": row["model_ref"],
                "engine_identity": engine.identity,
                "benchmark": row["benchmark"],
                "item_id": row["item_id"],
                "mode": row["mode"],
                "prompt_format": row["prompt_format"],
                "prompt_version": request.template_version,
                "completion": text,
                "finish_reason": finish,
                "reference": row["answer"],
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "error": response.error,
                "fallback": False if row["mode"] == "hybrid" else None,
                "_choices": row["choices"],
                "_texts": [c.text for c in response.completions],
            }
        )

    # Programs: every pot/hybrid completion's program, run in the sandbox in one batch.
    program_rows = [r for r in out if r["mode"] in ("pot", "hybrid")]
    for r in program_rows:
        r["program"] = extract_program(r["completion"])
        if r["completion"] is None:
            r["program_error"] = "engine error"
        elif r["program"] is None:
            r["program_error"] = "no program in completion"
    to_run = [r for r in program_rows if r.get("program")]
    if to_run:
        if sandbox is None:
            raise ValueError("pot and hybrid modes need a sandbox to run programs")
        results = sandbox.run_many([r["program"] for r in to_run])
        if len(results) != len(to_run):
            raise RuntimeError(f"sandbox returned {len(results)} results for {len(to_run)}")
        for r, result in zip(to_run, results, strict=True):
            r["program_output"] = result.stdout
            r["program_error"] = program_failure(result)
            if r["program_error"] is None:
                r["raw_answer"] = extract_program_answer(result.stdout)

    # Hybrid: a program that gave no answer falls back to the greedy CoT answer.
    by_id = {row["id"]: row for row in rows}
    fallbacks = [r for r in out if r["mode"] == "hybrid" and r.get("program_error")]
    if fallbacks:
        fb_requests = [cot_request(by_id[r["id"]]) for r in fallbacks]
        for r, request, response in zip(
            fallbacks, fb_requests, engine.generate(fb_requests), strict=True
        ):
            text, finish = _first(response)
            p_tokens, c_tokens = _tokens(response)
            r.update(
                fallback=True,
                fallback_completion=text,
                fallback_prompt_version=request.template_version,
                finish_reason=finish,
                error=response.error,
                prompt_tokens=r["prompt_tokens"] + p_tokens,
                completion_tokens=r["completion_tokens"] + c_tokens,
            )
            r["raw_answer"] = (
                (extract_choice(text) if r["_choices"] else extract_answer(text))
                if text is not None
                else None
            )

    # CoT answers (and maj@k samples).
    for r in out:
        if r["mode"] == "cot" and r["completion"] is not None:
            r["raw_answer"] = (
                extract_choice(r["completion"])
                if r["_choices"]
                else extract_answer(r["completion"])
            )
        if r["mode"].startswith("maj@"):
            extract = extract_choice if r["_choices"] else extract_answer
            r["samples"] = [extract(t) for t in r["_texts"]]

    _choose_options(out, pool)
    _vote(out, pool)
    _grade(out, pool)
    for r in out:
        r.pop("_choices")
        r.pop("_texts")
    return EvalResult.frame(out)


def _choose_options(out: list[dict[str, Any]], pool: VerifierPool | None) -> None:
    """Map multiple-choice answers (single answers and maj@k samples) to option letters."""
    answers: list[str | None] = []
    choices: list[list[str]] = []
    slots: list[tuple[dict[str, Any], int | None]] = []
    for r in out:
        if not r["_choices"]:
            continue
        if r["mode"].startswith("maj@"):
            for i, a in enumerate(r["samples"]):
                answers.append(a)
                choices.append(r["_choices"])
                slots.append((r, i))
        else:
            answers.append(r.get("raw_answer"))
            choices.append(r["_choices"])
            slots.append((r, None))
    letters = choose_options(answers, choices, pool) if answers else []
    for (r, i), letter in zip(slots, letters, strict=True):
        if i is None:
            r["extracted_answer"] = letter
        else:
            r["samples"][i] = letter


def _vote(out: list[dict[str, Any]], pool: VerifierPool | None) -> None:
    """maj@k: the winning answer, its agreement, and the completion of its first sample."""
    open_rows = [r for r in out if r["mode"].startswith("maj@") and not r["_choices"]]
    votes = majority_votes([r["samples"] for r in open_rows], pool) if open_rows else []
    for r, vote in zip(open_rows, votes, strict=True):
        r["extracted_answer"] = vote.answer
        r["agreement"] = vote.agreement
        if vote.winner is not None:
            r["completion"] = r["_texts"][vote.groups[vote.winner][0]]
    for r in out:
        if r["mode"].startswith("maj@") and r["_choices"]:
            letter, agreement = vote_letters(r["samples"])
            r["extracted_answer"], r["agreement"] = letter, agreement
            if letter is not None:
                r["completion"] = r["_texts"][r["samples"].index(letter)]


def _grade(out: list[dict[str, Any]], pool: VerifierPool | None) -> None:
    """`correct`: the letter's equality for choices, `check_equivalence` for open answers."""
    open_rows = []
    for r in out:
        if not r["_choices"] and not r["mode"].startswith("maj@"):
            r["extracted_answer"] = r.get("raw_answer")
            r["raw_answer"] = None
        if r.get("error") is not None:
            r["correct"] = None  # the engine failed: nothing to judge
        elif r["_choices"]:
            r["correct"] = r.get("extracted_answer") == r["reference"]
        else:
            open_rows.append(r)
    verdicts = check_equivalence(
        [r.get("extracted_answer") for r in open_rows], [r["reference"] for r in open_rows], pool
    )
    for r, verdict in zip(open_rows, verdicts, strict=True):
        r["correct"] = verdict


def shard_model(
    requests: pl.DataFrame, engine: EngineConfig, home: Path, folders: ModelFolders | None = None
) -> str | None:
    """The engine's `model` setting for a shard's one model: a checkpoint's folder in this
    home, a local folder where this run found it (the plan names each by its ref or identity,
    never by a path), else the planned setting, else the engine's own."""
    models = requests.select("model_ref", "engine_model", "model_identity").unique()
    if models.height > 1:
        raise ValueError(f"an evaluate shard holds several models: {models.rows()}")
    if models.height == 0:
        return engine.model
    ref, setting, identity = models.row(0)
    if identity.startswith(ARTIFACT_IDENTITY):
        name, _, version = ref.partition("@")
        return str(DatasetStore(home).version_dir(name, version))
    if identity.startswith(FOLDER_IDENTITY) and setting is None:
        if folders is None or identity not in folders.folders:
            raise ValueError(f"model {ref}: no local folder with this identity was given")
        return folders.folders[identity]
    return setting or engine.model


@stage(
    name="evaluate",
    outputs={"eval_results": EvalResult},
    shard=Shard("eval_requests", rows=256, split_on="model"),
)
def evaluate_batch(
    ctx: StageContext,
    eval_requests: pl.DataFrame,
    engine: EngineConfig,
    decoding: DecodingParams,
    sandbox: SandboxSettings,
    folders: ModelFolders | None = None,
) -> StageOutput:
    """Answer and grade planned requests with one model (programs in the sandbox); `folders`
    says where the local folder models are here (not part of the version)."""
    model = shard_model(eval_requests, engine, ctx.home, folders)
    config = engine.model_copy(update={"model": model})
    needs_programs = eval_requests["mode"].is_in(["pot", "hybrid"]).any()
    runner = sandbox.open() if needs_programs else contextlib.nullcontext(None)
    with runner as programs:
        results = evaluate_requests(eval_requests, ctx.engine(config), programs, decoding)
    stats = {
        "requests": results.height,
        "correct": int(results["correct"].fill_null(False).sum()),
        "unjudged": int(results["correct"].null_count()),
        "fallbacks": int(results["fallback"].fill_null(False).sum()),
    }
    return StageOutput({"eval_results": results}, stats)
