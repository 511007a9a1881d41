"""The instruction eliminator: each rule on real-looking failed evolutions, then whole passes over
a batch with the scripted engine (batched calls, first failing rule wins, counts reconcile), and a
slow pass with the real embedded model."""

from __future__ import annotations

import json

import polars as pl
import pytest
from pydantic import ValidationError

from infra.engines.base import ChatRequest, ChatResponse, Completion, SamplingParams
from tasks.evolution.eliminate import (
    RULES,
    EliminationParams,
    Verdict,
    copies_prompt,
    eliminate,
    eliminate_with_checks,
    length_out_of_bounds,
    no_information_gain,
    no_question,
    not_solvable,
    parse_equal_verdict,
    parse_failed,
    parse_solvable,
    same_as_parent,
    sorry_answer,
    stopword_answer,
    template_copy_markers,
)
from tasks.evolution.evolve import (
    EvolutionMix,
    build_evolution_requests,
    draw_operations,
    make_instructions,
)
from tasks.evolution.records import Eliminated, EliminationCheck
from tasks.templates import load_template
from tests.fakes import ScriptedEngine, last_user_message

PARENT = "A train travels 60 miles per hour for 3 hours. How far does it travel?"
GOOD = (
    "A train travels 60 miles per hour for 3 hours, then 40 miles per hour for 2 more hours. "
    "How far does it travel in total?"
)


def _response(text: str) -> ChatResponse:
    return ChatResponse(completions=[Completion(text, "stop", len(text.split()))])


def _error(message: str = "RuntimeError: engine down") -> ChatResponse:
    return ChatResponse(completions=[], error=message)


# --- rules one by one --------------------------------------------------------------------------


def test_verdict_unpacks_like_a_tuple():
    keep, reason, evidence = parse_failed(None, "stop")
    assert (keep, reason) == (False, "parse_failed") and "no problem" in evidence
    assert parse_failed(GOOD, "stop") == Verdict(True, None, None)


def test_parse_failed():
    assert parse_failed("", "length").reason == "parse_failed"
    failed = parse_failed(None, "error", "TimeoutError: 120 s")
    assert not failed.keep and "TimeoutError: 120 s" in failed.evidence
    assert parse_failed(GOOD, "length").keep  # truncated but parsed: other rules judge it


@pytest.mark.parametrize(
    "evolution",
    [
        f"#Rewritten Prompt#: {GOOD}",
        f"{GOOD} (This is the #Rewritten Prompt#.)",
        f"In the given prompt the train stopped. {GOOD}",
        f"Unlike the original problem, the train changes speed. {GOOD}",
        f"Rewrite the given problem: {GOOD}",
        # The worked example of a template, returned instead of a new problem.
        "Tom has 3 apples and buys 5 more, then gives half of all his apples to his sister. "
        "How many apples does he have now?",
        # An instruction sentence of the template, copied into the problem.
        f"{GOOD} Add only about 10 to 20 words; do not make the problem verbose.",
        f"The new problem must be a clear, solvable math problem with exactly one final answer. "
        f"{GOOD}",
    ],
)
def test_copies_prompt_drops_echoes_of_the_evolving_prompt(evolution):
    verdict = copies_prompt(evolution)
    assert verdict.reason == "copies_prompt", evolution
    assert verdict.evidence


def test_copies_prompt_keeps_problems_and_takes_extra_phrases():
    assert copies_prompt(GOOD).keep
    assert copies_prompt("Given that $x + y = 10$ and $x - y = 2$, find $xy$.").keep
    assert copies_prompt("Solve the problem: what is the final answer to $2 + 2$?").keep
    assert copies_prompt(f"As an AI, {GOOD}", extra_phrases=["As an AI"]).reason == "copies_prompt"


def test_copy_markers_are_derived_from_the_templates():
    markers = template_copy_markers()
    assert "#rewritten prompt#" in markers.phrases and "given prompt" in markers.phrases
    assert ("add", "only", "about", "10", "to", "20", "words", "do") in markers.shingles
    # The templates' worked examples count as prompt text too.
    assert ("a", "bag", "holds", "4", "red", "and", "6", "blue") in markers.shingles
    assert not any("train" in shingle for shingle in markers.shingles)


