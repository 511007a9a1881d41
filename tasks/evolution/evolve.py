"""Math Evol-Instruct: draw an evolution operation per instruction, ask a model to apply it, parse.

WizardMath's Reinforced Evol-Instruct grows a pool of math problems round by round. Each round
every parent problem is rewritten by one operation, drawn by a seeded generator from a
configurable mix (`EvolutionMix`):

- upward (WizardLM's depth evolution adapted to math): `add_constraints`, `concretize`,
  `increase_reasoning` - a harder problem that still has exactly one final answer, about 10 to
  20 words longer, keeping the original's LaTeX, numbers and tables;
- downward (WizardMath): `simplify` (an easier version of the same problem) and
  `new_easier_problem` (a new, easier problem on another topic).

Each operation is a prompt template file `tasks/prompts/evolve_<op>.txt`; its content hash is
the `template_version` stamped on every request (so it is part of the request-cache key) and on
every instruction it produced (lineage). A template is a system message, the rules with one
worked example (user, assistant), then the problem to evolve: the example shows small models the
reply format better than any wording does. Unlike WizardLM's depth prompt, the templates do not
quote the forbidden words ("#Rewritten Prompt#", "given prompt", ...): with them quoted and a
`#Given Problem#:` heading, SmolLM2-135M wrote "given prompt" or "given problem" into 7 of 12
evolutions in a trial run. The rule is stated without them and the eliminator's `copies_prompt`
still checks for them.

The functions here are plain and deterministic; the `evolve` stage at the end wraps them, and
tests call them directly:

    draws = draw_operations(parent_ids, seed=0, round=1, mix=EvolutionMix())
    requests = build_evolution_requests(parents, draws, sampling, round=1)
    responses = engine.generate(requests)
    instructions = make_instructions(parents, draws, responses, engine.identity, round=1)

A draw depends only on (seed, round, parent id, k): adding or removing parents never changes the
draws of the others, and a parent that failed elimination and went back into the pool gets a
fresh draw (and a fresh request seed) in the next round. Evolutions whose output could not be
parsed are kept as rows with `text` null; the eliminator records them as `parse_failed`, so no
evolution disappears without a reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from infra.engines import EngineConfig
from infra.engines.base import ChatRequest, ChatResponse, SamplingParams
from tasks.evolution.records import Evolution
from tasks.sampling import Sampling
from tasks.stage import Shard, StageContext, StageOutput, stage
from tasks.templates import Template, load_template

Direction = Literal["upward", "downward"]


@dataclass(frozen=True)
class Operation:
    direction: Direction
    template: str


OPERATIONS: dict[str, Operation] = {
    "add_constraints": Operation("upward", "evolve_add_constraints"),
    "concretize": Operation("upward", "evolve_concretize"),
    "increase_reasoning": Operation("upward", "evolve_increase_reasoning"),
    "simplify": Operation("downward", "evolve_simplify"),
    "new_easier_problem": Operation("downward", "evolve_new_easier_problem"),
}
UPWARD_OPS = tuple(op for op, spec in OPERATIONS.items() if spec.direction == "upward")
DOWNWARD_OPS = tuple(op for op, spec in OPERATIONS.items() if spec.direction == "downward")


class EvolutionMix(BaseModel):
    """How often each operation is drawn: P(op) = direction weight x op weight (normalised).

    Op weights left out of a direction's dict count as 0; the defaults are uniform.
    """

    # Direction weights
    upward: float = Field(0.5, ge=0, description="weight of upward (harder) evolution")
    downward: float = Field(0.5, ge=0, description="weight of downward (easier) evolution")
    # Operation weights within each direction
    upward_ops: dict[str, float] = Field(default_factory=lambda: dict.fromkeys(UPWARD_OPS, 1.0))
    downward_ops: dict[str, float] = Field(default_factory=lambda: dict.fromkeys(DOWNWARD_OPS, 1.0))

    @model_validator(mode="after")
    def _check(self) -> EvolutionMix:
        if self.upward + self.downward <= 0:
            raise ValueError("evolution mix: upward + downward must be > 0")
        for direction, ops, known in (
            ("upward", self.upward_ops, UPWARD_OPS),
            ("downward", self.downward_ops, DOWNWARD_OPS),
        ):
            for op, weight in ops.items():
                if op not in OPERATIONS:
                    raise ValueError(
                        f"evolution mix: unknown {direction} operation {op!r} "
                        f"(known: {', '.join(known)})"
                    )
                if op not in known:
                    raise ValueError(
                        f"evolution mix: {op!r} is a {OPERATIONS[op].direction} operation, "
                        f"not {direction} (known {direction}: {', '.join(known)})"
                    )
                if not weight >= 0:
                    raise ValueError(f"evolution mix: weight of {op!r} must be >= 0, got {weight}")
            if getattr(self, direction) > 0 and sum(ops.values()) <= 0:
                raise ValueError(
                    f"evolution mix: {direction} has weight {getattr(self, direction)} "
                    f"but its operation weights sum to 0"
                )
        return self

    def probabilities(self) -> dict[str, float]:
        """P(op) for every known operation, in `OPERATIONS` order; sums to 1."""
        raw = {}
        for direction, ops in (("upward", self.upward_ops), ("downward", self.downward_ops)):
            total = sum(ops.values())
            weight = getattr(self, direction)
            for op in OPERATIONS:
                if OPERATIONS[op].direction == direction:
                    raw[op] = weight * ops.get(op, 0.0) / total if total > 0 else 0.0
        norm = sum(raw.values())
        return {op: p / norm for op, p in raw.items()}


EvolverSampling = Sampling.defaults(
    "EvolverSampling",
    "The evolver's sampling; max_tokens limits an evolved problem.",
    temperature=0.7,
    top_p=0.95,
    max_tokens=256,
)


class EvolutionParams(BaseModel):
    """How instructions are evolved, round after round."""

    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(8, ge=0, le=64, description="evolution rounds (WizardMath: 8)")
    mix: EvolutionMix = Field(
        default_factory=EvolutionMix, description="how often each operation is drawn"
    )
    evolutions_per_parent: int = Field(
        1, ge=1, le=8, description="evolutions of each pool instruction per round"
    )
    max_pool: int | None = Field(
        None,
        ge=1,
        description="pool cap: past it a seeded sample is kept (with several evolutions "
        "per parent)",
    )
    seed: int = Field(0, description="seed of the operation draws and of the evolver's sampling")
    sampling: EvolverSampling = Field(
        default_factory=EvolverSampling, description="the evolver's sampling"
    )

    def fingerprint(self) -> dict:
        """What changes an evolution: everything but the number of rounds (round r's outputs
        are the same whether the run stops at r or goes on), so adding rounds reuses the
        earlier ones."""
        return self.model_dump(mode="json", exclude={"rounds"})


def _stable_int(*parts: object, bits: int = 64) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[: bits // 8], "big")


def draw_operations(
    parent_ids: Sequence[str],
    seed: int,
    round: int,
    mix: EvolutionMix,
    evolutions_per_parent: int = 1,
) -> list[tuple[str, str]]:
    """One `(parent_id, op)` per evolution, parents in the given order, k-th draws adjacent.

    Each parent's generator is seeded from (seed, round, parent_id) alone, so the draws of one
    parent do not depend on which other parents are in the batch.
    """
    if evolutions_per_parent < 1:
        raise ValueError(f"evolutions_per_parent must be >= 1, got {evolutions_per_parent}")
    dupes = [pid for pid, n in Counter(parent_ids).items() if n > 1]
    if dupes:
        raise ValueError(f"draw_operations: duplicate parent ids {dupes[:5]}")
    probs = mix.probabilities()
    ops = list(probs)
    cumulative = np.cumsum([probs[op] for op in ops])
    draws = []
    for pid in parent_ids:
        rng = np.random.default_rng(_stable_int(seed, round, pid))
        # side="right" so that an op with probability 0 (an empty interval) is never drawn.
        picks = np.searchsorted(
            cumulative, rng.random(evolutions_per_parent) * cumulative[-1], side="right"
        )
        draws.extend((pid, ops[min(int(i), len(ops) - 1)]) for i in picks)
    return draws


def evolution_id(parent_id: str, round: int, op: str, k: int = 0) -> str:
    """Deterministic short id of the k-th evolution of `parent_id` by `op` in `round`."""
    return f"r{round}-{hashlib.sha256(f'{parent_id}|{round}|{op}|{k}'.encode()).hexdigest()[:12]}"


def _numbered(draws: Sequence[tuple[str, str]]) -> list[tuple[str, str, int]]:
    """Attach k: the index of each draw among the draws of the same parent."""
    seen: Counter[str] = Counter()
    out = []
    for pid, op in draws:
        if op not in OPERATIONS:
            raise ValueError(f"unknown evolution operation {op!r} (known: {', '.join(OPERATIONS)})")
        out.append((pid, op, seen[pid]))
        seen[pid] += 1
    return out


def parent_texts(parents: pl.DataFrame) -> dict[str, tuple[str, str]]:
    """`id -> (root_id, text)` for a pool of seeds (`question`) or instructions (`text`)."""
    text_col = "text" if "text" in parents.columns else "question"
    missing = [c for c in ("id", text_col) if c not in parents.columns]
    if missing:
        raise ValueError(
            f"parents frame lacks columns {missing} (needs id and text or question; "
            f"has {parents.columns})"
        )
    roots = parents["root_id"] if "root_id" in parents.columns else parents["id"]
    out = {}
    for pid, root, text in zip(parents["id"], roots, parents[text_col], strict=True):
        if text is None or not str(text).strip():
            raise ValueError(f"parent {pid!r} has an empty {text_col}")
        out[pid] = (root if root is not None else pid, text)
    return out


def _lookup(parents: dict[str, tuple[str, str]], pid: str) -> tuple[str, str]:
    try:
        return parents[pid]
    except KeyError:
        raise ValueError(f"draw names parent {pid!r}, which is not in the parents frame") from None


def build_evolution_requests(
    parents: pl.DataFrame,
    draws: Sequence[tuple[str, str]],
    sampling: SamplingParams,
    *,
    round: int,
) -> list[ChatRequest]:
    """One chat request per draw, in order, rendered from the operation's template.

    The request seed is derived from `sampling.seed` and the evolution id, so two evolutions of
    one parent by the same op (k = 0, 1) and a re-drawn parent in a later round are distinct
    requests rather than two hits of the same cache entry.
    """
    if sampling.n != 1:
        raise ValueError(
            f"evolution sampling must have n=1 (got n={sampling.n}); "
            "use evolutions_per_parent for several evolutions of one parent"
        )
    texts = parent_texts(parents)
    templates: dict[str, Template] = {}
    requests = []
    for pid, op, k in _numbered(draws):
        _, problem = _lookup(texts, pid)
        name = OPERATIONS[op].template
        tpl = templates.get(name) or templates.setdefault(name, load_template(name))
        seed = _stable_int(sampling.seed, evolution_id(pid, round, op, k), bits=32) >> 1
        requests.append(
            ChatRequest(
                messages=tuple(tpl.messages(problem=problem)),
                sampling=dataclasses.replace(sampling, seed=seed),
                template_version=tpl.version,
            )
        )
    return requests


def make_instructions(
    parents: pl.DataFrame,
    draws: Sequence[tuple[str, str]],
    responses: Sequence[ChatResponse],
    model: str,
    *,
    round: int,
) -> pl.DataFrame:
    """The evolved instructions (`Evolution`), one row per draw, unparseable ones too."""
    if len(responses) != len(draws):
        raise ValueError(f"{len(responses)} responses for {len(draws)} draws")
    texts = parent_texts(parents)
    versions = {op: load_template(spec.template).version for op, spec in OPERATIONS.items()}
    rows = []
    for (pid, op, k), response in zip(_numbered(draws), responses, strict=True):
        root, _ = _lookup(texts, pid)
        row = {
            "id": evolution_id(pid, round, op, k),
            "parent_id": pid,
            "root_id": root,
            "round": round,
            "direction": OPERATIONS[op].direction,
            "op": op,
            "template_version": versions[op],
            "model": model,
        }
        if not response.ok or not response.completions:
            row |= {"text": None, "raw": None, "finish_reason": "error"}
            row["error"] = response.error or "engine returned no completion"
        else:
            completion = response.completions[0]
            row |= {
                "text": parse_evolution(completion.text),
                "raw": completion.text,
                "finish_reason": completion.finish_reason,
                "error": None,
            }
        rows.append(row)
    return Evolution.frame(rows, orient="row")


# ---------------------------------------------------------------------------------------------
# Parsing the evolver's reply. Instruct models, small ones especially, wrap the new problem in
# chatter ("Sure! Here's ..."), echo the prompt's headings, quote or fence it, and append an
# answer or an explanation of what they changed. The parser peels those layers off; whatever is
# left is judged by the eliminator, so the parser errs towards keeping text.

_INTERJECTION = r"(?:sure|certainly|of course|okay|ok|absolutely|great|alright|no problem)"
_HEADING_LABEL = (
    r"(?:the\s+)?"
    r"(?:(?P<input>given|original|initial|old)\s+|"
    r"(?P<output>rewrite|rewritten|new|revised|modified|simplified|simpler|easier|harder|evolved|updated|"
    r"improved|complex|concrete|concretized|final|more\s+(?:complex|difficult|challenging|"
    r"specific|concrete))\s+)?"
    r"(?:math\s+|word\s+)?(?:prompt|problem|question|version|instruction)"
)
# A heading at the start of a line: `#Rewritten Prompt#:`, `**Problem:**`, `### New problem`,
# `Rewritten problem:`. Without a colon it must be alone on its line.
_HEADING = re.compile(
    r"^[ \t>]*(?:#+[ \t]*)?(?:[*_]{1,2}[ \t]*)?#?(?P<label>" + _HEADING_LABEL + r")[ \t]*#?"
    r"[ \t]*(?:[*_]{1,2})?[ \t]*(?::|$)[ \t]*(?:[*_]{1,2}[ \t]*)?",
    re.IGNORECASE | re.MULTILINE,
)
# A bare adjective as a heading: "Original:", "**Rewritten:**".
_BARE_HEADING = re.compile(
    r"^[ \t>]*(?:[*_]{1,2}[ \t]*)?(?:(?P<input>original|given)|(?P<output>rewritten|revised|"
    r"modified|simplified|harder|easier|new))[ \t]*(?:[*_]{1,2})?[ \t]*:[ \t]*(?:[*_]{1,2}[ \t]*)?",
    re.IGNORECASE | re.MULTILINE,
)
# "Sure! Here's a harder version of the problem:" - a chatty heading ending in a colon.
_CHATTER_HEADING = re.compile(
    r"^[ \t]*(?:" + _INTERJECTION + r"\b[!,.]*[ \t]*)?"
    r"(?:here(?:'s|’s| is| are)|below is|this is|i(?:'ve|’ve| have) (?:rewritten|written|"
    r"created|made|come up with|revised|modified))\b[^\n:]*:[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
_CHATTER_LINE = re.compile(
    r"^[ \t]*(?:" + _INTERJECTION + r"|here you go|here it is)\b[^\n?]{0,60}$", re.IGNORECASE
)
_LEADING_INTERJECTION = re.compile(r"^" + _INTERJECTION + r"[!.,]+[ \t]*", re.IGNORECASE)
_SOLUTION_WORDS = re.compile(r"\b(?:solution|solve|answer|explanation|steps?)\b", re.IGNORECASE)
# Lines (after the first) where the problem ends and an answer or a comment begins.
_TRAILER_LINE = re.compile(
    r"^[ \t>]*(?:#+[ \t]*)?(?:[*_]{1,2}[ \t]*)?(?:"
    r"(?:the\s+)?(?:(?:final|correct)\s+)?answers?|(?:the\s+)?solutions?|replies|reply|explanation|reasoning|hints?|rationale|"
    r"verification|changes?(?:\s+made)?|step\s*\d+|steps"
    r")[ \t]*(?:[*_]{1,2})?[ \t]*[:.)\-]"
    r"|^[ \t>]*(?:"
    r"the (?:final |correct )?answer is|let'?s (?:solve|think|break|work|start|begin)|"
    r"let us (?:solve|think)|to solve (?:this|the)|we (?:can|will|first|start)\b|"
    r"this (?:rewritten|new|revised|modified|simplified|harder|easier|updated) "
    r"(?:problem|version|question)|this (?:version|problem) (?:adds|requires|now|is (?:harder|"
    r"easier|more))|in this (?:version|problem|rewrite)|i (?:added|changed|replaced|removed|"
    r"simplified|made|have)\b|\(?note\b[^\n]*\b(?:added|changed|rewr|original|version|easier|"
    r"harder|constraint)|####|"
    r"(?:here(?:'s|’s| is| are)|below is)\b[^\n]*\b(?:solution|solve|answer|explanation|steps?)\b"
    r")",
    re.IGNORECASE | re.MULTILINE,
)
# The same markers inside the problem's last line: "... does she have? Answer: 12".
_TRAILER_INLINE = re.compile(
    r"(?<=[?.!$)])[ \t]+(?:\*\*)?(?:Answer|Solution|Explanation|Final [Aa]nswer)(?:\*\*)?[ \t]*:"
    r"|(?<=[?.!$])[ \t]+(?:The (?:final )?answer is|Let's (?:think|solve))\b"
)
_FENCE = re.compile(r"```[A-Za-z0-9_+\-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_QUOTES = (('"', '"'), ("“", "”"), ("'", "'"), ("**", "**"), ("*", "*"), ("`", "`"))


def _strip_quotes(text: str) -> str:
    """Remove quotes, bold or backticks wrapped around the whole problem (repeatedly)."""
    text = text.strip()
    while True:
        for left, right in _QUOTES:
            if (
                len(text) > len(left) + len(right)
                and text.startswith(left)
                and text.endswith(right)
            ):
                text = text[len(left) : len(text) - len(right)].strip()
                break
        else:
            return text


def _after_headings(text: str) -> str:
    """The text after the last heading that introduces the new problem (if any).

    A named heading ("Rewritten problem:", "#The Given Prompt#:") counts anywhere; a bare
    "Problem:" or "Question:" only where nothing but chatter precedes it, because inside a
    problem "Question: how many ...?" introduces its last sentence, not a new problem.
    """
    cut, cut_input, last = None, None, 0
    headings = [*_HEADING.finditer(text), *_BARE_HEADING.finditer(text)]
    for m in sorted(headings, key=lambda m: m.start()):
        before = text[last : m.start()].strip()
        if (
            not (m.group("input") or m.group("output"))
            and before
            and not _CHATTER_LINE.match(before)
        ):
            continue
        last = m.end()
        if m.group("input"):
            cut_input = m.end()
        else:
            cut = m.end()
    for m in _CHATTER_HEADING.finditer(text):
        # "Here is the solution:" starts a trailer, not the problem.
        if not _SOLUTION_WORDS.search(m.group(0)) and (cut is None or m.end() > cut):
            cut = m.end()
    if cut is None and cut_input is not None:
        cut = cut_input  # only the input was echoed: keep it, the eliminator judges it
    return text[cut:] if cut is not None else text


def parse_evolution(text: str | None) -> str | None:
    """The new problem in an evolver's reply, or None when nothing usable is left."""
    if text is None:
        return None
    text = text.replace("\r\n", "\n").strip()
    if not text:
        return None
    fence = _FENCE.search(text)
    if fence:
        before = _after_headings(text[: fence.start()]).strip()
        # A problem put in a code block, or a code block (a solution) after the problem.
        inside = not before or _CHATTER_LINE.match(before)
        text = fence.group(1) if inside else text[: fence.start()]
    text = _after_headings(text).strip()
    lines = text.split("\n")
    while len(lines) > 1 and (_CHATTER_LINE.match(lines[0]) or not lines[0].strip()):
        lines.pop(0)
    text = "\n".join(lines).strip()
    text = _LEADING_INTERJECTION.sub("", text) if len(text.split()) > 3 else text
    first_break = text.find("\n")
    if first_break >= 0:
        m = _TRAILER_LINE.search(text, first_break + 1)
        if m:
            text = text[: m.start()]
    m = _TRAILER_INLINE.search(text)
    if m:
        text = text[: m.start()]
    text = _strip_quotes(text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if not re.search(r"[A-Za-z0-9]", text):
        return None
    return text


@stage(name="evolve", outputs={"evolutions": Evolution}, shard=Shard("pool"))
def evolve_batch(
    ctx: StageContext, pool: pl.DataFrame, round: int, engine: EngineConfig, params: EvolutionParams
) -> StageOutput:
    """Draw an operation per pool instruction and ask the engine for the evolved problem."""
    draws = draw_operations(
        pool["id"].to_list(), params.seed, round, params.mix, params.evolutions_per_parent
    )
    requests = build_evolution_requests(
        pool, draws, params.sampling.engine_params(seed=params.seed), round=round
    )
    llm = ctx.engine(engine)
    frame = make_instructions(pool, draws, llm.generate(requests), llm.identity, round=round)
    return StageOutput({"evolutions": frame}, {"parents": pool.height, "generated": frame.height})
