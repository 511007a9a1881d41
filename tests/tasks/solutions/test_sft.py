"""SFT answers: the first correct sample per seed is kept, every seed gets a row with a reason."""

from __future__ import annotations

import polars as pl

from infra.engines.base import ChatRequest
from tasks.solutions.records import SftAnswer
from tasks.solutions.sft import sft_answers
from tasks.templates import load_template
from tests.fakes import ScriptedEngine, last_user_message


def _question(request: ChatRequest) -> str:
    text = last_user_message(request)
    return text.split("### Instruction:\n", 1)[1].split("\n\n### Response:", 1)[0]


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
    assert out.schema == SftAnswer.schema()
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