@pytest.mark.parametrize(
    "problem",
    [
        "Find $x$.",
        r"Compute $\dbinom{8}{4}$.",
        "If $f(x) = 3x + 2$, what is $f(4)$.",
        "Let $a = 3$ and $b = 4$. Determine the hypotenuse of the right triangle with legs $a$, $b$.",
        "How many positive divisors does 36 have",
        "A shirt costs $20 and is on sale for 25% off. Express the sale price in dollars.",
        "Is 91 a prime number.",
        "Sam has 12 marbles and gives away 5. How many are left?",
        "Two numbers add up to 10 and differ by 2, so what is their product.",
        # MATH's habits: the ask word right after closing math, choices, a blank to fill.
        r"Pentagon $ABCDE$ has $AE = 1.$  Compute $(1 - \cos \angle B).$",
        r"The graph of \[2x^2 + y^2 = c\]is a point.Find $c.$",
        r"\begin{align*} x + y &= 3 \end{align*}Find $x.$",
        "Completely factor the following expression: $9x^2+3x$.",
        "The area is:\n" r"$\textbf{(A)}\ 2\qquad \textbf{(B)}\ 4$",
        "If $f(x) = 2x$, then $f(3)=$",
        "He is wondering what the number of legs of the whole collection is.",
        "If the tank is 18 inches tall, at what time will it be full.",
    ],
)
def test_no_question_keeps_questions_and_imperatives(problem):
    assert no_question(problem).keep, problem


@pytest.mark.parametrize(
    "statement",
    [
        "A train travels 60 miles per hour for 3 hours.",
        "Let $x = 3$ and $y = 4$.",
        "John has 5 apples and gives 2 of them to Mary.",
        "Tom wants to calculate his savings for the year.",
        "The sum of two consecutive integers is 41.",
    ],
)
def test_no_question_drops_statements(statement):
    verdict = no_question(statement)
    assert verdict.reason == "no_question"
    assert statement in verdict.evidence


def test_no_question_keeps_the_reference_problems(shared_data):
    math = pl.read_ndjson(shared_data / "math" / "train.jsonl")["problem"].head(3000)
    gsm8k = pl.read_ndjson(shared_data / "gsm8k" / "train.jsonl")["question"].head(3000)
    assert [p for p in math if not no_question(p).keep] == []
    # One GSM8K question states facts and never asks (its question was lost upstream).
    assert sum(not no_question(q).keep for q in gsm8k) <= 2


def test_length_out_of_bounds():
    assert length_out_of_bounds(GOOD).keep
    assert length_out_of_bounds(r"Compute $\dbinom{8}{4}$.", min_words=2).keep
    short = length_out_of_bounds("Find x.", min_words=3)
    assert short.reason == "length_out_of_bounds" and short.evidence.startswith(
        "too short: 2 words"
    )
    long = length_out_of_bounds(" ".join(["apples"] * 301) + "?", max_words=300)
    assert long.reason == "length_out_of_bounds" and long.evidence.startswith("too long: 301 words")
    assert not length_out_of_bounds("x" * 50 + "?", max_chars=40, min_words=1).keep


def test_sorry_answer():
    refusal = sorry_answer("I'm sorry, but I can't help with that.")
    assert refusal.reason == "sorry_answer" and "8-word answer" in refusal.evidence
    assert sorry_answer("Sorry, the problem does not give the speed.").reason == "sorry_answer"
    assert sorry_answer("Step 1: 60 * 3 = 180. The answer is: 180").keep
    # A long worked answer that happens to say sorry is not a refusal.
    long = "Sorry for the long answer. " + "We multiply the speed by the time. " * 15
    assert sorry_answer(long).keep
    assert sorry_answer("sorry " * 10, max_words=5).keep


@pytest.mark.parametrize("answer", ["the, of and .", "", "...", "It is what it is!", "Is it?  "])
def test_stopword_answer_drops_empty_talk(answer):
    assert stopword_answer(answer).reason == "stopword_answer"


