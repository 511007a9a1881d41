"""The step judge: ProcessBench's first-error protocol, labels before / at / after, failures."""

from __future__ import annotations

import json

import polars as pl
import pytest

from tasks.rewards.judging import JudgeError
from tasks.rewards.segment import StepParams, segment_solutions_frame
from tasks.rewards.step_judge import (
    StepJudgeParams,
    first_error_schema,
    judge_labels,
    judge_solution_steps,
    parse_first_error,
    tagged_steps,
)
from tests.fakes import ScriptedEngine
from tests.tasks.rewards.helpers import (
    answers_frame,
    first_error_reply,
    instructions_frame,
    seeds_frame,
    solutions_frame,
)


def segmented() -> pl.DataFrame:
    frame, _ = segment_solutions_frame(
        solutions_frame(), answers_frame(), instructions_frame(), seeds_frame(), StepParams()
    )
    return frame


def test_parse_first_error():
    assert parse_first_error('{"reason": "x", "first_error_step": 2}', 4) == (2, "x")
    assert parse_first_error('{"reason": "fine", "first_error_step": -1}', 4) == (None, "fine")
    assert parse_first_error('Here: {"first_error_step": "1"}', 2) == (1, None)
    with pytest.raises(JudgeError, match=r"outside -1\.\.3"):
        parse_first_error('{"first_error_step": 4}', 4)
    with pytest.raises(JudgeError, match="must be an integer"):
        parse_first_error('{"first_error_step": "none"}', 4)
    with pytest.raises(JudgeError, match="no JSON object"):
        parse_first_error("step 2 is wrong", 4)


def test_labels_before_at_and_after_the_first_error():
    assert judge_labels(2, 5, True) == [True, True, False, None, None]
    assert judge_labels(None, 3, True) == [True, True, True]
    assert judge_labels(0, 2, True) == [False, None]
    assert judge_labels(None, 3, False) == [None, None, None]


def test_schema_bounds_the_index_by_the_step_count():
    schema = first_error_schema(3, 50)
    step = schema["properties"]["first_error_step"]
    assert (step["minimum"], step["maximum"]) == (-1, 2)
    assert schema["properties"]["reason"]["maxLength"] == 50


def test_tagged_steps_show_processbench_tags():
    assert (
        tagged_steps(["a = 1.\n", "b = 2."])
        == "<step_0>\na = 1.\n</step_0>\n\n<step_1>\nb = 2.\n</step_1>"
    )


def test_judge_labels_cot_solutions_with_a_scripted_judge():
    engine = ScriptedEngine(first_error_reply, identity="judge")
    frame = judge_solution_steps(segmented(), engine, StepJudgeParams())
    rows = {r["solution_id"]: r for r in frame.iter_rows(named=True)}
    assert "a:2" not in rows  # PoT is not judged
    assert rows["a:1"]["first_error"] == 0 and rows["a:1"]["judged"]
    assert rows["a:0"]["first_error"] is None and rows["a:0"]["judged"]
    assert rows["a:0"]["judge_model"] == "judge" and rows["a:0"]["template_version"]
    request = engine.calls[0]
    assert request.json_schema["properties"]["first_error_step"]["maximum"] >= 0


def test_a_failed_judgment_is_null_not_correct():
    def reply(request, i):
        if "6 WRONG" in request.messages[-1]["content"]:
            raise RuntimeError("timeout")
        return json.dumps({"reason": "ok", "first_error_step": 7})  # out of range for all

    engine = ScriptedEngine(reply)
    frame = judge_solution_steps(segmented(), engine, StepJudgeParams())
    assert not frame["judged"].any()
    assert frame["first_error"].null_count() == frame.height
    errors = dict(zip(frame["solution_id"], frame["error"], strict=True))
    assert errors["a:1"].startswith("engine error") and "outside" in errors["a:0"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_judge_steps_stage_with_the_embedded_model(evolforge_home, models_dir):
    from infra.engines import EngineConfig
    from storage.datasets import DatasetStore
    from tasks.rewards.step_judge import judge_steps

    store = DatasetStore(evolforge_home)
    frame = segmented().filter(pl.col("solution_id").is_in(["a:0", "a:1"]))
    ref = store.write("segmented_solutions", frame, stage="test", code_version="x", params={}).ref
    result = judge_steps.run(
        segmented_solutions=ref,
        judge=EngineConfig(kind="embedded"),
        params=StepJudgeParams(reason_max_chars=16, sampling={"max_tokens": 64}),
    )
    out = store.read(result["step_judgments"])
    assert out.height == 2 and result.stats["engine"]["requests"] == 2
    for row in out.iter_rows(named=True):
        if row["judged"]:
            assert row["first_error"] is None or 0 <= row["first_error"] < row["n_steps"]
        else:
            assert row["error"]
