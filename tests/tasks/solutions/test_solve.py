"""CoT/PoT solutions with hybrid fallback; the solve stage with the real model and sandbox."""

from __future__ import annotations

import polars as pl
import pytest

from infra.engines.base import ChatRequest, Completion, SamplingParams
from tasks.solutions.records import SampledSolution
from tasks.solutions.sft import sft_answers
from tasks.solutions.solve import FALLBACK_SEED_OFFSET, write_solutions
from tasks.solutions.voting import vote_answers
from tasks.templates import load_template, render_messages
from tests.fakes import FakeSandbox, ScriptedEngine, last_user_message
from tests.tasks.solutions.test_sft import SEEDS, _question


def _is_pot(request: ChatRequest) -> bool:
    return last_user_message(request).rstrip().endswith("Let's write a program.")


def test_templates_render_and_version():
    cot = load_template("cot_fewshot")
    assert cot.fields == {"instruction"}
    assert len(cot.version) == 12
    messages = render_messages("cot_fewshot", instruction="What is 6 * 7?")
    assert messages[0]["role"] == "system"
    assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * 3 + ["user"]
    assert messages[-1]["content"].startswith("Below is an instruction that describes a task.")
    assert (
        "### Instruction:\nWhat is 6 * 7?\n\n### Response: Let's think step by step."
        in (messages[-1]["content"])
    )
    assert all("The answer is: " in m["content"] for m in messages if m["role"] == "assistant")
    pot = render_messages("pot", instruction="x")
    assert all("```python" in m["content"] for m in pot if m["role"] == "assistant")
    with pytest.raises(KeyError, match="missing fields"):
        load_template("pot").render()
    with pytest.raises(FileNotFoundError, match="no prompt template"):
        load_template("does_not_exist")


INSTRUCTIONS = pl.DataFrame(
    {
        "id": ["i1", "i2", "i3"],
        "parent_id": [None, "i1", "i1"],
        "root_id": ["i1", "i1", "i1"],
        "round": [0, 1, 1],
        "direction": [None, "upward", "downward"],
        "op": [None, "add_constraints", "simplify"],
        "template_version": ["t"] * 3,
        "model": ["m"] * 3,
        "text": ["easy question", "hard question", "broken question"],
    }
)


def solution_reply(request: ChatRequest, i: int) -> str | Completion:
    q = _question(request)
    fallback = request.sampling.seed >= FALLBACK_SEED_OFFSET
    if _is_pot(request):
        if q == "easy question":
            return "```python\nprint(12)\n```"
        if q == "hard question":
            return ["```python\nprint('1/2')\n```", "```python\nx = 1 / 0\nprint(x)\n```"][i % 2]
        return [
            "no code at all",
            "```python\nwhile True:\n    pass\nprint(1)\n```",
            "```python\nx = 1\n```",
        ][i % 3]
    if fallback:
        return f"Fallback thinking.\nThe answer is: {7 if q == 'broken question' else 0.5}"
    if q == "easy question":
        return "The answer is: 12"
    if q == "hard question":
        return ["The answer is: \\frac{1}{2}", "The answer is: 3"][i % 2]
    if i == 2:
        return Completion(text="The answer is: 7 but", finish_reason="length", completion_tokens=9)
    return "The answer is: 7"