@pytest.mark.parametrize("answer", ["180", "The answer is 180.", "x", "It is $x$."])
def test_stopword_answer_keeps_content(answer):
    assert stopword_answer(answer).keep


def test_equal_judge_parsing():
    assert parse_equal_verdict('{"verdict": "Equal"}') == "Equal"
    assert parse_equal_verdict('{"verdict": "Not Equal"}') == "Not Equal"
    assert parse_equal_verdict('```json\n{"Verdict": "not_equal"}\n```') == "Not Equal"
    assert parse_equal_verdict('Judgement: {"verdict": "EQUAL"} because ...') == "Equal"
    for bad in ("Equal", '{"verdict": "Maybe"}', '{"answer": "Equal"}', "{verdict: Equal}", "[]"):
        with pytest.raises(ValueError):
            parse_equal_verdict(bad)


def test_no_information_gain():
    dropped = no_information_gain(_response('{"verdict": "Equal"}'))
    assert dropped.reason == "no_information_gain"
    assert no_information_gain(_response('{"verdict": "Not Equal"}')) == Verdict(True, None, None)
    # A judge that fails keeps the instruction and says why.
    malformed = no_information_gain(_response("The two problems are the same"))
    assert malformed.keep and malformed.evidence.startswith("equal judge failed: no JSON object")
    failed = no_information_gain(_error())
    assert failed.keep and "engine down" in failed.evidence


def test_solvable_judge():
    assert parse_solvable('{"solvable": true, "reason": "all given"}') == (True, "all given")
    assert parse_solvable('{"solvable": "false"}') == (False, "")
    dropped = not_solvable(_response('{"solvable": false, "reason": "the speed is missing"}'))
    assert dropped == Verdict(False, "not_solvable", "solvable judge: the speed is missing")
    assert not_solvable(_response('{"solvable": true, "reason": "fine"}')).keep
    malformed = not_solvable(_response('{"solvable": "perhaps"}'))
    assert malformed.keep and "solvable judge failed" in malformed.evidence
    assert not_solvable(_error()).keep


def test_config_validates_bounds():
    with pytest.raises(ValidationError, match="min_words 50 > max_words 10"):
        EliminationParams(min_words=50, max_words=10)
    cfg = EliminationParams(probe_sampling={"max_tokens": 99}, judge_sampling={"max_tokens": 20})
    assert cfg.probe_sampling.max_tokens == 99 and cfg.judge_sampling.temperature == 0


# --- whole passes with the scripted engine -----------------------------------------------------

PROBE = load_template("answer_probe").version
EQUAL = load_template("judge_equal").version
SOLVABLE = load_template("judge_solvable").version

# Evolutions and what the scripted engine says about them, by a marker word in the text.
CASES = {
    "keep": (f"{GOOD} (keep)", None),
    "unparsed": (None, "parse_failed"),
    "copy": (f"#Rewritten Prompt#: {GOOD}", "copies_prompt"),
    "short": ("Why?", "length_out_of_bounds"),
    "statement": ("A train travels 60 miles per hour for 3 hours (statement).", "no_question"),
    "parent_copy": (PARENT.replace("travel?", "travel ?"), "no_information_gain"),
    "apology": (f"{GOOD} (apology)", "sorry_answer"),
    "stop": (f"{GOOD} (stop)", "stopword_answer"),
    "equal": (f"{GOOD} (equal)", "no_information_gain"),
    "unsolvable": (f"{GOOD} (unsolvable)", "not_solvable"),
    "judge_garbage": (f"{GOOD} (judge_garbage)", None),
    "probe_error": (f"{GOOD} (probe_error)", None),
}


