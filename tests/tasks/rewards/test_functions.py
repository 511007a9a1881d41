"""The trl reward function, called the way trl 1.16's GRPOTrainer calls reward functions:
keyword arguments prompts, completions, completion_ids, the dataset's other columns,
trainer_state, log_extra and log_metric."""

from __future__ import annotations

import json
import pickle
from collections import defaultdict

import pytest

from tasks.rewards.functions import (
    JudgeReward,
    JudgeRewardParams,
    completion_text,
    instruction_text,
)
from tests.fakes import ScriptedEngine, last_user_message
from tests.tasks.rewards.helpers import first_error_reply

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{q}\n\n### Response: Let's think step by step."
)


def judge(request, i):
    """Instruction grades by keyword; step judgments flag the first WRONG step."""
    text = last_user_message(request)
    if "Grade the math problem" in text:
        problem = text.split("Problem:\n", 1)[1]
        if "broken" in problem:
            return "no idea"
        score = 10 if "apples" in problem else 4
        return json.dumps(
            {"definition": score, "precision": score, "integrity": score, "reason": "x"}
        )
    if "<step_0>" in text:
        return first_error_reply(request, i)
    raise AssertionError(f"unexpected request: {text[:80]}")


class Trainer:
    """What GRPOTrainer passes besides prompts and completions."""

    def __init__(self):
        self.metrics = defaultdict(list)
        self.extra = defaultdict(list)

    def kwargs(self) -> dict:
        return {
            "trainer_state": object(),
            "log_extra": lambda column, values: self.extra[column].extend(values),
            "log_metric": lambda name, value: self.metrics[name].append(value),
        }


def conversation(q: str) -> list[dict]:
    return [
        {"role": "system", "content": "You are a math tutor."},
        {"role": "user", "content": ALPACA.format(q=q)},
    ]


def test_conversational_batch_as_grpo_calls_it():
    engine = ScriptedEngine(judge, identity="judge")
    reward = JudgeReward(engine=engine)
    trainer = Trainer()
    q1, q2 = "Tom has 3 apples and buys 2. How many?", "Compute 7 - 2."
    prompts = [conversation(q1)] * 2 + [conversation(q2)] * 2  # G = 2 generations per prompt
    completions = [
        [{"role": "assistant", "content": "Step 1: 3 + 2 = 5.\nThe answer is: 5"}],
        [{"role": "assistant", "content": "Step 1: 3 + 2 = 6 WRONG.\nThe answer is: 6"}],
        [{"role": "assistant", "content": "7 - 2 = 5.\nThe answer is: 5"}],
        [{"role": "assistant", "content": ""}],
    ]
    out = reward(
        prompts=prompts,
        completions=completions,
        completion_ids=[[1, 2]] * 4,
        answer=["5", "5", "5", "5"],  # an extra dataset column, passed through and ignored
        **trainer.kwargs(),
    )
    assert out == [pytest.approx(1.0), 0.0, pytest.approx(1 / 3), 0.0]
    assert reward.last["r_i"] == [pytest.approx(1.0)] * 2 + [pytest.approx(1 / 3)] * 2
    assert reward.last["r_a"] == [1.0, 0.0, 1.0, 0.0]
    # each distinct instruction judged once; the Alpaca wrapper was peeled off
    graded = [r for r in engine.calls if "Grade the math problem" in last_user_message(r)]
    assert len(graded) == 2 and q1 in last_user_message(graded[0]) + last_user_message(graded[1])
    assert "### Instruction" not in last_user_message(graded[0])
    # the empty completion is not sent to the step judge
    assert sum("<step_0>" in last_user_message(r) for r in engine.calls) == 3
    assert trainer.metrics["judge_reward/r_i"] == [pytest.approx((2 + 2 / 3) / 4)]
    assert trainer.metrics["judge_reward/r_a"] == [0.5]
    assert trainer.metrics["judge_reward/none"] == [0.0]
    assert trainer.extra["r_a"] == [1.0, 0.0, 1.0, 0.0]


def test_dataset_r_i_column_is_used_and_unjudgeable_is_none():
    engine = ScriptedEngine(judge)
    reward = JudgeReward(engine=engine)
    out = reward(
        prompts=["broken problem", "Tom has apples.", "broken problem"],
        completions=["1 + 1 = 2.\nThe answer is: 2"] * 3,
        r_i=[0.25, None, float("nan")],
    )
    assert out[0] == pytest.approx(0.25)  # from the column, no judge call for it
    assert out[1] == pytest.approx(1.0)
    assert out[2] is None  # NaN in the column: judged, and the judge's reply was unusable
    assert reward.last["r_i"][2] is None and reward.last["r_a"][2] == 1.0


def test_step_judge_failure_gives_none_not_zero():
    def reply(request, i):
        if "<step_0>" in last_user_message(request):
            raise RuntimeError("judge down")
        return judge(request, i)

    reward = JudgeReward(engine=ScriptedEngine(reply))
    assert reward(prompts=["Tom has 2 apples."], completions=["2 + 2 = 4."]) == [None]


def test_product_aggregation_and_params():
    reward = JudgeReward(
        engine=ScriptedEngine(judge), params=JudgeRewardParams(aggregation="product")
    )
    assert reward(prompts=["apples"], completions=["1 + 1 = 2.\n2 + 2 = 4."]) == [
        pytest.approx(1.0)
    ]


def test_text_helpers():
    assert instruction_text(conversation("What is 1 + 1?")) == "What is 1 + 1?"
    assert instruction_text("plain question") == "plain question"
    assert instruction_text([{"role": "user", "content": [{"type": "text", "text": "Q?"}]}]) == "Q?"
    assert completion_text([{"role": "assistant", "content": "A"}]) == "A"
    assert completion_text("A") == "A"


def test_named_and_picklable_for_trl():
    from trl.trainer.utils import get_callable_name

    from infra.engines import EngineConfig

    reward = JudgeReward(EngineConfig())
    assert get_callable_name(reward) == "judge_reward"
    again = pickle.loads(pickle.dumps(reward))
    assert again.judge == EngineConfig() and again._engine is None
    with pytest.raises(ValueError, match="needs a judge"):
        JudgeReward()
    with pytest.raises(ValueError, match="prompts vs"):
        JudgeReward(engine=ScriptedEngine(judge))(prompts=["a"], completions=[])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_judge_reward_with_the_embedded_model(evolforge_home, models_dir):
    from infra.engines import EngineConfig
    from tasks.rewards.step_judge import StepJudgeParams

    reward = JudgeReward(
        EngineConfig(kind="embedded"),
        JudgeRewardParams(
            reason_max_chars=16,
            instruction_sampling={"max_tokens": 64},
            steps=StepJudgeParams(sampling={"max_tokens": 64}),
        ),
    )
    trainer = Trainer()
    out = reward(
        prompts=[conversation("What is 2 + 3?")],
        completions=[[{"role": "assistant", "content": "2 + 3 = 5.\nThe answer is: 5"}]],
        **trainer.kwargs(),
    )
    assert len(out) == 1 and (out[0] is None or 0.0 <= out[0] <= 1.0)
    r_i, r_a = reward.last["r_i"][0], reward.last["r_a"][0]
    assert out[0] == (None if r_i is None or r_a is None else pytest.approx(r_i * r_a))
    assert reward.engine.stats["requests"] == 2
