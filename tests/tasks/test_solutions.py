"""SFT answers, CoT/PoT solutions with hybrid fallback, voting and difficulty by direction."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

import polars as pl
import pytest

from infra.engines.base import ChatRequest, Completion, SamplingParams
from tasks.solutions import (
    FALLBACK_SEED_OFFSET,
    SFT_SCHEMA,
    SOLUTION_SCHEMA,
    difficulty_by_direction,
    extract_program,
    sft_answers,
    vote_answers,
    write_solutions,
)
from tasks.templates import load_template, render_messages
from tasks.verify import VerifierPool
from tests.fakes import ScriptedEngine, last_user_message


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=1) as p:
        yield p


@dataclass
class FakeResult:
    stdout: str
    stderr_tail: str = ""
    exit_code: int | None = 0
    timed_out: bool = False
    killed_by_limit: str | None = None
    wall_s: float = 0.01
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class FakeSandbox:
    """Runs nothing: `print(<literal>)` prints the literal, `/ 0` fails, `while True` times out."""

    def __init__(self):
        self.programs: list[str] = []

    def run_many(self, programs: list[str]) -> list[FakeResult]:
        self.programs.extend(programs)
        out = []
        for code in programs:
            if "/ 0" in code:
                out.append(FakeResult("", "ZeroDivisionError: division by zero", exit_code=1))
            elif "while True" in code:
                out.append(FakeResult("", exit_code=None, timed_out=True, killed_by_limit="wall"))
            else:
                printed = re.findall(r"print\((.*)\)", code)
                out.append(FakeResult("".join(f"{ast.literal_eval(p)}\n" for p in printed)))
        return out


def _question(request: ChatRequest) -> str:
    text = last_user_message(request)
    return text.split("### Instruction:\n", 1)[1].split("\n\n### Response:", 1)[0]


def _is_pot(request: ChatRequest) -> bool:
    return last_user_message(request).rstrip().endswith("Let's write a program.")


SEEDS = pl.DataFrame(
    {
        "id": ["s1", "s2", "s3", "s4", "s5"],
        "source": ["gsm8k"] * 5,
        "question": ["Q1 add", "Q2 half", "Q3 never", "Q4 silent", "Q5 noref"],
        "answer": ["5", "\\frac{1}{2}", "10", "4", ""],
        "solution": ["..."] * 5,
        "subject": [None] * 5,
        "level": [None] * 5,
    },
    schema_overrides={"subject": pl.String, "level": pl.Int64},
)


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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Here:\n```python\nx = 2\nprint(x * 3)\n```\nDone.", "x = 2\nprint(x * 3)"),
        ("```python\nbad syntax (\n```\n```python\nprint(1)\n```", "print(1)"),
        ("```python\nprint(7)\n", "print(7)"),  # cut at the token limit, fence never closed
        (
            "Let me compute.\nimport math\nprint(math.factorial(4))",
            "import math\nprint(math.factorial(4))",
        ),
        ("```python\nanswer = 3 + 4\n```", "answer = 3 + 4\nprint(answer)"),
        ("```python\nx = 3\n```", None),  # no print and no answer variable
        ("The answer is 5.", None),
        (None, None),
    ],
)
def test_extract_program(text, expected):
    assert extract_program(text) == expected


def test_sft_answers_keeps_first_correct_sample(pool):
    def reply(request: ChatRequest, i: int) -> str:
        q, attempt = _question(request), request.sampling.seed
        if q == "Q1 add":
            return "Step 1: 2 + 3 = 5\nThe answer is: 5"
        if q == "Q2 half":  # wrong first, right (in another form) on the second try
            return "The answer is: 2" if attempt == 0 else "Half of one.\nThe answer is: 0.5"
        if q == "Q3 never":
            return "The answer is: 11"
        if q == "Q4 silent":
            return "I think it is four-ish."
        raise AssertionError(f"unexpected question {q}")

    engine = ScriptedEngine(reply, identity="scripted-sft")
    out = sft_answers(SEEDS, engine, samples_per_seed=3, pool=pool)
    assert out.schema == pl.Schema(SFT_SCHEMA)
    assert out.height == SEEDS.height
    rows = {r["seed_id"]: r for r in out.to_dicts()}
    assert rows["s1"] | {} == rows["s1"]
    assert (rows["s1"]["correct"], rows["s1"]["tries"], rows["s1"]["reason"]) == (
        True,
        1,
        "correct",
    )
    assert rows["s1"]["solution"].endswith("The answer is: 5")
    assert (rows["s2"]["correct"], rows["s2"]["tries"], rows["s2"]["predicted"]) == (True, 2, "0.5")
    assert (rows["s3"]["correct"], rows["s3"]["tries"], rows["s3"]["reason"]) == (
        False,
        3,
        "wrong_answer",
    )
    assert rows["s3"]["solution"] is None and rows["s3"]["predicted"] == "11"
    assert (rows["s4"]["reason"], rows["s4"]["predicted"], rows["s4"]["tries"]) == (
        "no_answer",
        None,
        3,
    )
    assert (rows["s5"]["reason"], rows["s5"]["tries"]) == ("no_reference", 0)
    assert set(out["model"]) == {"scripted-sft"}
    assert set(out["template_version"]) == {load_template("cot_fewshot").version}
    # Requests: 4 seeds on try 1, then only the unsolved ones (s2, s3, s4), then (s3, s4).
    assert len(engine.calls) == 4 + 3 + 2
    assert [c.sampling.seed for c in engine.calls] == [0] * 4 + [1] * 3 + [2] * 2


def test_sft_answers_records_engine_errors(pool):
    def reply(request, i):
        raise RuntimeError("backend down")

    out = sft_answers(SEEDS.head(2), ScriptedEngine(reply), samples_per_seed=2, pool=pool)
    assert out["reason"].to_list() == ["engine_error", "engine_error"]
    assert out["tries"].to_list() == [2, 2]
    assert not any(out["correct"])


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
    assert out.schema == pl.Schema(SOLUTION_SCHEMA)
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


def _solutions(rows: list[tuple[str, str, str | None]]) -> pl.DataFrame:
    counter: dict[str, int] = {}
    data = []
    for iid, kind, answer in rows:
        sample = counter.get(iid, 0)
        counter[iid] = sample + 1
        data.append(
            {"instruction_id": iid, "kind": kind, "sample": sample, "extracted_answer": answer}
        )
    return pl.DataFrame(data)


def test_vote_answers(pool):
    solutions = _solutions(
        [
            ("a", "cot", "\\frac{1}{2}"),
            ("a", "cot", "0.5"),
            ("a", "cot", "3"),
            ("a", "pot", "0.5"),
            ("a", "pot", "1/2"),
            ("a", "pot_fallback_cot", None),
            ("b", "cot", "4"),
            ("b", "cot", "5"),
            ("b", "pot", "6"),
            ("b", "pot", "6.0"),
            ("c", "cot", None),
            ("c", "pot", None),
            ("d", "cot", "9"),
            ("d", "cot", "9"),
        ]
    )
    answers, with_verdict = vote_answers(
        solutions, references={"a": "1/2", "b": "4", "c": "1"}, threshold=0.6, pool=pool
    )
    assert answers.height == 4  # every instruction gets a row
    assert with_verdict.height == solutions.height  # every sample keeps its row
    rows = {r["instruction_id"]: r for r in answers.to_dicts()}

    a = rows["a"]
    assert (a["answer"], a["n_samples"], a["n_answered"]) == ("\\frac{1}{2}", 6, 5)
    assert a["agreement"] == pytest.approx(4 / 6)
    assert a["difficulty"] == pytest.approx(1 - 4 / 6)
    assert a["group_sizes"] == [4, 1]
    assert (a["cot_answer"], a["pot_answer"], a["cot_pot_agreement"]) == (
        "\\frac{1}{2}",
        "0.5",
        True,
    )
    assert a["verified"] is True and a["reference_match"] is True

    b = rows["b"]
    assert b["answer"] == "6" and b["agreement"] == 0.5 and b["verified"] is False
    assert (b["cot_answer"], b["pot_answer"], b["cot_pot_agreement"]) == ("4", "6", False)
    assert b["reference_match"] is False

    c = rows["c"]
    assert (c["answer"], c["agreement"], c["verified"], c["cot_pot_agreement"]) == (
        None,
        0.0,
        False,
        None,
    )
    assert c["reference_match"] is False

    d = rows["d"]
    assert (d["agreement"], d["verified"], d["pot_answer"], d["cot_pot_agreement"]) == (
        1.0,
        True,
        None,
        None,
    )
    assert d["reference_match"] is None  # no reference for d

    verdicts = with_verdict.filter(pl.col("instruction_id") == "a")["verdict"].to_list()
    assert verdicts == [True, True, False, True, True, False]
    assert with_verdict.filter(pl.col("instruction_id") == "c")["verdict"].to_list() == [None, None]
    assert with_verdict.filter(pl.col("instruction_id") == "b")["verdict"].to_list() == [
        False,
        False,
        True,
        True,
    ]


def test_vote_answers_keeps_row_order_and_validates(pool):
    solutions = _solutions([("z", "cot", "1"), ("y", "cot", "2"), ("z", "pot", "1")])
    answers, with_verdict = vote_answers(solutions, pool=pool)
    assert answers["instruction_id"].to_list() == ["z", "y"]
    assert with_verdict["instruction_id"].to_list() == ["z", "y", "z"]
    assert with_verdict["verdict"].to_list() == [True, True, True]
    assert answers["reference_match"].to_list() == [None, None]
    with pytest.raises(ValueError, match="threshold"):
        vote_answers(solutions, threshold=1.5, pool=pool)


def test_difficulty_by_direction():
    instructions = pl.DataFrame(
        {
            "id": ["s", "u1", "u2", "d1", "u3", "x"],
            "parent_id": [None, "s", "s", "s", "u1", "s"],
            "round": [0, 1, 1, 1, 2, 1],
            "direction": [None, "upward", "upward", "downward", "upward", "downward"],
        }
    )
    answers = pl.DataFrame(
        {
            "instruction_id": ["s", "u1", "u2", "d1", "u3"],  # x was never solved
            "difficulty": [0.25, 0.5, 0.75, 0.0, 1.0],
        }
    )
    out = difficulty_by_direction(instructions, answers)
    rows = {(r["round"], r["direction"]): r for r in out.to_dicts()}
    assert set(rows) == {(1, "downward"), (1, "upward"), (2, "upward")}
    up = rows[(1, "upward")]
    assert (up["n_evolutions"], up["n_pairs"]) == (2, 2)
    assert up["mean_difficulty"] == pytest.approx(0.625)
    assert up["mean_parent_difficulty"] == pytest.approx(0.25)
    assert up["mean_delta"] == pytest.approx(0.375)
    down = rows[(1, "downward")]
    assert (down["n_evolutions"], down["n_pairs"], down["mean_delta"]) == (
        2,
        1,
        pytest.approx(-0.25),
    )
    assert rows[(2, "upward")]["mean_delta"] == pytest.approx(0.5)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_model_writes_cot_and_pot_solutions_in_the_real_sandbox(model_home, monkeypatch, pool):
    try:
        from infra.engines import EngineConfig, open_engine
        from infra.sandbox import Sandbox, isolation_available
    except ImportError as exc:
        pytest.skip(f"infra.engines / infra.sandbox not available yet: {exc}")
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