def _reply(request: ChatRequest, _k: int) -> str:
    prompt = last_user_message(request)
    if request.template_version == PROBE:
        if "(apology)" in prompt:
            return "I'm sorry, but I can't help with that."
        if "(stop)" in prompt:
            return "the, of and ."
        if "(probe_error)" in prompt:
            raise RuntimeError("probe engine crashed")
        return "60 * 3 + 40 * 2 = 260. The answer is: 260"
    if request.template_version == EQUAL:
        assert request.json_schema is not None and PARENT in prompt
        if "(judge_garbage)" in prompt:
            return "These look equal to me!"
        return json.dumps({"verdict": "Equal" if "(equal)" in prompt else "Not Equal"})
    if request.template_version == SOLVABLE:
        assert request.json_schema is not None
        if "(judge_garbage)" in prompt:
            return '{"solvable": '
        if "(unsolvable)" in prompt:
            return json.dumps({"solvable": False, "reason": "the second speed has no unit"})
        return json.dumps({"solvable": True, "reason": "all quantities are given"})
    raise AssertionError(f"unexpected request: {prompt[:80]}")


def _instructions(cases: dict[str, tuple[str | None, str | None]]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "id": name,
                "parent_id": "p1",
                "root_id": "p1",
                "round": 1,
                "direction": "upward",
                "op": "add_constraints",
                "template_version": "abc",
                "model": "scripted",
                "text": text,
                "raw": text,
                "finish_reason": "stop",
                "error": None,
            }
            for name, (text, _) in cases.items()
        ]
    )


PARENTS = pl.DataFrame({"id": ["p1"], "question": [PARENT]})


def test_eliminate_applies_every_rule_once_and_reconciles():
    engine = ScriptedEngine(_reply)
    instructions = _instructions(CASES)
    result = eliminate_with_checks(instructions, PARENTS, engine, EliminationParams())
    kept, eliminated = result.kept, result.eliminated

    assert kept.height + eliminated.height == instructions.height
    assert kept.columns == instructions.columns  # kept rows pass through unchanged
    assert sorted(kept["id"]) == ["judge_garbage", "keep", "probe_error"]
    assert eliminated.schema == Eliminated.schema()
    got = dict(zip(eliminated["id"], eliminated["rule"], strict=True))
    assert got == {name: rule for name, (_, rule) in CASES.items() if rule}
    assert set(got.values()) == set(RULES)  # every rule fired on its own case
    assert eliminated["evidence"].null_count() == 0
    assert result.counts() == {"kept": 3} | dict.fromkeys(RULES, 1) | {"no_information_gain": 2}
    evidence = dict(zip(eliminated["id"], eliminated["evidence"], strict=True))
    assert evidence["parent_copy"] == "100% of its words match the parent (max 95%)"

    # Three batched engine calls: probe for the survivors of the cheap rules, then each judge
    # only for what is still alive.
    versions = [r.template_version for r in engine.calls]
    assert versions.count(PROBE) == 7  # 12 rows - 5 cheap drops
    assert versions.count(EQUAL) == 5  # - apology, stop
    assert versions.count(SOLVABLE) == 4  # - equal
    assert versions == sorted(versions, key=[PROBE, EQUAL, SOLVABLE].index)

    checks = {row["id"]: row for row in result.checks.to_dicts()}
    assert result.checks.schema == EliminationCheck.schema()
    assert list(checks) == list(CASES)
    assert checks["keep"]["probe_answer"].endswith("The answer is: 260")
    assert checks["keep"]["equal_verdict"] == "Not Equal" and checks["keep"]["solvable"] is True
    assert checks["keep"]["notes"] is None
    assert checks["equal"]["equal_verdict"] == "Equal" and checks["equal"]["rule"] == RULES[6]
    assert checks["unsolvable"]["solvable_reason"] == "the second speed has no unit"
    # Failures that kept the row are recorded, not lost.
    assert "equal judge failed" in checks["judge_garbage"]["notes"]
    assert "solvable judge failed" in checks["judge_garbage"]["notes"]
    assert "probe engine crashed" in checks["probe_error"]["notes"]
    assert checks["probe_error"]["probe_answer"] is None


def test_eliminate_with_rules_switched_off_makes_no_engine_calls():
    engine = ScriptedEngine(_reply)
    cfg = EliminationParams(
        sorry_rule=False, stopword_rule=False, equal_judge=False, solvable_judge=False
    )
    kept, eliminated = eliminate(_instructions(CASES), PARENTS, engine, cfg)
    assert engine.calls == []
    assert set(eliminated["rule"]) == {
        "parse_failed",
        "copies_prompt",
        "length_out_of_bounds",
        "no_question",
        "no_information_gain",  # the cheap word-for-word check needs no judge
    }
    assert kept.height == 7


