"""Decoding modes and grading with the scripted engine: cot, pot, the hybrid's fallback paths
(program error, timeout, no output, no program), maj@k ties, multiple choice, engine failures,
the plan, and the sharded stage."""

from __future__ import annotations

import polars as pl
import pytest

import infra.engines as engines
from infra.engines import EngineConfig
from infra.engines.base import ChatRequest, Completion
from infra.sandbox import SandboxSettings
from tasks.evaluation.evaluate import (
    DecodingParams,
    evaluate_batch,
    evaluate_requests,
    instruction_text,
    mode_label,
    parse_mode,
    plan_requests,
    vote_letters,
)
from tasks.evaluation.models import ModelTarget
from tasks.records import BenchmarkItem
from tasks.templates import load_template
from tests.fakes import FakeResult, FakeSandbox, ScriptedEngine, last_user_message

EVAL_TEMPLATES = ["eval_alpaca_cot", "eval_alpaca_pot", "eval_chat_cot", "eval_chat_pot"]


def template_of(request: ChatRequest) -> str:
    return {load_template(t).version: t for t in EVAL_TEMPLATES}[request.template_version]


def item(bench: str, id: str, question: str, answer: str, choices=None) -> dict:
    return {
        "benchmark": bench,
        "id": id,
        "question": question,
        "answer": answer,
        "choices": choices,
        "subject": None,
        "level": None,
        "solution": None,
    }


def items(*rows: dict) -> pl.DataFrame:
    return BenchmarkItem.frame(list(rows))


def target(label: str = "m", fmt: str = "alpaca", model: str | None = None) -> ModelTarget:
    return ModelTarget(
        label=label, spec=label, model=model, identity=f"id-{label}", prompt_format=fmt
    )


class Sandbox(FakeSandbox):
    """FakeSandbox, plus: a program printing `print()` prints nothing."""

    def run_many(self, programs):
        out = []
        for code in programs:
            if "print()" in code:
                self.programs.append(code)
                out.append(FakeResult(""))
            else:
                out.extend(super().run_many([code]))
        return out


POT_REPLIES = {
    "ok": "```python\nprint(5)\n```",
    "error": "```python\nprint(1 / 0)\n```",
    "timeout": "```python\nwhile True:\n    pass\nprint(1)\n```",
    "no_output": "```python\nx = 5\nprint()\n```",
    "no_program": "I would rather explain it in words.",
}
FAILURES = {
    "error": "exit code 1: ZeroDivisionError: division by zero",
    "timeout": "timed out",
    "no_output": "printed nothing",
    "no_program": "no program in completion",
}


def run(frame: pl.DataFrame, reply, modes, sandbox=None, k: int = 4, models=None):
    engine = ScriptedEngine(reply)
    plan = plan_requests(frame, models or [target()], modes, k)
    out = evaluate_requests(plan, engine, sandbox or Sandbox(), DecodingParams())
    return out, engine


def test_cot_answers_are_extracted_and_graded():
    frame = items(
        item("toy", "1", "What is 2 + 3?", "5"), item("toy", "2", "What is 10 / 4?", "2.5")
    )
    replies = {"What is 2 + 3?": "2 + 3 = 5.\nThe answer is: 5", "What is 10 / 4?": "#### 3"}

    def reply(request, i):
        assert template_of(request) == "eval_alpaca_cot"
        assert request.sampling.temperature == 0 and request.sampling.n == 1
        return next(v for q, v in replies.items() if q in last_user_message(request))

    out, _ = run(frame, reply, ["cot"])
    assert out.select("item_id", "mode", "extracted_answer", "reference", "correct").rows() == [
        ("1", "cot", "5", "5", True),
        ("2", "cot", "3", "2.5", False),
    ]
    row = out.row(0, named=True)
    assert row["prompt_version"] == load_template("eval_alpaca_cot").version
    assert row["completion"].endswith("The answer is: 5")
    assert row["fallback"] is None and row["program"] is None
    assert row["completion_tokens"] > 0 and row["prompt_tokens"] > 0


