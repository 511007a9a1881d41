"""The instruction eliminator: drop failed evolutions, with the rule that failed and its evidence.

WizardLM's eliminator drops an evolution that (1) gains no information over its parent, (2) gets
an answer containing "sorry" that is under 80 words, (3) gets an answer made only of punctuation
and stop words, or (4) copies words of the evolving prompt. For math we add: the output could not
be parsed, no question is asked, the length is out of bounds, and a judge finds the problem not
solvable. The parent of a dropped evolution goes back into the pool (the round flow does that).

Each rule is a plain function returning a `Verdict(keep, reason, evidence)`, in the spirit of
datatrove's `BaseFilter.filter`. `eliminate` applies them in `RULES` order and the first failing
rule wins, so every dropped row has exactly one reason. Cheap text rules run first; the rules
that need the engine then run as one batched `engine.generate` call each, only for the rows
still alive:

1. `parse_failed`, `copies_prompt`, `length_out_of_bounds`, `no_question`, and the cheap half
   of `no_information_gain`: an evolution (nearly) identical to its parent word for word
   (no engine);
2. the answer probe (`answer_probe.txt`): the engine answers the evolved problem, which feeds
   `sorry_answer` and `stopword_answer`;
3. the equal judge (`judge_equal.txt`, JSON `{"verdict": "Equal" | "Not Equal"}`):
   `no_information_gain`;
4. the solvable judge (`judge_solvable.txt`, JSON `{"solvable": bool, "reason": str}`):
   `not_solvable`.

Active Evol-Instruct (RLEIF's third step closes the loop): with `irm_model` set to a trained
instruction reward model (`irm_model@<version>` from the catalog's `models` view, or a checkpoint
folder), evolutions of round `irm_from_round` and later are scored by the IRM given their parent,
right after the cheap rules, and those scoring below `irm_threshold` (the sigmoid of the IRM's
logit) are dropped by the rule `low_instruction_reward`, the score being the evidence. It is not
in `RULES` (the rules every run applies) but in `ALL_RULES`; the funnel counts it per round like
any other rule.

A failed engine call or a judge reply that is not the requested JSON keeps the instruction: a
rule drops only on positive evidence that the evolution failed, and a broken judge is not such
evidence (dropping would bias the pool against whatever the judge chokes on). The failure is not
lost: the verdict is a keep with `evidence` set, and `eliminate_with_checks` returns it in the
`notes` column of its per-instruction `checks` frame, next to the probe answers and judgments,
so the failure rate of each judge can be counted.

`kept` holds the input rows unchanged; `eliminated` is `Eliminated` rows; together they are
exactly the input (checked on every call).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from infra.engines import EngineConfig
from infra.engines.base import ChatRequest, ChatResponse, Engine
from infra.scoring import ScoringDevice, ScoringDtype
from storage.settings import PROJECT_ROOT
from tasks.evolution.evolve import OPERATIONS, parent_texts
from tasks.evolution.records import Eliminated, EliminationCheck
from tasks.sampling import Sampling
from tasks.stage import Shard, StageContext, StageOutput, stage
from tasks.templates import load_template

RULES = (
    "parse_failed",
    "copies_prompt",
    "length_out_of_bounds",
    "no_question",
    "sorry_answer",
    "stopword_answer",
    "no_information_gain",
    "not_solvable",
)

# Active Evol-Instruct's rule: it runs only when a trained IRM is configured.
IRM_RULE = "low_instruction_reward"
ALL_RULES = (*RULES, IRM_RULE)

# What the eliminator needs of an evolution (and records of a removed one, with rule, evidence).
REQUIRED_COLUMNS = ("id", "parent_id", "root_id", "round", "direction", "op", "text")

EQUAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"verdict": {"type": "string", "enum": ["Equal", "Not Equal"]}},
    "required": ["verdict"],
    "additionalProperties": False,
}
SOLVABLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"solvable": {"type": "boolean"}, "reason": {"type": "string"}},
    "required": ["solvable", "reason"],
    "additionalProperties": False,
}

STOP_WORDS_PATH = PROJECT_ROOT / "tasks" / "data" / "stop_words.txt"
EVIDENCE_CHARS = 300


class Verdict(NamedTuple):
    """Keep the instruction or not; when not, the rule and what it saw.

    A keep may carry `evidence` too: a note that a check could not run (engine or judge failure).
    """

    keep: bool
    reason: str | None = None
    evidence: str | None = None


KEEP = Verdict(True)


def _drop(rule: str, evidence: str) -> Verdict:
    return Verdict(False, rule, _clip(evidence))


def _clip(text: str, limit: int = EVIDENCE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


ProbeSampling = Sampling.defaults(
    "ProbeSampling", "Sampling of the answer probe (greedy).", temperature=0.0, max_tokens=192
)
JudgeSampling = Sampling.defaults(
    "JudgeSampling", "Sampling of the equal and solvable judges (greedy).", max_tokens=64
)


class EliminationParams(BaseModel):
    """Which rules run and with what bounds; the judges and the probe use the round's engine."""

    model_config = ConfigDict(extra="forbid")

    # Length bounds on the evolved problem (words split on whitespace; "Compute $5!$." is 2).
    min_words: int = Field(3, ge=0, description="fewer words: length_out_of_bounds")
    max_words: int = Field(300, ge=1, description="more words: length_out_of_bounds")
    min_chars: int = Field(10, ge=0, description="fewer characters: length_out_of_bounds")
    max_chars: int = Field(3000, ge=1, description="more characters: length_out_of_bounds")
    extra_copy_phrases: list[str] = Field(
        default_factory=list,
        description="phrases that betray a copied evolving prompt, besides the templates' own",
    )
    # Answer probe rules (WizardLM): an apology under `sorry_max_words`, or only stop words.
    sorry_rule: bool = Field(True, description="drop when the probe answer is a short apology")
    sorry_max_words: int = Field(80, ge=1, description="an apology this short counts")
    stopword_rule: bool = Field(
        True, description="drop when the probe answer is only punctuation and stop words"
    )
    probe_sampling: ProbeSampling = Field(
        default_factory=ProbeSampling, description="sampling of the probe answer"
    )
    # No information gain without a judge: an evolution whose words match its parent's this
    # closely (difflib ratio over lower-cased words, 1.0 = identical) is dropped before any
    # engine call. It also covers engines whose equal judge cannot be trusted.
    max_parent_similarity: float = Field(
        0.95, ge=0, le=1, description="word similarity to the parent that means no new information"
    )
    equal_judge: bool = Field(True, description="LLM judge: is the evolution equal to its parent?")
    solvable_judge: bool = Field(True, description="LLM judge: is the evolution solvable?")
    judge_sampling: JudgeSampling = Field(
        default_factory=JudgeSampling, description="sampling of a judge's JSON reply"
    )
    seed: int = Field(0, description="sampling seed of the probe and the judges")
    # Active Evol-Instruct: a trained IRM (`irm_model@<version>` from the models view, or a
    # checkpoint folder) scores the evolutions of round `irm_from_round` and later; those
    # below `irm_threshold` (sigmoid of the IRM's logit, in (0, 1)) are dropped.
    irm_model: str | None = Field(
        None,
        description="Active Evol-Instruct: a trained IRM (irm_model@<version> or a folder) "
        "that scores later rounds' evolutions",
    )
    irm_threshold: float = Field(
        0.5, ge=0, le=1, description="evolutions the IRM scores below this are dropped"
    )
    irm_from_round: int = Field(2, ge=1, description="the first round the IRM scores")
    irm_max_length: int = Field(512, ge=16, description="tokens of an instruction the IRM reads")
    irm_device: ScoringDevice = Field(
        "auto", description="where the IRM scores: auto is CUDA when there is a GPU, else the CPU"
    )
    irm_dtype: ScoringDtype = Field(
        "auto", description="the IRM's dtype: auto is bfloat16 on a GPU that has it, else float32"
    )

    def fingerprint(self) -> dict[str, Any]:
        """Every setting; the IRM's only when one is configured, a folder by its contents; the
        IRM's device never (where it scores, not what)."""
        data = self.model_dump(mode="json")
        data.pop("irm_device")
        if self.irm_model is None:
            for key in ("irm_model", "irm_threshold", "irm_from_round", "irm_max_length"):
                data.pop(key)
            data.pop("irm_dtype")
        elif Path(self.irm_model).expanduser().is_dir():
            from infra.models import folder_checksum

            data["irm_model"] = (
                f"folder-sha256:{folder_checksum(Path(self.irm_model).expanduser())}"
            )
        return data

    @model_validator(mode="after")
    def _check_bounds(self) -> EliminationParams:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words {self.min_words} > max_words {self.max_words}")
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} > max_chars {self.max_chars}")
        return self