def test_same_as_parent():
    assert same_as_parent(PARENT, PARENT.upper()).reason == "no_information_gain"
    # One number changed in a 15-word problem is still above 90% alike.
    nearly = PARENT.replace("3 hours", "4 hours")
    assert same_as_parent(PARENT, nearly, max_similarity=0.9).reason == "no_information_gain"
    assert same_as_parent(PARENT, nearly, max_similarity=0.95).keep
    assert same_as_parent(PARENT, GOOD).keep
    assert same_as_parent(PARENT, GOOD, max_similarity=0.0).reason == "no_information_gain"


def test_eliminate_skips_the_engine_when_nothing_survives():
    engine = ScriptedEngine(_reply)
    cases = {k: CASES[k] for k in ("unparsed", "copy", "short")}
    kept, eliminated = eliminate(_instructions(cases), PARENTS, engine)
    assert kept.height == 0 and eliminated.height == 3 and engine.calls == []


def test_eliminate_rejects_inconsistent_input():
    engine = ScriptedEngine(_reply)
    with pytest.raises(ValueError, match="lacks columns \\['root_id'\\]"):
        eliminate(_instructions(CASES).drop("root_id"), PARENTS, engine)
    doubled = pl.concat([_instructions(CASES)] * 2)
    with pytest.raises(ValueError, match="duplicate ids"):
        eliminate(doubled, PARENTS, engine)
    orphans = PARENTS.with_columns(pl.lit("p2").alias("id"))
    with pytest.raises(ValueError, match="parent 'p1' not in parents"):
        eliminate(_instructions({"keep": CASES["keep"]}), orphans, engine)


def test_evolve_then_eliminate_with_scripted_engine():
    """The round's plain functions chained: draw, request, parse, eliminate."""
    seeds = pl.DataFrame(
        {"id": ["s1", "s2", "s3"], "question": [PARENT, "Compute $3^4$.", "What is 15% of 80?"]}
    )

    def evolver(request: ChatRequest, k: int) -> str:
        if request.template_version in (PROBE, EQUAL, SOLVABLE):
            return _reply(request, k)
        problem = last_user_message(request).split("Problem:\n")[1].split("\n\n")[0]
        if "3^4" in problem:
            return "Sure! Here is the rewritten problem:"  # nothing after the heading
        return f"Rewritten problem: {problem.strip()} Give the answer in kilometers (keep)."

    engine = ScriptedEngine(evolver)
    draws = draw_operations(seeds["id"].to_list(), seed=1, round=1, mix=EvolutionMix())
    requests = build_evolution_requests(seeds, draws, SamplingParams(max_tokens=64), round=1)
    instructions = make_instructions(seeds, draws, engine.generate(requests), "scripted", round=1)
    kept, eliminated = eliminate(instructions, seeds, engine)
    assert kept.height == 2 and set(kept["parent_id"]) == {"s1", "s3"}
    assert eliminated.to_dicts()[0] | {"id": None, "op": None, "direction": None} == {
        "id": None,
        "parent_id": "s2",
        "root_id": "s2",
        "round": 1,
        "direction": None,
        "op": None,
        "text": None,
        "rule": "parse_failed",
        "evidence": "no problem in the evolver's output (stop)",
    }