def test_alpaca_prompt_is_wizardmath_and_chat_prompt_asks_for_a_box():
    frame = items(item("toy", "1", "What is 2 + 3?", "5"))
    seen = {}

    def reply(request, i):
        seen[template_of(request)] = request
        return "The answer is: 5"

    run(frame, reply, ["cot"], models=[target("a", "alpaca"), target("c", "chat")])
    alpaca = last_user_message(seen["eval_alpaca_cot"])
    assert alpaca == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nWhat is 2 + 3?\n\n### Response: Let's "
        "think step by step."
    )
    assert "### Instruction" in seen["eval_alpaca_cot"].sampling.stop[0]
    chat = last_user_message(seen["eval_chat_cot"])
    assert chat.startswith("What is 2 + 3?\n") and "\\boxed{}" in chat
    assert seen["eval_chat_cot"].sampling.stop == ()


def test_pot_runs_the_program_and_reads_its_output():
    frame = items(item("toy", "1", "What is 2 + 3?", "5"))
    sandbox = Sandbox()

    def reply(request, i):
        assert template_of(request) == "eval_alpaca_pot"
        assert last_user_message(request).endswith("### Response: Let's write a program.")
        return POT_REPLIES["ok"]

    out, _ = run(frame, reply, ["pot", "hybrid"], sandbox)
    assert out.select(
        "mode", "program", "program_output", "extracted_answer", "correct"
    ).rows() == [
        ("pot", "print(5)", "5\n", "5", True),
        ("hybrid", "print(5)", "5\n", "5", True),
    ]
    assert out["fallback"].to_list() == [None, False]
    assert out["program_error"].null_count() == 2


@pytest.mark.parametrize("failure", list(FAILURES))
def test_hybrid_falls_back_to_cot_when_the_program_gives_no_answer(failure):
    frame = items(item("toy", "1", "What is 2 + 3?", "5"))

    def reply(request, i):
        if template_of(request) == "eval_alpaca_pot":
            return POT_REPLIES[failure]
        return "2 + 3 = 5\nThe answer is: 5"

    out, engine = run(frame, reply, ["pot", "hybrid"])
    pot, hybrid = out.to_dicts()
    # pot alone: no answer is a wrong answer.
    assert pot["program_error"] == FAILURES[failure]
    assert pot["extracted_answer"] is None and pot["correct"] is False and pot["fallback"] is None
    # hybrid: the same program failure, answered by the greedy CoT.
    assert hybrid["program_error"] == FAILURES[failure]
    assert hybrid["fallback"] is True
    assert hybrid["fallback_completion"].endswith("The answer is: 5")
    assert hybrid["fallback_prompt_version"] == load_template("eval_alpaca_cot").version
    assert hybrid["extracted_answer"] == "5" and hybrid["correct"] is True
    assert hybrid["completion"] == POT_REPLIES[failure]  # the PoT attempt stays for audit
    assert hybrid["completion_tokens"] > pot["completion_tokens"]  # PoT + CoT tokens
    # The fallback is the cot mode's own request: PoT, PoT (deduplicated by the cache), CoT.
    assert [template_of(r) for r in engine.calls] == [
        "eval_alpaca_pot",
        "eval_alpaca_pot",
        "eval_alpaca_cot",
    ]


def test_hybrid_fallback_reuses_the_cot_request():
    frame = items(item("toy", "1", "What is 2 + 3?", "5"))

    def reply(request, i):
        return POT_REPLIES["error"] if template_of(request).endswith("pot") else "The answer is: 5"

    _, engine = run(frame, reply, ["cot", "hybrid"])
    cot_first, fallback = engine.calls[0], engine.calls[-1]
    assert template_of(fallback) == "eval_alpaca_cot"
    assert fallback.key("x") == cot_first.key("x")  # a request-cache hit in a real run