# ---------------------------------------------------------------------------------------------
# Cheap rules: the evolved text alone.


def parse_failed(
    text: str | None, finish_reason: str | None = None, error: str | None = None
) -> Verdict:
    """Drop an evolution whose request failed or whose output held no problem."""
    if error or finish_reason == "error":
        return _drop("parse_failed", f"evolution request failed: {error or 'unknown error'}")
    if text is None or not text.strip():
        return _drop("parse_failed", f"no problem in the evolver's output ({finish_reason})")
    return KEEP


# WizardLM's own list: the words its depth prompt forbids in the rewritten prompt.
WIZARDLM_COPY_PHRASES = (
    "#the given prompt#",
    "#rewritten prompt#",
    "given prompt",
    "rewritten prompt",
)
# Words that only a reply talking about the rewriting would use.
REWRITE_PHRASES = ("rewritten problem", "given problem", "original problem", "rewritten question")
SHINGLE = 8


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


@dataclass(frozen=True)
class CopyMarkers:
    phrases: tuple[str, ...]  # lower-case substrings
    shingles: frozenset[tuple[str, ...]]  # SHINGLE-word runs of the templates' instructions


@cache
def template_copy_markers() -> CopyMarkers:
    """What an evolution copied from its prompt would contain: WizardLM's forbidden words, the
    evolution templates' `#headings#` and quoted phrases, and every SHINGLE-word run of their
    instruction sentences and worked examples.

    The problem placeholder and the role lines are left out: copying the parent problem is a
    matter for the equal judge, not for this rule.
    """
    phrases = set(WIZARDLM_COPY_PHRASES) | set(REWRITE_PHRASES)
    shingles = set()
    for spec in OPERATIONS.values():
        text = load_template(spec.template).text
        text = re.sub(r"\{\{[^}]*\}\}|^@@ \w+[ \t]*$", " ", text, flags=re.MULTILINE)
        phrases.update(m.lower() for m in re.findall(r"#[^#\n]{2,40}#", text))
        phrases.update(m.lower() for m in re.findall(r'"([^"\n]{3,60})"', text))
        for line in text.splitlines():
            words = _words(line)
            shingles.update(tuple(words[i : i + SHINGLE]) for i in range(len(words) - SHINGLE + 1))
    return CopyMarkers(tuple(sorted(phrases)), frozenset(shingles))