# --- the real embedded model -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_round_with_the_embedded_model(model_home, monkeypatch):
    from infra.engines import EngineConfig, open_engine

    monkeypatch.setenv("EVOLFORGE_MODELS", str(model_home / "models"))
    seeds = pl.DataFrame(
        {
            "id": ["s1", "s2", "s3"],
            "question": [
                "Sam has 12 marbles and gives away 5. How many marbles does Sam have left?",
                "What is $3 \\times 4 + 2$?",
                "A rectangle is 8 cm long and 5 cm wide. What is its area?",
            ],
        }
    )
    engine = open_engine(EngineConfig(kind="embedded"), "evolution-test")
    draws = draw_operations(seeds["id"].to_list(), seed=0, round=1, mix=EvolutionMix())
    sampling = SamplingParams(temperature=0.7, max_tokens=64, seed=0)
    requests = build_evolution_requests(seeds, draws, sampling, round=1)
    responses = engine.generate(requests)
    instructions = make_instructions(seeds, draws, responses, engine.identity, round=1)
    assert instructions.height == 3
    assert set(instructions["finish_reason"]) <= {"stop", "length"}
    assert instructions["raw"].null_count() == 0

    cfg = EliminationParams(probe_sampling={"max_tokens": 48}, judge_sampling={"max_tokens": 32})
    result = eliminate_with_checks(instructions, seeds, engine, cfg)
    assert result.kept.height + result.eliminated.height == 3
    assert set(result.eliminated["rule"]) <= set(RULES)
    assert result.checks.height == 3

    # The judges on evolutions that pass every cheap rule (written here, so that all three reach
    # both judges whatever the small model evolved): the embedded engine constrains judge
    # replies to the JSON schema, so every row carries a parsed verdict, not a failure note.
    written = instructions.with_columns(
        pl.Series(
            "text",
            [
                "Sam has 12 marbles, gives away 5 and then finds 3 more. How many does he have?",
                "What is $3 \\times 4 + 2 \\times 5$?",
                "A rectangle is 8 cm long and 5 cm wide. What are its area and its perimeter?",
            ],
        )
    )
    judged = eliminate_with_checks(
        written,
        seeds,
        engine,
        EliminationParams(sorry_rule=False, stopword_rule=False, judge_sampling={"max_tokens": 32}),
    )
    checks = judged.checks.to_dicts()
    assert [row["equal_verdict"] in ("Equal", "Not Equal") for row in checks] == [True] * 3
    solvable_judged = [
        row for row in checks if row["rule"] in (None, "not_solvable")
    ]  # rows the equal judge dropped never reach the solvable judge
    assert all(isinstance(row["solvable"], bool) for row in solvable_judged)
    assert all(row["notes"] is None for row in checks), checks


# --- Active Evol-Instruct: a trained IRM as one more rule ----------------------------------------


def _rounds(texts_by_round: dict[str, tuple[int, str]]) -> pl.DataFrame:
    frame = _instructions({name: (text, None) for name, (_, text) in texts_by_round.items()})
    return frame.with_columns(pl.Series("round", [r for r, _ in texts_by_round.values()]))


def test_trained_irm_drops_low_scoring_evolutions_of_later_rounds():
    from tasks.evolution.eliminate import ALL_RULES, IRM_RULE

    asked = []

    def irm(texts, parents):
        asked.extend(zip(texts, parents, strict=True))
        return [0.2 if "vague" in t else 0.9 for t in texts]

    rows = _rounds(
        {
            "early_vague": (1, GOOD + " It is vague."),  # round 1: before irm_from_round
            "late_vague": (2, GOOD + " It is vague."),
            "late_good": (2, GOOD),
            "late_copy": (2, PARENT),  # dropped by a cheap rule first: never scored
        }
    )
    cfg = EliminationParams(
        sorry_rule=False, stopword_rule=False, equal_judge=False, solvable_judge=False,
        irm_model="irm_model@abc", irm_threshold=0.5, irm_from_round=2,
    )  # fmt: skip
    result = eliminate_with_checks(rows, PARENTS, ScriptedEngine(_reply), cfg, irm=irm)
    assert asked == [(GOOD + " It is vague.", PARENT), (GOOD, PARENT)]
    dropped = dict(zip(result.eliminated["id"], result.eliminated["rule"], strict=True))
    assert dropped == {"late_vague": IRM_RULE, "late_copy": "no_information_gain"}
    evidence = result.eliminated.filter(pl.col("id") == "late_vague")["evidence"][0]
    assert evidence == "IRM score 0.200 < threshold 0.500 (irm_model@abc)"
    scores = dict(zip(result.checks["id"], result.checks["irm_score"], strict=True))
    assert scores == {"early_vague": None, "late_vague": 0.2, "late_good": 0.9, "late_copy": None}
    assert result.counts() == {"kept": 2, "no_information_gain": 1, IRM_RULE: 1}
    assert IRM_RULE in ALL_RULES and IRM_RULE not in RULES