def test_maj_at_k_votes_and_ties_go_to_the_answer_sampled_first():
    frame = items(
        item("toy", "tie", "tie question", "3"),
        item("toy", "equiv", "equivalence question", "0.5"),
        item("toy", "none", "no answers", "1"),
    )
    samples = {
        "tie question": ["3", "4", "4", "3"],
        "equivalence question": ["2", "0.5", "1/2", "\\frac{1}{2}"],
        "no answers": [None, None, None, None],
    }

    def reply(request, i):
        assert request.sampling.temperature == 0.7 and request.sampling.n == 4
        answers = next(v for q, v in samples.items() if q in last_user_message(request))
        return f"The answer is: {answers[i]}" if answers[i] else "I am not sure."

    out, _ = run(frame, reply, ["maj@k"], k=4)
    rows = {r["item_id"]: r for r in out.to_dicts()}
    assert rows["tie"]["mode"] == "maj@4"
    assert rows["tie"]["samples"] == ["3", "4", "4", "3"]
    assert (rows["tie"]["extracted_answer"], rows["tie"]["agreement"]) == ("3", 0.5)
    assert rows["tie"]["correct"] is True
    assert rows["equiv"]["extracted_answer"] == "0.5" and rows["equiv"]["agreement"] == 0.75
    assert rows["equiv"]["completion"] == "The answer is: 0.5"  # the winner's first sample
    assert rows["none"]["extracted_answer"] is None and rows["none"]["correct"] is False


def test_vote_letters_ties_go_to_the_letter_sampled_first():
    assert vote_letters(["B", "A", "A", "B"]) == ("B", 0.5)
    assert vote_letters([None, "C", None, None]) == ("C", 0.25)
    assert vote_letters([None, None]) == (None, 0.0)


def test_multiple_choice_maps_answers_to_letters():
    choices = ["11", "12", "13", "14"]
    frame = items(
        item("mc", "text", "Pick twelve.", "B", choices),
        item("mc", "letter", "Pick thirteen.", "C", choices),
        item("mc", "wrong", "Pick eleven.", "A", choices),
    )
    cot = {
        "twelve": "Twelve is 12.\nThe answer is: 12",
        "thirteen": "It must be 13, so the correct option is (C).",
        "eleven": "The answer is (D)",
    }

    def reply(request, i):
        text = last_user_message(request)
        assert "Answer Choices: (A) 11 (B) 12 (C) 13 (D) 14" in text
        if template_of(request).endswith("pot"):
            return "```python\nprint(12)\n```"
        if request.sampling.n > 1:
            return ["The answer is: B", "The answer is: 11", "A", "The answer is: 11"][i]
        return next(v for q, v in cot.items() if q in text)

    out, _ = run(frame, reply, ["cot", "pot", "maj@4"])
    got = {
        (r["item_id"], r["mode"]): (r["raw_answer"], r["extracted_answer"], r["correct"])
        for r in out.to_dicts()
    }
    assert got[("text", "cot")] == ("12", "B", True)
    assert got[("letter", "cot")] == ("C", "C", True)
    assert got[("wrong", "cot")] == ("(D)", "D", False)
    assert got[("text", "pot")] == ("12", "B", True)  # the printed value names option B
    assert got[("wrong", "pot")] == ("12", "B", False)
    maj = out.filter((pl.col("mode") == "maj@4") & (pl.col("item_id") == "wrong")).row(
        0, named=True
    )
    assert maj["samples"] == ["B", "A", "A", "A"] and maj["extracted_answer"] == "A"
    assert maj["correct"] is True and maj["agreement"] == 0.75


def test_an_engine_failure_leaves_the_item_unjudged():
    frame = items(item("toy", "1", "What is 2 + 3?", "5"))

    def reply(request, i):
        raise RuntimeError("server went away")

    out, _ = run(frame, reply, ["cot", "pot", "hybrid"])
    assert out["correct"].to_list() == [None, None, None]
    assert all("server went away" in e for e in out["error"])
    assert out.filter(pl.col("mode") == "pot")["program_error"].to_list() == ["engine error"]


def test_a_truncated_completion_without_an_answer_is_wrong():
    frame = items(item("toy", "1", "What is 2 + 3?", "5"))

    def reply(request, i):
        return Completion(text="Let me think about", finish_reason="length", completion_tokens=512)

    out, _ = run(frame, reply, ["cot"])
    assert out.select("finish_reason", "extracted_answer", "correct").row(0) == (
        "length",
        None,
        False,
    )


def test_modes_parse_and_label():
    assert parse_mode("cot", 8) == ("cot", 1)
    assert parse_mode("maj@k", 8) == ("maj", 8)
    assert parse_mode("maj@16", 8) == ("maj", 16)
    assert mode_label("maj@k", 5) == "maj@5"
    for bad in ("cott", "maj@", "maj@0", "maj@-1"):
        with pytest.raises(ValueError, match="mode"):
            parse_mode(bad, 8)