def copies_prompt(text: str, extra_phrases: tuple[str, ...] | list[str] = ()) -> Verdict:
    """Drop an evolution that repeats the evolving prompt's headings, phrases or sentences."""
    markers = template_copy_markers()
    flat = " ".join(text.lower().split())
    for phrase in (*markers.phrases, *(p.lower() for p in extra_phrases)):
        if phrase and phrase in flat:
            return _drop("copies_prompt", f"contains {phrase!r}")
    words = _words(text)
    for i in range(len(words) - SHINGLE + 1):
        if tuple(words[i : i + SHINGLE]) in markers.shingles:
            return _drop(
                "copies_prompt", f"repeats the prompt: {' '.join(words[i : i + SHINGLE])!r}"
            )
    return KEEP


def length_out_of_bounds(
    text: str, min_words: int = 3, max_words: int = 300, min_chars: int = 10, max_chars: int = 3000
) -> Verdict:
    """Drop an evolution that is too short to be a problem or too long to be a useful one."""
    words, chars = len(text.split()), len(text.strip())
    if words < min_words or chars < min_chars:
        return _drop(
            "length_out_of_bounds",
            f"too short: {words} words, {chars} chars (min {min_words} words, {min_chars} chars)",
        )
    if words > max_words or chars > max_chars:
        return _drop(
            "length_out_of_bounds",
            f"too long: {words} words, {chars} chars (max {max_words} words, {max_chars} chars)",
        )
    return KEEP


