"""The IRM: RewardTrainer on the pairs (consistent only, margins), held-out pairwise accuracy;
on SmolLM2 (slow) the chosen side wins after a few steps on a tiny set."""

from __future__ import annotations

import polars as pl
import pytest

from infra.scoring import IrmScorer
from storage.datasets import DatasetStore
from storage.settings import home
from tasks.evolution.instruction_reward import InstructionReward
from tasks.training.common import BaseModelSpec, read_training_log
from tasks.training.irm import IrmTrainParams, pairwise_accuracy, train_irm, training_pairs
from tasks.training.sets import IrmSetParams, SplitParams, build_irm_set
from tests.tasks.training.synthetic import write_all


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tasks.training.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def _irm_set(store, test_fraction=0.3):
    refs = write_all(store)
    return build_irm_set.run(
        irm_pairs=refs["irm_pairs"], instructions=refs["instructions"],
        split=SplitParams(test_fraction=test_fraction), params=IrmSetParams(),
    )["irm_set"]  # fmt: skip


def test_training_pairs_keep_consistent_ones_by_default(evolforge_home):
    store = DatasetStore(home())
    frame = store.read(_irm_set(store, test_fraction=0.0))
    assert training_pairs(frame, IrmTrainParams(), "train").height == 5  # s3's pair is inconsistent
    assert training_pairs(frame, IrmTrainParams(consistent_only=False), "train").height == 6


def test_train_irm_stage_writes_a_sequence_classifier(evolforge_home, tiny):
    from transformers import AutoModelForSequenceClassification

    store = DatasetStore(home())
    irm_set = _irm_set(store)
    params = IrmTrainParams(max_steps=2, max_length=128)
    result = train_irm.run(irm_set=irm_set, base_model=BaseModelSpec(name=str(tiny)), params=params)
    folder = store.version_dir("irm_model", result.version)
    assert AutoModelForSequenceClassification.from_pretrained(folder).config.num_labels == 1
    stats = result.stats
    assert stats["steps"] == 2 and stats["eval_pairs"] >= 1
    assert 0.0 <= stats["pairwise_accuracy"] <= 1.0
    scorer = InstructionReward(IrmScorer.load(folder))
    scores = scorer.scores(["What is 3 + 5 + 2?"], [None])
    assert 0.0 < scores[0] < 1.0


@pytest.mark.slow
def test_irm_overfits_and_the_chosen_side_wins_on_smollm2(evolforge_home, models_dir):
    store = DatasetStore(home())
    frame = store.read(_irm_set(store, test_fraction=0.0)).filter(pl.col("consistent")).head(3)
    ref = store.write("irm_set", frame, stage="t", code_version="t", params={"n": 3}).ref
    params = IrmTrainParams(max_steps=10, batch_size=3, learning_rate=5e-5, max_length=128)
    result = train_irm.run(irm_set=ref, base_model=BaseModelSpec(), params=params)
    folder = store.version_dir("irm_model", result.version)
    losses = [h["loss"] for h in read_training_log(folder) if "loss" in h]
    assert losses[-1] < losses[0]
    assert pairwise_accuracy(InstructionReward(IrmScorer.load(folder)), frame) == 1.0
    assert result.stats["train_pairwise_accuracy"] == 1.0
