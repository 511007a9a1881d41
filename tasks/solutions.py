"""Solutions: SFT answers for seeds, hybrid CoT/PoT samples for instructions, and their votes.

Plain functions over polars DataFrames; the Prefect tasks around them live in the flows.

- `sft_answers` is WizardMath's step 1: each seed is re-solved few-shot, step by step, ending in
  `The answer is: X` (template `cot_fewshot`). Up to `samples_per_seed` samples are drawn, one
  round at a time for the seeds still unsolved (each round a new sampling seed, so the request
  cache never serves the same sample twice); the first sample whose answer is equivalent to the
  seed's reference is kept. Every seed gets one row; an unsolved seed has a null solution and a
  `reason` saying why (wrong_answer, no_answer, unjudged, engine_error, no_reference).
- `write_solutions` draws `k_cot` chain-of-thought samples and `k_pot` program-of-thought
  programs (MAmmoTH, template `pot`, "Let's write a program.") per instruction. Programs run only
  through the sandbox (`run_many`). Hybrid decoding: a PoT slot whose program is missing, fails,
  or prints nothing usable falls back to a fresh CoT sample; that row has
  `kind = "pot_fallback_cot"` and still records the failed program and why it failed. Every
  sample slot gets exactly one row: rows = instructions x (k_cot + k_pot).
- `vote_answers` turns the samples of each instruction into a pseudo-label: the majority answer
  by math equivalence (`tasks.verify.majority_votes`), its agreement, whether the CoT and PoT
  majorities agree, `difficulty = 1 - agreement`, `verified = agreement >= threshold`, and a
  match against a reference answer where one exists (seeds). Each solution row gets `verdict`:
  whether it is in the majority group.
- `difficulty_by_direction` compares each evolution's difficulty with its parent's, per round
  and direction, which is how the factory shows that upward evolution made problems harder.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

import polars as pl

from infra.engines.base import ChatRequest, ChatResponse, Engine, SamplingParams
from tasks.templates import Template, load_template
from tasks.verify import (
    VerifierPool,
    check_equivalence,
    extract_answer,
    extract_program_answer,
    majority_votes,
)

COT_TEMPLATE = "cot_fewshot"
POT_TEMPLATE = "pot"
# Fallback CoT samples use sampling seeds far from the regular ones so they are new samples.
FALLBACK_SEED_OFFSET = 100_003

DEFAULT_COT_SAMPLING = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=512, seed=0)
DEFAULT_POT_SAMPLING = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=384, seed=0)

SFT_SCHEMA: dict[str, Any] = {
    "seed_id": pl.String,
    "solution": pl.String,
    "predicted": pl.String,
    "correct": pl.Boolean,
    "tries": pl.Int64,
    "reason": pl.String,
    "model": pl.String,
    "template_version": pl.String,
}
SOLUTION_SCHEMA: dict[str, Any] = {
    "instruction_id": pl.String,
    "kind": pl.String,  # cot | pot | pot_fallback_cot
    "sample": pl.Int64,
    "text": pl.String,
    "program": pl.String,
    "program_stdout": pl.String,
    "program_error": pl.String,
    "extracted_answer": pl.String,
    "finish_reason": pl.String,
    "model": pl.String,
    "template_version": pl.String,
}
ANSWER_SCHEMA: dict[str, Any] = {
    "instruction_id": pl.String,
    "answer": pl.String,
    "agreement": pl.Float64,
    "n_samples": pl.Int64,
    "n_answered": pl.Int64,
    "group_sizes": pl.List(pl.Int64),
    "cot_answer": pl.String,
    "pot_answer": pl.String,
    "cot_pot_agreement": pl.Boolean,
    "difficulty": pl.Float64,
    "verified": pl.Boolean,
    "reference_match": pl.Boolean,
}


class ProgramRunner(Protocol):
    """What `write_solutions` needs from `infra.sandbox.Sandbox`."""

    def run_many(self, programs: list[str]) -> list[Any]: ...


def _require(df: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing columns {missing} (has {df.columns})")


def _requests(
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


# ---------------------------------------------------------------------------------------------
# Program extraction
# ---------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_LINE = re.compile(
    r"^(?:import |from \w|def |class |for |while |if |print\(|[A-Za-z_]\w*\s*(?:,\s*[A-Za-z_]\w*\s*)*[+\-*/]?=)"
)
_ANSWER_NAMES = ("answer", "ans", "result", "solution")


def _compiles(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def extract_program(text: str | None) -> str | None:
    """The Python program in a PoT completion, or None.

    The last ```python fenced block that parses (an unclosed final fence counts, since
    generation may stop at the token limit), else the raw text from its first code-looking line
    if that parses. A program that prints nothing but assigns `answer`/`ans`/`result` gets a
    final `print` of that variable, as MAmmoTH's programs conventionally end that way.
    """
    if not text:
        return None
    blocks = [b.strip("\n") for b in _FENCE.findall(text)]
    code = next((b for b in reversed(blocks) if b.strip() and _compiles(b)), None)
    if code is None and not blocks:
        lines = text.strip("\n").splitlines()
        start = next((i for i, line in enumerate(lines) if _CODE_LINE.match(line)), None)
        if start is not None:
            candidate = "\n".join(lines[start:])
            code = candidate if _compiles(candidate) else None
    if code is None:
        return None
    if "print(" not in code:
        tree = ast.parse(code)
        assigned = {
            t.id
            for node in tree.body
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        name = next((n for n in _ANSWER_NAMES if n in assigned), None)
        if name is None:
            return None
        code = f"{code.rstrip()}\nprint({name})"
    return code


def _program_failure(result: Any) -> str | None:
    """Why a sandbox run gives no usable answer, or None when it printed one."""
    if getattr(result, "error", None):
        return f"sandbox error: {result.error}"
    if result.timed_out:
        return "timed out"
    if getattr(result, "killed_by_limit", None):
        return f"killed by {result.killed_by_limit} limit"
    if not result.ok:
        tail = (result.stderr_tail or "").strip().splitlines()
        return f"exit code {result.exit_code}: {tail[-1] if tail else 'no stderr'}"
    if not (result.stdout or "").strip():
        return "printed nothing"
    if extract_program_answer(result.stdout) is None:
        return "no answer in output"
    return None


# ---------------------------------------------------------------------------------------------
# SFT answers (WizardMath step 1)
# ---------------------------------------------------------------------------------------------


def sft_answers(
    seeds: pl.DataFrame,
    engine: Engine,
    samples_per_seed: int = 4,
    sampling: SamplingParams = DEFAULT_COT_SAMPLING,
    pool: VerifierPool | None = None,
) -> pl.DataFrame:
    """Re-solve each seed step by step; keep the first sample whose answer matches the reference.

    One row per seed (`SFT_SCHEMA`): `solution` is the kept sample (null when none matched),
    `predicted` the kept or last extracted answer, `tries` the samples drawn for that seed.
    """
    _require(seeds, ["id", "question", "answer"], "sft_answers seeds")
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
            _requests(template, [rows[i]["question"] for i in open_rows], params)
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
    return pl.DataFrame(state, schema=SFT_SCHEMA)


# ---------------------------------------------------------------------------------------------
# CoT + PoT solutions with hybrid fallback (MAmmoTH)
# ---------------------------------------------------------------------------------------------


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

    Columns: `SOLUTION_SCHEMA`. PoT rows carry the program, its stdout and, when it gave no
    answer, `program_error`. With `fallback`, a failed PoT slot is re-answered by a CoT sample
    (`kind = "pot_fallback_cot"`, `text` is the CoT, the failed program stays for audit).
    """
    _require(instructions, ["id", "text"], "write_solutions instructions")
    if k_cot < 0 or k_pot < 0 or k_cot + k_pot < 1:
        raise ValueError(f"need k_cot, k_pot >= 0 and k_cot + k_pot >= 1, got {k_cot}, {k_pot}")
    cot_t, pot_t = load_template(COT_TEMPLATE), load_template(POT_TEMPLATE)
    ids = instructions["id"].to_list()
    questions = instructions["text"].to_list()
    model = engine.identity
    rows: list[dict[str, Any]] = []

    # CoT and PoT requests go to the engine as one batch: batched decoding is what makes
    # the engines fast, and the two kinds are independent.
    cot_requests = _requests(cot_t, questions, replace(cot_sampling, n=k_cot)) if k_cot else []
    pot_requests = _requests(pot_t, questions, replace(pot_sampling, n=k_pot)) if k_pot else []
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
            row["program_error"] = _program_failure(result)
            if row["program_error"] is None:
                row["extracted_answer"] = extract_program_answer(result.stdout)
        if fallback:
            _fallback_to_cot(
                pot_rows, engine, cot_t, cot_sampling, dict(zip(ids, questions, strict=True))
            )
        rows.extend(pot_rows)

    order = {iid: i for i, iid in enumerate(ids)}
    rows.sort(key=lambda r: (order[r["instruction_id"]], r["sample"]))
    return pl.DataFrame(rows, schema=SOLUTION_SCHEMA)


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


# ---------------------------------------------------------------------------------------------
# Voting
# ---------------------------------------------------------------------------------------------


def vote_answers(
    solutions: pl.DataFrame,
    references: dict[str, str] | None = None,
    threshold: float = 0.5,
    pool: VerifierPool | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Majority answer per instruction, and the solutions with a `verdict` column.

    `answers` has one row per instruction present in `solutions` (`ANSWER_SCHEMA`). `agreement`
    counts unanswered samples in its denominator; `cot_answer`/`pot_answer` are the majorities
    of the CoT samples (fallbacks included, they are CoT) and of the programs;
    `cot_pot_agreement` is null unless both exist. `reference_match` is null where there is no
    reference (or it could not be judged). `verdict` is null when the instruction has no
    majority answer at all, else whether the sample is in the majority group.
    """
    _require(solutions, ["instruction_id", "kind", "sample", "extracted_answer"], "vote_answers")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    solutions = solutions.with_row_index("_row")
    # Instructions in order of first appearance, samples in order within each.
    ordered = solutions.with_columns(
        pl.col("_row").min().over("instruction_id").alias("_first")
    ).sort("_first", "sample", maintain_order=True)
    groups = ordered.group_by("instruction_id", maintain_order=True).agg(
        pl.col("_row"), pl.col("kind"), pl.col("extracted_answer")
    )
    ids = groups["instruction_id"].to_list()
    answer_lists = groups["extracted_answer"].to_list()
    kinds = groups["kind"].to_list()
    cot_lists = [
        [a for a, k in zip(ans, ks, strict=True) if k != "pot"]
        for ans, ks in zip(answer_lists, kinds, strict=True)
    ]
    pot_lists = [
        [a for a, k in zip(ans, ks, strict=True) if k == "pot"]
        for ans, ks in zip(answer_lists, kinds, strict=True)
    ]
    n = len(ids)
    votes = majority_votes(answer_lists + cot_lists + pot_lists, pool)
    overall, cot_votes, pot_votes = votes[:n], votes[n : 2 * n], votes[2 * n :]

    # CoT-vs-PoT and reference checks, all in one batch.
    preds: list[str | None] = []
    refs: list[str | None] = []
    both = [i for i in range(n) if cot_votes[i].answer is not None and pot_votes[i].answer]
    for i in both:
        preds.append(pot_votes[i].answer)
        refs.append(cot_votes[i].answer)
    references = references or {}
    with_ref = [i for i in range(n) if ids[i] in references and overall[i].answer is not None]
    for i in with_ref:
        preds.append(overall[i].answer)
        refs.append(references[ids[i]])
    checks = check_equivalence(preds, refs, pool)
    cot_pot: dict[int, bool | None] = {
        i: checks[j] is True for j, i in enumerate(both)
    }  # None from the checker (unjudged) reads as disagreement: a pseudo-label needs agreement
    ref_match = dict(zip(with_ref, checks[len(both) :], strict=True))

    answer_rows = []
    verdicts: dict[int, bool | None] = {}
    for i, vote in enumerate(overall):
        rows_i = groups["_row"][i].to_list()
        for position, row in enumerate(rows_i):
            verdicts[row] = vote.agrees(position)
        answered = sum(a is not None for a in answer_lists[i])
        if ids[i] in references and vote.answer is None:
            match: bool | None = False  # no answer at all cannot match the reference
        else:
            match = ref_match.get(i)
        answer_rows.append(
            {
                "instruction_id": ids[i],
                "answer": vote.answer,
                "agreement": vote.agreement,
                "n_samples": vote.n_samples,
                "n_answered": answered,
                "group_sizes": list(vote.group_sizes),
                "cot_answer": cot_votes[i].answer,
                "pot_answer": pot_votes[i].answer,
                "cot_pot_agreement": cot_pot.get(i),
                "difficulty": 1.0 - vote.agreement,
                "verified": vote.answer is not None and vote.agreement >= threshold,
                "reference_match": match,
            }
        )
    answers = pl.DataFrame(answer_rows, schema=ANSWER_SCHEMA)
    verdict_col = pl.Series(
        "verdict", [verdicts[r] for r in solutions["_row"].to_list()], dtype=pl.Boolean
    )
    return answers, solutions.drop("_row").with_columns(verdict_col)


# ---------------------------------------------------------------------------------------------
# Difficulty by evolution direction
# ---------------------------------------------------------------------------------------------


def difficulty_by_direction(instructions: pl.DataFrame, answers: pl.DataFrame) -> pl.DataFrame:
    """Per (round, direction): mean difficulty of evolutions vs their parents, and the delta.

    `answers` must hold the difficulty of the parents too (e.g. seed answers concatenated with
    every round's answers). `mean_delta` is over the pairs where both have a difficulty, so it
    is a paired comparison; `n_pairs` says how many there were.
    """
    _require(instructions, ["id", "parent_id", "round", "direction"], "difficulty_by_direction")
    _require(answers, ["instruction_id", "difficulty"], "difficulty_by_direction answers")
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
            pl.len().alias("n_evolutions"),
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