def test_irm_settings_enter_the_version_only_when_an_irm_is_set(tmp_path):
    plain = EliminationParams().fingerprint()
    assert "irm_model" not in plain and plain == EliminationParams(irm_threshold=0.9).fingerprint()
    with_ref = EliminationParams(irm_model="irm_model@abc").fingerprint()
    assert with_ref["irm_model"] == "irm_model@abc" and with_ref["irm_threshold"] == 0.5
    # The dtype changes scores, the device only where they are computed.
    assert with_ref["irm_dtype"] == "auto" and "irm_device" not in with_ref
    assert plain == EliminationParams(irm_device="cpu", irm_dtype="bfloat16").fingerprint()
    folder = tmp_path / "irm"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"v1")
    first = EliminationParams(irm_model=str(folder)).fingerprint()["irm_model"]
    (folder / "model.safetensors").write_bytes(b"v2")
    assert EliminationParams(irm_model=str(folder)).fingerprint()["irm_model"] != first


def test_eliminate_stage_scores_with_an_irm_checkpoint_from_the_models_view(
    evolforge_home, tmp_path, monkeypatch
):
    import infra.engines as engines
    from infra.engines import EngineConfig
    from storage.datasets import DatasetStore
    from storage.settings import home
    from tasks.evolution.combine import removed_rows
    from tasks.evolution.eliminate import IRM_RULE, eliminate_batch
    from tasks.evolution.funnel import round_funnel
    from tasks.training.common import BaseModelSpec
    from tasks.training.irm import IrmTrainParams, train_irm
    from tasks.training.sets import IrmSetParams, SplitParams, build_irm_set
    from tests.tasks.training.synthetic import write_all
    from tests.tasks.training.tiny import make_tiny_model

    monkeypatch.setattr(engines, "build_engine", lambda config: ScriptedEngine(_reply))
    store = DatasetStore(home())
    refs = write_all(store)
    irm_set = build_irm_set.run(
        irm_pairs=refs["irm_pairs"], instructions=refs["instructions"],
        split=SplitParams(test_fraction=0.0), params=IrmSetParams(),
    )["irm_set"]  # fmt: skip
    tiny = make_tiny_model(tmp_path / "tiny")
    irm = train_irm.run(
        irm_set=irm_set, base_model=BaseModelSpec(name=str(tiny)),
        params=IrmTrainParams(max_steps=1, max_length=128),
    )["irm_model"]  # fmt: skip
    evolutions = _rounds({"e1": (1, GOOD), "e2": (2, GOOD), "e3": (2, GOOD + " Round it.")})
    evo_ref = store.write("evolutions", evolutions, stage="t", code_version="t", params={}).ref
    pool = store.write(
        "pool", PARENTS.rename({"question": "text"}), stage="t", code_version="t", params={}
    ).ref
    quiet = dict(sorry_rule=False, stopword_rule=False, equal_judge=False, solvable_judge=False)
    # Threshold 1: every scored evolution (rounds >= 2) falls below it.
    params = EliminationParams(**quiet, irm_model=str(irm), irm_threshold=1.0, irm_from_round=2)
    result = eliminate_batch.run(
        evolutions=evo_ref, pool=pool, engine=EngineConfig(), params=params
    )
    eliminated = store.read(result["elimination"])
    assert sorted(eliminated["id"]) == ["e2", "e3"] and set(eliminated["rule"]) == {IRM_RULE}
    assert result.stats["irm_scored"] == 2 and 0 < result.stats["irm_mean_score"] < 1
    assert result.stats["by_rule"] == {IRM_RULE: 2}
    # The funnel counts the rule in its round.
    kept = evolutions.filter(pl.col("id") == "e1")
    funnel = round_funnel(evolutions, removed_rows(eliminated, eliminated.clear(), 2), kept)
    assert funnel.filter(pl.col("round") == 2)["eliminated_by_rule"][0] == f"{IRM_RULE}=2"