# Verbs and question words that ask for something when they open a clause: "Find $x$.",
# "If $a=2$, compute $a^3$.", "..., then what is the total". Matching them only at a clause start
# keeps statements such as "Tom wants to calculate his savings." from passing as questions.
ASK_WORDS = (
    "find", "compute", "calculate", "determine", "solve", "evaluate", "simplify", "show",
    "prove", "express", "what", "how", "which", "who", "whom", "whose", "when", "where", "why",
    "list", "give", "write", "state", "estimate", "factor", "factorize", "expand", "convert",
    "identify", "name", "count", "derive", "verify", "rationalize", "enter", "approximate",
    "rewrite", "sketch", "graph", "decide", "explain", "describe", "check", "use", "work out",
    "round", "multiply", "divide", "add", "subtract", "order", "arrange", "plot", "draw", "classify", "select", "choose", "match",
    "figure out", "tell",
)  # fmt: skip
_ASK = re.compile(
    # A clause opens after a sentence or clause mark (possibly closing math: "$AE = 1.$  Find",
    # "\\]Compute"), a line break, or a connective; a wh-word may also follow a preposition or a
    # verb of asking ("at what time", "wondering how many").
    r"(?:^|[.!:;,)]\$?\s*|\\\]\s*|[}$]\s*|\n\s*|\b(?:then|and|or|so|now|please)\s+"
    r"|\b(?:at|in|on|by|for|to|of|from|with|after|before|wonder(?:s|ing)?|asks?|asked|know|knows)"
    r"\s+(?=(?:what|which|how|who|whom|whose|when|where|why)\b))(?:please\s+|completely\s+|fully\s+)?("
    + "|".join(w.replace(" ", r"\s+") for w in ASK_WORDS)
    + r")\b",
    re.IGNORECASE,
)
# Inverted questions ("Is 91 prime." without its question mark) only open a sentence.
_INVERTED = re.compile(
    r"(?:^|[.!]\s+|\n\s*)(is|are|does|do|did|can|could|will|would|should|must|has|have)\s+\S",
    re.IGNORECASE,
)


# Answer choices "(A) ... (B) ..." or a trailing "=" to fill in also ask for an answer.
_CHOICES = re.compile(r"\(A\).*\(B\)|=\s*\$?\s*\Z", re.DOTALL)


def no_question(text: str) -> Verdict:
    """Drop an evolution that states facts but asks nothing."""
    if "?" in text or _ASK.search(text) or _INVERTED.search(text) or _CHOICES.search(text):
        return KEEP
    return _drop("no_question", f"no '?' and no clause opening with an ask word: {text!r}")


# ---------------------------------------------------------------------------------------------
# Rules on the engine's answer to the evolved problem (the answer probe).


@cache
def stop_words() -> frozenset[str]:
    """English stop words (NLTK's list plus contractions' pieces), one per line in the file."""
    lines = STOP_WORDS_PATH.read_text(encoding="utf-8").splitlines()
    return frozenset(w.strip().lower() for w in lines if w.strip() and not w.startswith("#"))


def sorry_answer(answer: str, max_words: int = 80) -> Verdict:
    """Drop when the answer apologises ("sorry") and is short: the model refused or gave up."""
    n = len(answer.split())
    if "sorry" in answer.lower() and n < max_words:
        return _drop("sorry_answer", f"{n}-word answer with 'sorry': {answer!r}")
    return KEEP


def stopword_answer(answer: str) -> Verdict:
    """Drop when the answer has no content word: only punctuation and stop words (or nothing)."""
    words = re.findall(r"[^\W_]+", answer.lower())
    stops = stop_words()
    if all(w in stops for w in words):
        return _drop("stopword_answer", f"answer is only stop words and punctuation: {answer!r}")
    return KEEP


# ---------------------------------------------------------------------------------------------
# Judges. Their replies are requested as JSON (`ChatRequest.json_schema`); engines that cannot
# constrain decoding may still wrap the object in prose or a code fence, which is tolerated.


class JudgeError(ValueError):
    """The judge's reply is not the requested JSON."""


def _json_object(reply: str) -> dict[str, Any]:
    text = reply.strip()
    candidates = [text, *re.findall(r"\{[^{}]*\}", text)]
    for candidate in candidates:
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return {str(k).strip().lower(): v for k, v in obj.items()}
    raise JudgeError(f"no JSON object in judge reply: {_clip(reply, 120)!r}")