def test_plan_has_one_row_per_model_item_and_mode_grouped_by_model():
    frame = items(item("toy", "1", "q1", "1"), item("toy", "2", "q2", "2"))
    plan = plan_requests(frame, [target("a"), target("b", "chat", "/m/b")], ["cot", "maj@k"], 3)
    assert plan.height == 2 * 2 * 2
    assert plan["id"].n_unique() == plan.height
    assert plan["model"].to_list() == ["a"] * 4 + ["b"] * 4
    assert set(plan["mode"]) == {"cot", "maj@3"}
    assert plan.filter(pl.col("mode") == "maj@3")["samples"].unique().to_list() == [3]
    b = plan.filter(pl.col("model") == "b").row(0, named=True)
    assert (b["engine_model"], b["prompt_format"], b["model_ref"]) == ("/m/b", "chat", "/m/b")
    with pytest.raises(ValueError, match="modes repeat"):
        plan_requests(frame, [target()], ["maj@k", "maj@3"], 3)


def test_instruction_text_lists_choices_like_mammoth():
    assert instruction_text("Q?", None) == "Q?"
    assert instruction_text("Q?", ["x", "y"]) == "Q?\nAnswer Choices: (A) x (B) y"


@pytest.fixture
def scripted_by_model(monkeypatch):
    """Each model path gets its own scripted engine: `good` answers 5, others answer 4."""
    built = {}

    def build(config):
        name = config.model or "base"

        def reply(request, i):
            if template_of(request).endswith("pot"):
                return "```python\nprint(5)\n```" if name == "good" else "no code"
            return "The answer is: 5" if name == "good" else "The answer is: 4"

        built[name] = ScriptedEngine(reply, identity=f"scripted:{name}")
        return built[name]

    monkeypatch.setattr(engines, "_build", build)
    engines._engines.clear()
    yield built
    engines._engines.clear()


def test_the_stage_shards_by_model_and_a_new_model_only_adds_shards(scripted_by_model):
    from storage.datasets import DatasetStore
    from storage.settings import home
    from tasks.evaluation.evaluate import plan_evaluation

    frame = items(*(item("toy", str(i), f"What is {i} + {5 - i}?", "5") for i in range(3)))
    store = DatasetStore(home())
    store.write("toy_items", frame, stage="test", code_version="t", params={})
    two = [target("base", "chat"), target("good", "alpaca", "good")]
    settings = {
        "engine": EngineConfig(),
        "decoding": DecodingParams(),
        "sandbox": SandboxSettings(workers=1),
    }
    toy = f"toy_items@{store.latest('toy_items').version}"
    plan = plan_evaluation.run(eval_items=toy, models=two, modes=["cot", "hybrid"], k=4)
    first = evaluate_batch.run(eval_requests=plan["eval_requests"], **settings)
    results = store.read(first["eval_results"])
    assert first.stats["shards"] == {"total": 2, "new": 2, "reused": 0}
    by_model = results.group_by("model").agg(pl.col("correct").sum()).sort("model").rows()
    assert by_model == [("base", 0), ("good", 6)]
    assert set(results["engine_identity"]) == {"scripted:base", "scripted:good"}
    assert (
        results.filter(pl.col("model") == "base")["fallback"].drop_nulls().to_list() == [True] * 3
    )
    three = [*two, target("other", "chat", "other")]
    plan = plan_evaluation.run(eval_items=toy, models=three, modes=["cot", "hybrid"], k=4)
    again = evaluate_batch.run(eval_requests=plan["eval_requests"], **settings)
    assert again.stats["shards"] == {"total": 3, "new": 1, "reused": 2}
    assert store.read(again["eval_results"]).height == 18


