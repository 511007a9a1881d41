"""r = rI · rA as one trl reward function: called as GRPOTrainer calls it (and inside a real
GRPO step), rI once per prompt, rA the weakest step, fallbacks, the gate, separate logging."""

from __future__ import annotations

import pytest

from tasks.rewards.functions import instruction_text
from tasks.training import formats
from tasks.training.reward import CUT, InstructionAnswerReward


def lines(text: str) -> list[str]:
    """A stand-in segmenter for these tests: one step per line, whitespace kept."""
    return text.splitlines(keepends=True)


class FakeIrm:
    """Scores by instruction; counts what it was asked."""

    def __init__(self, scores: dict[str, float]):
        self.table = scores
        self.calls: list[tuple[str, str | None]] = []

    def scores(self, instructions, parents):
        self.calls.extend(zip(instructions, parents, strict=True))
        return [self.table[i] for i in instructions]


class FakePrm:
    """P(correct) 0.2 for a step containing 'wrong', None for 'cut', else 0.9."""

    def __init__(self):
        self.calls = []

    def step_probabilities(self, prompts, steps):
        self.calls.append((list(prompts), [list(s) for s in steps]))
        return [
            [0.2 if "wrong" in s else (None if "cut" in s else 0.9) for s in ss] for ss in steps
        ]


class FakeJudge:
    def instruction_rewards(self, instructions):
        return [0.5 for _ in instructions]

    def answer_rewards(self, instructions, texts):
        return [None if "?" in t else 1.0 for t in texts]


PROMPTS = [formats.alpaca_prompt("What is 2 + 3?"), formats.alpaca_prompt("What is 2 + 3 + 4?")]


def grpo_call(reward, prompts, completions, columns):
    """Exactly the keyword arguments trl 1.16's GRPOTrainer._calculate_rewards passes."""
    metrics: dict[str, list[float]] = {}
    extra: dict[str, list] = {}
    out = reward(
        prompts=prompts,
        completions=completions,
        completion_ids=[[1, 2]] * len(completions),
        trainer_state=object(),
        log_extra=lambda column, values: extra.setdefault(column, []).extend(values),
        log_metric=lambda name, value: metrics.setdefault(name, []).append(value),
        **columns,
    )
    return out, metrics, extra


def test_r_is_irm_times_weakest_step_once_per_prompt():
    irm = FakeIrm({"What is 2 + 3?": 0.8, "What is 2 + 3 + 4?": 0.5})
    prm = FakePrm()
    reward = InstructionAnswerReward(irm=irm, prm=prm, segmenter=lines)
    # num_generations = 2: each prompt repeated, as GRPO repeats them.
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    completions = [
        "\nStep 1: 2 + 3 = 5.\nThe answer is: 5",
        "\nStep 1: wrong.\nThe answer is: 6",
        "\nStep 1: 2 + 3 = 5.\nStep 2: 5 + 4 = 9.\nThe answer is: 9",
        "   ",
    ]
    columns = {
        "instruction": [
            "What is 2 + 3?",
            "What is 2 + 3?",
            "What is 2 + 3 + 4?",
            "What is 2 + 3 + 4?",
        ],
        "parent": [None, None, "What is 2 + 3?", "What is 2 + 3?"],
        "label": ["5", "5", "9", "9"],
        "r_i": [0.1, 0.1, 0.1, 0.1],  # the judge's rI is ignored when an IRM is given
    }
    r, metrics, extra = grpo_call(reward, prompts, completions, columns)
    assert r == pytest.approx([0.8 * 0.9, 0.8 * 0.2, 0.5 * 0.9, 0.0])  # empty completion: 0
    assert irm.calls == [("What is 2 + 3?", None), ("What is 2 + 3 + 4?", "What is 2 + 3?")]
    # The PRM reads the prompt and the completion's steps (whitespace kept), empty ones skipped.
    ((prm_prompts, prm_steps),) = prm.calls
    assert prm_prompts == prompts[:3] and prm_steps[0] == [
        "\n",
        "Step 1: 2 + 3 = 5.\n",
        "The answer is: 5",
    ]
    assert metrics["rI"] == [pytest.approx(0.65)] and metrics["rA"] == [pytest.approx(0.5)]
    assert extra["rI"] == [0.8, 0.8, 0.5, 0.5] and extra["rA"] == pytest.approx(
        [0.9, 0.2, 0.9, 0.0]
    )
    # A second batch with the same prompts does not ask the IRM again.
    grpo_call(reward, prompts[:2], completions[:2], {k: v[:2] for k, v in columns.items()})
    assert len(irm.calls) == 2