def parse_equal_verdict(reply: str) -> str:
    """'Equal' or 'Not Equal' from the equal judge's JSON reply; JudgeError otherwise."""
    obj = _json_object(reply)
    value = obj.get("verdict")
    norm = re.sub(r"[\s_\-]+", " ", value.strip().lower()) if isinstance(value, str) else None
    if norm == "equal":
        return "Equal"
    if norm in ("not equal", "unequal"):
        return "Not Equal"
    raise JudgeError(f"equal judge: verdict must be 'Equal' or 'Not Equal', got {value!r}")


def parse_solvable(reply: str) -> tuple[bool, str]:
    """(solvable, reason) from the solvable judge's JSON reply; JudgeError otherwise."""
    obj = _json_object(reply)
    value = obj.get("solvable")
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "false", "no"):
        value = value.strip().lower() in ("true", "yes")
    if not isinstance(value, bool):
        raise JudgeError(f"solvable judge: 'solvable' must be true or false, got {value!r}")
    reason = obj.get("reason")
    return value, str(reason).strip() if reason is not None else ""


def _reply(response: ChatResponse) -> str:
    if not response.ok or not response.completions:
        raise JudgeError(f"engine error: {response.error or 'no completion'}")
    return response.completions[0].text


def same_as_parent(parent: str, evolution: str, max_similarity: float = 0.95) -> Verdict:
    """Drop an evolution that is (nearly) its parent word for word: no information gained."""
    a, b = _words(parent), _words(evolution)
    ratio = difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() if a or b else 1.0
    if ratio >= max_similarity:
        return _drop(
            "no_information_gain",
            f"{ratio:.0%} of its words match the parent (max {max_similarity:.0%})",
        )
    return KEEP


def low_instruction_reward(score: float | None, threshold: float, model: str = "IRM") -> Verdict:
    """Drop when the trained IRM scores the evolution below the threshold (Active Evol-Instruct).
    No score (the IRM could not read it) keeps the evolution."""
    if score is None:
        return Verdict(True, None, f"{model} gave no score")
    if score < threshold:
        return _drop(IRM_RULE, f"IRM score {score:.3f} < threshold {threshold:.3f} ({model})")
    return KEEP


def no_information_gain(response: ChatResponse) -> Verdict:
    """Drop when the equal judge finds the evolution equal to its parent."""
    try:
        verdict = parse_equal_verdict(_reply(response))
    except JudgeError as exc:
        return Verdict(True, None, _clip(f"equal judge failed: {exc}"))
    if verdict == "Equal":
        return _drop("no_information_gain", "equal judge: Equal to the parent")
    return KEEP


def not_solvable(response: ChatResponse) -> Verdict:
    """Drop when the solvable judge finds the problem ill-posed or not solvable."""
    try:
        solvable, reason = parse_solvable(_reply(response))
    except JudgeError as exc:
        return Verdict(True, None, _clip(f"solvable judge failed: {exc}"))
    if not solvable:
        return _drop("not_solvable", f"solvable judge: {reason or 'no reason given'}")
    return KEEP


# ---------------------------------------------------------------------------------------------
# The pass over a batch.


@dataclass
class Elimination:
    kept: pl.DataFrame  # the input rows that survived, unchanged
    eliminated: pl.DataFrame  # Eliminated
    checks: pl.DataFrame  # EliminationCheck, one row per input instruction, input order

    def counts(self) -> dict[str, int]:
        """Rows per outcome: 'kept' and one entry per rule that dropped something."""
        out = {"kept": self.kept.height}
        for rule in ALL_RULES:
            n = self.eliminated.filter(pl.col("rule") == rule).height
            if n:
                out[rule] = n
        return out


@dataclass
class _Row:
    record: dict[str, Any]
    verdict: Verdict = KEEP
    answer: str | None = None
    answer_finish: str | None = None
    equal: str | None = None
    solvable: bool | None = None
    solvable_reason: str | None = None
    notes: list[str] | None = None
    irm_score: float | None = None

    @property
    def alive(self) -> bool:
        return self.verdict.keep

    def apply(self, verdict: Verdict) -> None:
        if not verdict.keep:
            self.verdict = verdict
        elif verdict.evidence:
            self.notes = [*(self.notes or []), verdict.evidence]


