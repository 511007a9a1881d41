"""Mixed precision in the four trainers: on a (monkeypatched) CUDA machine each trainer gets
`bf16=True` in its arguments over a model loaded in float32 (the optimizer's master copy); on
this CPU, float32 with `use_cpu` and bf16 off.

Each trainer stage runs for real up to the point where it builds its trainer: its config class
and its trainer class are replaced by recorders (a config class cannot be built on a machine
that only pretends to have CUDA: transformers sets the device while building it)."""

from __future__ import annotations

import pytest
import torch

import tasks.training.rl as rl_mod
from storage.datasets import DatasetStore
from storage.settings import home
from tasks.training.common import BaseModelSpec
from tasks.training.irm import IrmTrainParams, train_irm
from tasks.training.prm import PrmTrainParams, train_prm
from tasks.training.rl import RlTrainParams, train_rl
from tasks.training.sets import (
    IrmSetParams,
    PrmStepsParams,
    RlPromptsParams,
    SftSetParams,
    SplitParams,
    build_irm_set,
    build_prm_steps,
    build_rl_prompts,
    build_sft_set,
)
from tasks.training.sft import SftTrainParams, train_sft
from tests.tasks.training.synthetic import write_all

SPLIT = SplitParams(test_fraction=0.3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tasks.training.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


class Built(Exception):
    """Raised by the recording trainer: the stage got as far as building its trainer."""


@pytest.fixture()
def recorded(monkeypatch):
    """Replace every trainer's config and trainer class; what the stage passed lands here."""
    import transformers
    import trl

    seen: dict[str, object] = {}

    class Args:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class Trainer:
        def __init__(self, model, args, **kwargs):
            seen["args"] = args.kwargs
            seen["dtypes"] = {p.dtype for p in model.parameters()}
            raise Built

    for name in ("SFTConfig", "RewardConfig", "GRPOConfig", "RLOOConfig"):
        monkeypatch.setattr(trl, name, Args)
    for name in ("SFTTrainer", "RewardTrainer", "GRPOTrainer", "RLOOTrainer"):
        monkeypatch.setattr(trl, name, Trainer)
    monkeypatch.setattr(transformers, "TrainingArguments", Args)
    monkeypatch.setattr(transformers, "Trainer", Trainer)
    return seen


class FakeJudgeReward:
    def instruction_rewards(self, instructions):
        return [0.5] * len(instructions)

    def answer_rewards(self, instructions, texts):
        return [1.0] * len(texts)


def run_trainer(which: str, tiny, monkeypatch) -> None:
    """Run one trainer stage on the synthetic sets until it builds its trainer."""
    store = DatasetStore(home())
    refs = write_all(store)
    base = BaseModelSpec(name=str(tiny))
    small = dict(max_steps=1, max_length=64)
    with pytest.raises(Built):
        if which == "sft":
            sft_set = build_sft_set.run(
                seeds=refs["seeds"], instructions=refs["instructions"],
                sft_answers=refs["sft_answers"], solutions=refs["solutions"],
                answers=refs["answers"], split=SPLIT, params=SftSetParams(),
            )["sft_set"]  # fmt: skip
            train_sft.run(sft_set=sft_set, base_model=base, params=SftTrainParams(**small))
        elif which == "irm":
            irm_set = build_irm_set.run(
                irm_pairs=refs["irm_pairs"], instructions=refs["instructions"], split=SPLIT,
                params=IrmSetParams(),
            )["irm_set"]  # fmt: skip
            train_irm.run(irm_set=irm_set, base_model=base, params=IrmTrainParams(**small))
        elif which == "prm":
            prm_steps = build_prm_steps.run(
                step_labels=refs["step_labels"], instructions=refs["instructions"],
                solutions=refs["solutions"], split=SPLIT, params=PrmStepsParams(),
            )["prm_steps"]  # fmt: skip
            params = PrmTrainParams(processbench_limit=0, **small)
            train_prm.run(prm_steps=prm_steps, base_model=base, params=params)
        else:
            from infra.engines import EngineConfig

            monkeypatch.setattr(rl_mod, "judge_reward", lambda ctx, judge: FakeJudgeReward())
            rl_prompts = build_rl_prompts.run(
                seeds=refs["seeds"], instructions=refs["instructions"], answers=refs["answers"],
                rewards=refs["rewards"], split=SPLIT, params=RlPromptsParams(),
            )["rl_prompts"]  # fmt: skip
            train_rl.run(
                rl_prompts=rl_prompts, sft_model=None, irm_model=None, prm_model=None,
                base_model=base, judge=EngineConfig(),
                params=RlTrainParams(num_generations=2, sampling={"max_tokens": 8}, **small),
            )  # fmt: skip


TRAINERS = ["sft", "irm", "prm", "rl"]


@pytest.mark.parametrize("which", TRAINERS)
def test_a_gpu_trains_in_mixed_precision_over_float32_weights(
    evolforge_home, tiny, recorded, monkeypatch, which
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    run_trainer(which, tiny, monkeypatch)
    args = recorded["args"]
    assert (args["bf16"], args["fp16"], args["use_cpu"]) == (True, False, False)
    # The optimizer's master weights: float32, so an update at lr 1e-6 is not rounded away.
    assert recorded["dtypes"] == {torch.float32}


@pytest.mark.parametrize("which", TRAINERS)
def test_this_cpu_trains_in_float32(evolforge_home, tiny, recorded, monkeypatch, which):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run_trainer(which, tiny, monkeypatch)
    args = recorded["args"]
    assert (args["bf16"], args["fp16"], args["use_cpu"]) == (False, False, True)
    assert recorded["dtypes"] == {torch.float32}