def test_without_models_the_judge_and_the_r_i_column_fill_in():
    reward = InstructionAnswerReward(judge=FakeJudge(), segmenter=lines)
    r, metrics, _ = grpo_call(
        reward,
        [PROMPTS[0], PROMPTS[1]],
        ["The answer is: 5", "maybe 9?"],
        {"r_i": [0.7, None], "instruction": ["What is 2 + 3?", "What is 2 + 3 + 4?"]},
    )
    # rI: the column where it has a value, the judge where not; rA None = could not judge.
    assert r == [pytest.approx(0.7), None]
    assert reward.last["r_i"] == [0.7, 0.5] and metrics["rA"] == [1.0]
    # Neither an IRM, a value in the column nor a judge: None, or the configured default.
    bare = InstructionAnswerReward(prm=FakePrm(), segmenter=lines)
    r, _, _ = grpo_call(bare, PROMPTS, ["ok", "ok"], {"r_i": [0.7, None]})
    assert r == [pytest.approx(0.7 * 0.9), None]
    neutral = InstructionAnswerReward(prm=FakePrm(), segmenter=lines, r_i_default=1.0)
    r, _, _ = grpo_call(neutral, PROMPTS, ["ok", "ok"], {"r_i": [0.7, None]})
    assert r == [pytest.approx(0.7 * 0.9), pytest.approx(0.9)]
    with pytest.raises(ValueError, match="PRM or a judge"):
        InstructionAnswerReward(irm=FakeIrm({}))


def test_unscorable_steps_and_missing_columns():
    reward = InstructionAnswerReward(
        irm=FakeIrm({"What is 2 + 3?": 1.0}), prm=FakePrm(), segmenter=lines
    )
    # Without the rl_prompts columns the instruction is read out of the Alpaca prompt.
    assert instruction_text(PROMPTS[0]) == "What is 2 + 3?"
    r, metrics, extra = grpo_call(reward, [PROMPTS[0]] * 3, ["cut\ncut", "ok\ncut", "ok\nok"], {})
    # A step without a score makes rA unknown, never the min over the steps that were scored.
    assert r == [None, None, pytest.approx(0.9)]
    assert extra["rA"] == [None, None, pytest.approx(0.9)] and metrics["rA_cut"] == [2.0]
    assert reward.last["r_a_unscored"] == [CUT, CUT, None] and reward.unscored == {CUT: 2}