def _generate(engine: Engine, requests: list[ChatRequest]) -> list[ChatResponse]:
    if not requests:
        return []
    responses = engine.generate(requests)
    if len(responses) != len(requests):
        raise RuntimeError(f"engine returned {len(responses)} responses for {len(requests)}")
    return responses


def _text_verdicts(r: dict[str, Any], parent: str, cfg: EliminationParams) -> Iterator[Verdict]:
    """The cheap rules in order, lazily: a later rule may assume the earlier ones passed."""
    yield parse_failed(r["text"], r.get("finish_reason"), r.get("error"))
    yield copies_prompt(r["text"], cfg.extra_copy_phrases)
    yield length_out_of_bounds(
        r["text"], cfg.min_words, cfg.max_words, cfg.min_chars, cfg.max_chars
    )
    yield no_question(r["text"])
    yield same_as_parent(parent, r["text"], cfg.max_parent_similarity)


def _parsed(parse: Callable[[str], Any], response: ChatResponse) -> Any:
    """A judge's parsed reply, or None when it failed (the failure is noted by the rule)."""
    try:
        return parse(_reply(response))
    except JudgeError:
        return None


IrmScores = Callable[[list[str], list[str | None]], list[float]]


def eliminate_with_checks(
    instructions: pl.DataFrame,
    parents: pl.DataFrame,
    engine: Engine,
    cfg: EliminationParams | None = None,
    irm: IrmScores | None = None,
) -> Elimination:
    """Run every rule over a batch of evolved instructions; see the module docstring.

    `irm` scores (instructions, parent texts) in (0, 1): the trained IRM of Active
    Evol-Instruct, applied to rows of round `cfg.irm_from_round` and later."""
    cfg = cfg or EliminationParams()
    missing = [c for c in REQUIRED_COLUMNS if c not in instructions.columns]
    if missing:
        raise ValueError(f"instructions frame lacks columns {missing} (has {instructions.columns})")
    if instructions["id"].n_unique() != instructions.height:
        raise ValueError("instructions frame has duplicate ids")
    rows = [_Row(r) for r in instructions.to_dicts()]
    texts = parent_texts(parents)
    for row in rows:
        if row.record["parent_id"] not in texts:
            raise ValueError(
                f"instruction {row.record['id']!r}: parent {row.record['parent_id']!r} "
                "not in parents"
            )

    for row in rows:
        parent = texts[row.record["parent_id"]][1]
        for verdict in _text_verdicts(row.record, parent, cfg):
            row.apply(verdict)
            if not row.alive:
                break

    if irm is not None:
        alive = [r for r in rows if r.alive and r.record["round"] >= cfg.irm_from_round]
        if alive:
            scores = irm(
                [r.record["text"] for r in alive],
                [texts[r.record["parent_id"]][1] for r in alive],
            )
            if len(scores) != len(alive):
                raise RuntimeError(f"IRM returned {len(scores)} scores for {len(alive)} rows")
            for row, score in zip(alive, scores, strict=True):
                row.irm_score = score
                row.apply(low_instruction_reward(score, cfg.irm_threshold, cfg.irm_model or "IRM"))

    if cfg.sorry_rule or cfg.stopword_rule:
        alive = [row for row in rows if row.alive]
        tpl = load_template("answer_probe")
        sampling = cfg.probe_sampling.engine_params(seed=cfg.seed)
        requests = [
            ChatRequest(
                messages=tuple(tpl.messages(problem=row.record["text"])),
                sampling=sampling,
                template_version=tpl.version,
            )
            for row in alive
        ]
        for row, response in zip(alive, _generate(engine, requests), strict=True):
            if not response.ok or not response.completions:
                row.apply(Verdict(True, None, f"answer probe failed: {response.error}"))
                continue
            row.answer = response.completions[0].text
            row.answer_finish = response.completions[0].finish_reason
            if cfg.sorry_rule:
                row.apply(sorry_answer(row.answer, cfg.sorry_max_words))
            if cfg.stopword_rule and row.alive:
                row.apply(stopword_answer(row.answer))

    if cfg.equal_judge:
        alive = [row for row in rows if row.alive]
        tpl = load_template("judge_equal")
        requests = []
        for row in alive:
            pid = row.record["parent_id"]
            requests.append(
                ChatRequest(
                    messages=tuple(tpl.messages(first=texts[pid][1], second=row.record["text"])),
                    sampling=cfg.judge_sampling.engine_params(seed=cfg.seed),
                    json_schema=EQUAL_SCHEMA,
                    template_version=tpl.version,
                )
            )
        for row, response in zip(alive, _generate(engine, requests), strict=True):
            row.equal = _parsed(parse_equal_verdict, response)
            row.apply(no_information_gain(response))

    if cfg.solvable_judge:
        alive = [row for row in rows if row.alive]
        tpl = load_template("judge_solvable")
        requests = [
            ChatRequest(
                messages=tuple(tpl.messages(problem=row.record["text"])),
                sampling=cfg.judge_sampling.engine_params(seed=cfg.seed),
                json_schema=SOLVABLE_SCHEMA,
                template_version=tpl.version,
            )
            for row in alive
        ]
        for row, response in zip(alive, _generate(engine, requests), strict=True):
            row.solvable, row.solvable_reason = _parsed(parse_solvable, response) or (None, None)
            row.apply(not_solvable(response))

    kept_ids = [row.record["id"] for row in rows if row.alive]
    kept = instructions.filter(pl.col("id").is_in(kept_ids))
    eliminated = Eliminated.frame(
        [
            {
                **{c: row.record[c] for c in REQUIRED_COLUMNS},
                "rule": row.verdict.reason,
                "evidence": row.verdict.evidence,
            }
            for row in rows
            if not row.alive
        ],
        orient="row",
    )
    checks = EliminationCheck.frame(
        [
            {
                "id": row.record["id"],
                "rule": row.verdict.reason,
                "probe_answer": row.answer,
                "probe_finish_reason": row.answer_finish,
                "equal_verdict": row.equal,
                "solvable": row.solvable,
                "solvable_reason": row.solvable_reason,
                "notes": "; ".join(row.notes) if row.notes else None,
                "irm_score": row.irm_score,
            }
            for row in rows
        ],
        orient="row",
    )
    # Counts reconcile: every input row is in exactly one of the two outputs.
    assert kept.height + eliminated.height == instructions.height, "elimination lost rows"
    assert set(kept["id"]).isdisjoint(eliminated["id"]), "a row was both kept and eliminated"
    assert set(kept["id"]) | set(eliminated["id"]) == set(instructions["id"])
    return Elimination(kept=kept, eliminated=eliminated, checks=checks)


