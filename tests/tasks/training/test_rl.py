"""RL: GRPO (and RLOO) from the SFT checkpoint scored by the trained IRM and PRM; the judge fills
in for a missing model; on SmolLM2 (slow) GRPO raises the probability of what the reward pays."""

from __future__ import annotations

import pytest

import tasks.training.reward as reward_mod
import tasks.training.rl as rl_mod
from storage.datasets import DatasetStore
from storage.settings import home
from tasks.training import formats
from tasks.training.common import BaseModelSpec, read_training_log
from tasks.training.irm import IrmTrainParams, train_irm
from tasks.training.prm import PrmTrainParams, train_prm
from tasks.training.reward import InstructionAnswerReward
from tasks.training.rl import RlTrainParams, train_rl
from tasks.training.sets import (
    IrmSetParams,
    PrmStepsParams,
    RlPromptsParams,
    SplitParams,
    build_irm_set,
    build_prm_steps,
    build_rl_prompts,
)
from tests.tasks.training.synthetic import write_all

SPLIT = SplitParams(test_fraction=0.3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tasks.training.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def segmenter(monkeypatch):
    """The reward flow's segmenter when it is installed; one step per line before that."""
    try:
        from tasks.rewards.steps import segment_steps  # noqa: F401
    except ImportError:
        monkeypatch.setattr(reward_mod, "default_segmenter", lambda: lambda t: t.splitlines(True))


def _sets(store):
    refs = write_all(store)
    irm_set = build_irm_set.run(
        irm_pairs=refs["irm_pairs"],
        instructions=refs["instructions"],
        split=SPLIT,
        params=IrmSetParams(),
    )["irm_set"]
    prm_steps = build_prm_steps.run(
        step_labels=refs["step_labels"], instructions=refs["instructions"],
        solutions=refs["solutions"], split=SPLIT, params=PrmStepsParams(),
    )["prm_steps"]  # fmt: skip
    rl_prompts = build_rl_prompts.run(
        seeds=refs["seeds"], instructions=refs["instructions"], answers=refs["answers"],
        rewards=refs["rewards"], split=SPLIT, params=RlPromptsParams(),
    )["rl_prompts"]  # fmt: skip
    return irm_set, prm_steps, rl_prompts


FAST = dict(max_steps=2, num_generations=2, sampling={"max_tokens": 8}, eval_rows=2, max_length=128)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_train_rl_with_the_trained_irm_and_prm(evolforge_home, tiny, segmenter, algorithm):
    from transformers import AutoModelForCausalLM

    store = DatasetStore(home())
    irm_set, prm_steps, rl_prompts = _sets(store)
    base = BaseModelSpec(name=str(tiny))
    small = dict(max_steps=1, max_length=128, processbench_limit=0)
    irm = train_irm.run(
        irm_set=irm_set, base_model=base, params=IrmTrainParams(max_steps=1, max_length=128)
    )
    prm = train_prm.run(prm_steps=prm_steps, base_model=base, params=PrmTrainParams(**small))
    result = train_rl.run(
        rl_prompts=rl_prompts, sft_model=None, irm_model=irm["irm_model"], prm_model=prm["prm_model"],
        base_model=base, judge=None, params=RlTrainParams(algorithm=algorithm, **FAST),
    )  # fmt: skip
    folder = store.version_dir("rl_model", result.version)
    AutoModelForCausalLM.from_pretrained(folder)
    stats = result.stats
    assert stats["steps"] == 2 and stats["algorithm"] == algorithm
    assert (stats["rI_source"], stats["rA_source"]) == ("irm_model", "prm_model")
    assert stats["policy_start"] == "base_model" and stats["eval_prompts"] == 2
    for key in ("reward_last", "rI_last", "rA_last"):
        assert stats[key] is not None
    assert 0.0 < stats["rI_last"] < 1.0 and 0.0 <= stats["rA_last"] <= 1.0
    # The reward models read the longest prompt and a whole completion: no step went unscored.
    assert stats["reward_max_length"] > 8 and stats["rA_unscored"] == {}
    assert sorted(store.manifest(result["rl_model"]).parents) == sorted(
        [str(rl_prompts), str(irm["irm_model"]), str(prm["prm_model"])]
    )
    logged = {k for h in read_training_log(folder) for k in h}
    assert {"rI", "rA", "rA_cut", "reward"} <= logged


def test_train_rl_without_a_prm_needs_the_judge(evolforge_home, tiny):
    store = DatasetStore(home())
    _, _, rl_prompts = _sets(store)
    with pytest.raises(ValueError, match="rA needs a PRM checkpoint"):
        train_rl.run(
            rl_prompts=rl_prompts, sft_model=None, irm_model=None, prm_model=None,
            base_model=BaseModelSpec(name=str(tiny)), judge=None, params=RlTrainParams(**FAST),
        )  # fmt: skip
    assert store.versions("rl_model") == []


def test_use_vllm_without_vllm_beside_trl_fails_in_one_line_before_loading(
    evolforge_home, tiny, monkeypatch
):
    """trl looks for the `vllm` distribution in the trainer's environment; the project's vLLM
    CPU build lives in another one. The stage says so before any model loads."""
    from trl import import_utils

    store = DatasetStore(home())
    _, _, rl_prompts = _sets(store)
    loaded: list[str] = []
    monkeypatch.setattr(rl_mod.common, "load_tokenizer", lambda *a, **k: loaded.append("tok"))
    monkeypatch.setattr(import_utils, "is_vllm_available", lambda *a, **k: False)
    params = RlTrainParams(**FAST, use_vllm=True)
    with pytest.raises(ValueError, match=r"^training\.rl\.use_vllm: .*use_vllm: false") as err:
        train_rl.run(
            rl_prompts=rl_prompts, sft_model=None, irm_model=None, prm_model=None,
            base_model=BaseModelSpec(name=str(tiny)), judge=None, params=params,
        )  # fmt: skip
    assert "\n" not in str(err.value) and loaded == []
    assert store.versions("rl_model") == []
    # Where trl finds vLLM the check lets the stage go on (to the tokenizer, here).
    monkeypatch.setattr(import_utils, "is_vllm_available", lambda *a, **k: True)
    rl_mod.check_use_vllm(params)


def test_train_rl_falls_back_to_the_judge_and_the_r_i_column(evolforge_home, tiny, monkeypatch):
    from infra.engines import EngineConfig

    class FakeJudgeReward:
        def instruction_rewards(self, instructions):
            return [0.25] * len(instructions)

        def answer_rewards(self, instructions, texts):
            return [1.0] * len(texts)

    monkeypatch.setattr(rl_mod, "judge_reward", lambda ctx, judge: FakeJudgeReward())
    store = DatasetStore(home())
    _, _, rl_prompts = _sets(store)
    result = train_rl.run(
        rl_prompts=rl_prompts, sft_model=None, irm_model=None, prm_model=None,
        base_model=BaseModelSpec(name=str(tiny)), judge=EngineConfig(), params=RlTrainParams(**FAST),
    )  # fmt: skip
    assert (result.stats["rI_source"], result.stats["rA_source"]) == ("r_i column / judge", "judge")
    # rI comes from the rl_prompts' r_i column (the synthetic judge's 0.5 + 0.05 k), rA is 1.
    assert 0.5 <= result.stats["rI_last"] <= 0.75 and result.stats["rA_last"] == 1.0


@pytest.mark.slow
def test_grpo_raises_the_probability_of_what_the_reward_pays(
    evolforge_home, models_dir, monkeypatch
):
    """SmolLM2-135M, one prompt: the reward pays completions that start with the model's second
    most likely first token; after a few GRPO steps that token is more likely than before."""
    import polars as pl
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = BaseModelSpec()
    path = base.resolved().path
    prompt = formats.alpaca_prompt("What is 3 + 5?")
    tokenizer = AutoTokenizer.from_pretrained(path)

    def first_token_probs(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
        return torch.softmax(logits, -1)

    before = first_token_probs(path)
    target = int(torch.topk(before, 2).indices[1])
    text = tokenizer.decode([target])

    class PaysTarget:
        def step_probabilities(self, prompts, steps):
            return [[1.0 if "".join(s).startswith(text) else 0.0] for s in steps]

    class Constant:
        def scores(self, instructions, parents):
            return [1.0] * len(instructions)

    monkeypatch.setattr(
        rl_mod,
        "make_reward",
        lambda irm, prm, judge, params: InstructionAnswerReward(
            irm=Constant(), prm=PaysTarget(), segmenter=lambda t: [t]
        ),
    )
    store = DatasetStore(home())
    frame = pl.DataFrame(
        {"id": ["q"], "root_id": ["q"], "round": [0], "prompt": [prompt], "instruction": ["What is 3 + 5?"],
         "parent": [None], "label": ["8"], "label_source": ["reference"], "r_i": [None], "split": ["train"]},
        schema_overrides={"parent": pl.String, "r_i": pl.Float64},
    )  # fmt: skip
    ref = store.write("rl_prompts", frame, stage="t", code_version="t", params={}).ref
    params = RlTrainParams(
        max_steps=4, num_generations=8, learning_rate=2e-5,
        sampling={"temperature": 1.0, "max_tokens": 2}, eval_rows=0,
    )  # fmt: skip
    result = train_rl.run(
        rl_prompts=ref, sft_model=None, irm_model=None, prm_model=None, base_model=base,
        judge=None, params=params,
    )  # fmt: skip
    after = first_token_probs(store.version_dir("rl_model", result.version))
    assert after[target] > before[target], (float(before[target]), float(after[target]))