def test_a_folder_model_is_planned_by_identity_and_found_where_it_is(scripted_by_model, tmp_path):
    """The same folder at two places: one plan, one evaluate version (the second a cache hit);
    the rows hold its identity, never its path; the engine loads the folder of this run."""
    import json
    import shutil

    from storage.datasets import DatasetStore
    from storage.settings import home
    from tasks.evaluation.evaluate import plan_evaluation, shard_model
    from tasks.evaluation.models import ModelFolders, resolve_spec

    first = tmp_path / "a" / "good"
    first.mkdir(parents=True)
    (first / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    second = tmp_path / "b" / "good"
    shutil.copytree(first, second)
    store = DatasetStore(home())
    frame = items(*(item("toy", str(i), f"What is {i} + {5 - i}?", "5") for i in range(2)))
    store.write("toy_items", frame, stage="test", code_version="t", params={})
    toy = f"toy_items@{store.latest('toy_items').version}"
    settings = {
        "engine": EngineConfig(),
        "decoding": DecodingParams(),
        "sandbox": SandboxSettings(workers=1),
    }
    runs = []
    for folder in (first, second):
        target = resolve_spec(f"good={folder}", EngineConfig(), store=store)
        plan = plan_evaluation.run(eval_items=toy, models=[target], modes=["cot"], k=1)
        rows = store.read(plan["eval_requests"])
        assert str(tmp_path) not in json.dumps(rows.to_dicts())
        assert set(rows["model_ref"]) == {target.identity} and set(rows["engine_model"]) == {None}
        runs.append(
            (
                plan["eval_requests"],
                evaluate_batch.run(
                    eval_requests=plan["eval_requests"],
                    folders=ModelFolders.of([target]),
                    **settings,
                ),
            )
        )
    (plan_a, result_a), (plan_b, result_b) = runs
    assert plan_a == plan_b and result_a["eval_results"] == result_b["eval_results"]
    assert result_b.cached
    assert list(scripted_by_model) == [str(first)]  # the engine loaded this run's folder
    assert store.read(result_a["eval_results"])["correct"].to_list() == [False, False]
    with pytest.raises(ValueError, match="no local folder"):
        shard_model(store.read(plan_a), EngineConfig(), home())


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_real_model_on_five_items_of_every_benchmark(shared_data, pool):
    """The embedded SmolLM2 through every stage, cot and hybrid, on five items per benchmark."""
    from infra.sandbox import isolation_available
    from storage.datasets import DatasetStore
    from storage.settings import home
    from tasks.benchmarks import REGISTRY, benchmark_source
    from tasks.evaluation.evaluate import plan_evaluation
    from tasks.evaluation.items import load_eval_items
    from tasks.evaluation.models import resolve_specs
    from tasks.evaluation.scores import score_evaluation

    ok, why = isolation_available()
    if not ok:
        pytest.skip(f"sandbox isolation unavailable: {why}")
    engine = EngineConfig(kind="embedded", dtype="bfloat16")
    items = load_eval_items.run(
        benchmarks=[benchmark_source(name) for name in REGISTRY], limit=5, seed=0
    )
    models = resolve_specs(["base"], engine)
    plan = plan_evaluation.run(
        eval_items=items["eval_items"], models=models, modes=["cot", "hybrid"], k=4
    )
    result = evaluate_batch.run(
        eval_requests=plan["eval_requests"],
        engine=engine,
        decoding=DecodingParams(cot_max_tokens=48, pot_max_tokens=64),
        sandbox=SandboxSettings(workers=1),
    )
    store = DatasetStore(home())
    out = store.read(result["eval_results"])
    assert out.height == len(REGISTRY) * 5 * 2
    assert out["error"].null_count() == out.height  # the engine answered every request
    assert out["correct"].null_count() == 0  # and every answer was judged
    assert set(out["finish_reason"]) <= {"stop", "length"}
    assert (out["completion_tokens"] > 0).all() and (out["prompt_tokens"] > 0).all()
    hybrid = out.filter(pl.col("mode") == "hybrid").to_dicts()
    for row in hybrid:  # each program answered in the sandbox, or the CoT answered instead
        if row["fallback"]:
            assert row["program_error"] and row["fallback_completion"] is not None
        else:
            assert row["program_error"] is None and row["program_output"]
    choices = out.filter(pl.col("benchmark").is_in(["sat_math", "mmlu_stem"]))
    assert set(choices["extracted_answer"].drop_nulls()) <= set("ABCD")
    scores = store.read(
        score_evaluation.run(eval_results=result["eval_results"], eval_contamination=None)[
            "eval_scores"
        ]
    )
    assert scores.height == len(REGISTRY) * 2 and set(scores["n"]) == {5}
    print(out.select("benchmark", "mode", "extracted_answer", "reference", "correct", "fallback"))
    print(scores.select("benchmark", "mode", "accuracy", "ci_low", "ci_high", "fallback_rate"))