def eliminate(
    instructions: pl.DataFrame,
    parents: pl.DataFrame,
    engine: Engine,
    cfg: EliminationParams | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(kept, eliminated); `eliminate_with_checks` also returns the probe answers and judgments."""
    result = eliminate_with_checks(instructions, parents, engine, cfg)
    return result.kept, result.eliminated


@stage(
    name="eliminate",
    outputs={"elimination": Eliminated, "elimination_checks": EliminationCheck},
    shard=Shard("evolutions", lookups={"pool": ("parent_id", "id")}),
)
def eliminate_batch(
    ctx: StageContext,
    evolutions: pl.DataFrame,
    pool: pl.DataFrame,
    engine: EngineConfig,
    params: EliminationParams,
) -> StageOutput:
    """Drop failed evolutions (WizardLM's eliminator + math rules), each with rule and evidence."""
    irm = None
    if (
        params.irm_model is not None
        and evolutions.height
        and evolutions["round"].max() >= params.irm_from_round
    ):
        from infra.scoring import IrmScorer, resolve_checkpoint
        from tasks.evolution.instruction_reward import InstructionReward

        folder = resolve_checkpoint(params.irm_model, ctx.home)
        scorer = IrmScorer.cached(
            folder, params.irm_max_length, device=params.irm_device, dtype=params.irm_dtype
        )
        irm = InstructionReward(scorer).scores
    result = eliminate_with_checks(evolutions, pool, ctx.engine(engine), params, irm)
    by_rule = dict(result.eliminated.group_by("rule").len().iter_rows())
    stats = {
        "generated": evolutions.height,
        "eliminated": result.eliminated.height,
        "by_rule": by_rule,
    }
    if irm is not None:
        scored = result.checks["irm_score"].drop_nulls()
        stats["irm_scored"] = scored.len()
        stats["irm_mean_score"] = round(float(scored.mean()), 4) if scored.len() else None
    return StageOutput(
        {"elimination": result.eliminated, "elimination_checks": result.checks}, stats
    )