def test_write_solutions_hybrid_fallback():
    engine = ScriptedEngine(solution_reply, identity="scripted-sol")
    sandbox = FakeSandbox()
    out = write_solutions(INSTRUCTIONS, engine, sandbox, k_cot=3, k_pot=3)
    assert out.schema == SampledSolution.schema()
    assert out["id"].n_unique() == out.height and out["id"][0] == f"{out['instruction_id'][0]}:0"
    # Every sample slot has a row: 3 instructions x (3 + 3).
    assert out.height == 18
    per = out.group_by("instruction_id").len().sort("instruction_id")
    assert per["len"].to_list() == [6, 6, 6]
    assert out.filter(pl.col("instruction_id") == "i1")["sample"].to_list() == list(range(6))

    easy = out.filter(pl.col("instruction_id") == "i1")
    assert easy["kind"].to_list() == ["cot"] * 3 + ["pot"] * 3
    assert easy["extracted_answer"].to_list() == ["12"] * 6
    assert easy.filter(pl.col("kind") == "pot")["program_stdout"].to_list() == ["12\n"] * 3

    hard = out.filter(pl.col("instruction_id") == "i2", pl.col("sample") >= 3)
    assert hard["kind"].to_list() == ["pot", "pot_fallback_cot", "pot"]
    failed = hard.row(1, named=True)
    assert failed["program"] == "x = 1 / 0\nprint(x)"
    assert failed["program_error"].startswith("exit code 1: ZeroDivisionError")
    assert failed["extracted_answer"] == "0.5"  # from the fallback CoT
    assert failed["text"].startswith("Fallback thinking.")

    broken = out.filter(pl.col("instruction_id") == "i3", pl.col("sample") >= 3)
    assert broken["kind"].to_list() == ["pot_fallback_cot"] * 3
    assert broken["program_error"].to_list() == [
        "no program in completion",
        "timed out",
        "no program in completion",
    ]
    assert broken["extracted_answer"].to_list() == ["7"] * 3
    cot3 = out.filter(pl.col("instruction_id") == "i3", pl.col("kind") == "cot")
    assert cot3["finish_reason"].to_list() == ["stop", "stop", "length"]
    # Only extracted programs reach the sandbox: 3 (i1) + 3 (i2) + 1 (i3, the loop).
    assert len(sandbox.programs) == 7
    # One fallback request per instruction that needed one, asking for as many samples.
    fallbacks = [c for c in engine.calls if c.sampling.seed >= FALLBACK_SEED_OFFSET]
    assert sorted(c.sampling.n for c in fallbacks) == [1, 3]


def test_write_solutions_without_fallback_and_engine_errors():
    def reply(request, i):
        if _question(request) == "broken question":
            raise RuntimeError("boom")
        return solution_reply(request, i)

    out = write_solutions(INSTRUCTIONS, ScriptedEngine(reply), FakeSandbox(), 2, 2, fallback=False)
    assert out.height == 12
    assert "pot_fallback_cot" not in out["kind"].to_list()
    broken = out.filter(pl.col("instruction_id") == "i3")
    assert broken["finish_reason"].to_list() == ["error"] * 4
    assert broken["text"].null_count() == 4
    assert broken.filter(pl.col("kind") == "pot")["program_error"].to_list() == ["engine error"] * 2
    with pytest.raises(ValueError, match="k_cot"):
        write_solutions(INSTRUCTIONS, ScriptedEngine(reply), FakeSandbox(), 0, 0)
    with pytest.raises(ValueError, match="missing columns"):
        write_solutions(INSTRUCTIONS.drop("text"), ScriptedEngine(reply), FakeSandbox())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_model_writes_cot_and_pot_solutions_in_the_real_sandbox(model_home, monkeypatch, pool):
    from infra.engines import EngineConfig, open_engine
    from infra.sandbox import Sandbox, isolation_available

    ok, why = isolation_available()
    if not ok:
        pytest.skip(f"sandbox isolation unavailable: {why}")
    monkeypatch.setenv("EVOLFORGE_MODELS", str(model_home / "models"))
    seeds = SEEDS.head(2).with_columns(
        pl.Series("question", ["What is 2 + 3?", "What is 10 divided by 4?"]),
        pl.Series("answer", ["5", "2.5"]),
    )
    instructions = seeds.select("id", pl.col("question").alias("text"))
    sampling = SamplingParams(temperature=0.7, max_tokens=128, seed=1)
    engine = open_engine(EngineConfig(kind="embedded"), "solutions-test")
    sft = sft_answers(seeds, engine, samples_per_seed=1, sampling=sampling, pool=pool)
    with Sandbox(workers=1) as sandbox:
        out = write_solutions(
            instructions,
            engine,
            sandbox,
            k_cot=1,
            k_pot=1,
            cot_sampling=sampling,
            pot_sampling=sampling,
        )
    assert sft.height == 2 and sft["tries"].to_list() == [1, 1]
    assert set(sft["reason"]) <= {"correct", "wrong_answer", "no_answer", "unjudged"}
    assert out.height == 4  # 2 instructions x (1 CoT + 1 PoT)
    assert out.filter(pl.col("kind") == "cot").height == 2
    assert out["text"].null_count() == 0
    pot = out.filter(pl.col("sample") == 1).to_dicts()
    # Whatever the small model wrote, each PoT slot either printed an answer in the sandbox or
    # says why not and fell back to CoT.
    for row in pot:
        if row["kind"] == "pot":
            assert row["program_error"] is None and row["extracted_answer"] is not None
        else:
            assert row["kind"] == "pot_fallback_cot" and row["program_error"]
    print(out.select("instruction_id", "kind", "program_error", "extracted_answer"))
    answers, _ = vote_answers(out, references={"s1": "5", "s2": "2.5"}, pool=pool)
    assert answers.height == 2