def test_correctness_gate(pool):
    reward = InstructionAnswerReward(
        irm=FakeIrm({"What is 2 + 3?": 1.0}),
        prm=FakePrm(),
        segmenter=lines,
        gate=True,
        verifier=pool,
    )
    r, metrics, _ = grpo_call(
        reward,
        [PROMPTS[0]] * 3,
        ["The answer is: 5", "The answer is: 6", "The answer is: 5"],
        {"label": ["5", "5", None], "instruction": ["What is 2 + 3?"] * 3},
    )
    assert r == [pytest.approx(0.9), 0.0, None]  # right, wrong, no label to judge against
    assert metrics["correct"] == [0.5]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tasks.training.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_a_real_grpo_step_calls_the_reward_with_the_dataset_columns(tiny, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    irm = FakeIrm({"What is 2 + 3?": 0.8, "What is 2 + 3 + 4?": 0.5})
    reward = InstructionAnswerReward(irm=irm, prm=FakePrm(), segmenter=lines)
    seen = []
    original = reward.__call__

    class Spy:
        __name__ = "r_instruction_answer"

        def __call__(self, *args, **kwargs):
            seen.append(kwargs)
            return original(*args, **kwargs)

    dataset = Dataset.from_list(
        [
            {"prompt": PROMPTS[0], "instruction": "What is 2 + 3?", "parent": None, "label": "5", "r_i": 0.3},
            {"prompt": PROMPTS[1], "instruction": "What is 2 + 3 + 4?", "parent": "What is 2 + 3?", "label": "9", "r_i": None},
        ]
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny),
        reward_funcs=[Spy()],
        args=GRPOConfig(
            output_dir=str(tmp_path / "out"),
            use_cpu=True,
            bf16=False,
            report_to="none",
            max_steps=1,
            num_generations=2,
            per_device_train_batch_size=4,
            max_completion_length=8,
            logging_steps=1,
            activation_checkpointing=False,
        ),
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(tiny, padding_side="left"),
    )
    trainer.train()
    kwargs = seen[0]
    assert {"prompts", "completions", "completion_ids", "log_metric", "log_extra"} <= set(kwargs)
    assert {"instruction", "parent", "label", "r_i"} <= set(kwargs)
    assert len(kwargs["prompts"]) == len(kwargs["label"]) == 4
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"rI", "rA", "reward", "rewards/r_instruction_answer/mean"} <= logged


def test_a_long_completion_whose_last_steps_fall_past_the_prm_cut_has_no_ra(tiny):
    from infra.scoring import PrmScorer
    from tasks.training.rl import RlTrainParams, reward_length

    prm = PrmScorer.load(tiny, batch_size=2)
    tokenizer = prm.tokenizer
    completion = "\n".join(f"Step {k}: {k} + {k} = {2 * k}." for k in range(1, 30))
    completion += "\nThe answer is: 58"
    columns = {"instruction": ["What is 2 + 3?"] * 2}
    short = "\nStep 1: 2 + 3 = 5.\nThe answer is: 5"
    prm.max_length = len(tokenizer(PROMPTS[0] + completion)["input_ids"]) // 2  # the old 512 cut
    steps = prm.step_probabilities([PROMPTS[0]], [completion.split("\n")])[0]
    assert steps[0] is not None and steps[-1] is None  # the first steps scored, the last cut
    reward = InstructionAnswerReward(irm=FakeIrm({"What is 2 + 3?": 0.5}), prm=prm)
    r, metrics, _ = grpo_call(reward, [PROMPTS[0]] * 2, [completion, short], columns)
    assert r[0] is None and r[1] is not None
    assert metrics["rA_cut"] == [1.0] and reward.unscored == {CUT: 1}
    # The length the RL stage derives (longest prompt + completion tokens) reads it all.
    params = RlTrainParams(sampling={"max_tokens": len(tokenizer(completion)["input_ids"])})
    assert params.reward_max_length is None
    prm.max_length = reward_length(params, tokenizer, [PROMPTS[0], PROMPTS[1]])
    r, metrics, _ = grpo_call(reward, [PROMPTS[0]] * 2, [completion, short], columns)
    assert None not in r and metrics["rA_cut"] == [0.0]
    assert 0.0 < r[0] <= 0.5 and reward.unscored == {CUT: 1}  # the run's total


def test_reward_max_length_must_leave_room_for_a_whole_completion():
    from pydantic import ValidationError

    from tasks.training.rl import RlTrainParams

    with pytest.raises(ValidationError, match=r"reward_max_length \(512\) must exceed"):
        RlTrainParams(reward_max_length=512, sampling={"max_tokens": 1024})
    assert RlTrainParams(reward_max_length=600, sampling={"max_tokens": 512}).reward_max_length
