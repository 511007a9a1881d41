"""The training-sets flow: from other flows' states or the newest datasets, every set built with
the same held-out seeds, a set without its input skipped, a rerun all cache hits."""

from __future__ import annotations

import pytest

from flows.state import DataState
from flows.training_sets import TrainingSetsParams, TrainingSetsState, training_sets
from storage.datasets import DatasetStore
from storage.errors import UserError
from storage.settings import home
from tasks.training.sets import TrainingSetParams
from tests.tasks.training.synthetic import write_all

PARAMS = TrainingSetsParams(training_sets=TrainingSetParams(split={"test_fraction": 0.3}))


def test_flow_builds_every_set_from_the_newest_datasets(prefect_harness, evolforge_home):
    store = DatasetStore(home())
    refs = write_all(store)
    state = training_sets(params=PARAMS)
    assert {state.sft_set.name, state.irm_set.name, state.prm_steps.name, state.rl_prompts.name} == {
        "sft_set", "irm_set", "prm_steps", "rl_prompts",
    }  # fmt: skip
    assert state.seeds == refs["seeds"] and state.step_labels == refs["step_labels"]
    held = {}
    for name in ("sft_set", "irm_set", "prm_steps", "rl_prompts"):
        frame = store.read(getattr(state, name))
        held[name] = set(frame.filter(frame["split"] == "test")["root_id"])
    assert len({frozenset(v) for v in held.values()}) == 1  # one line for every set
    steps = {s.stage: s for s in state.steps}
    assert steps["sft_set"].stats["test"] > 0 and not steps["sft_set"].cached
    again = training_sets(params=PARAMS)
    assert all(s.cached for s in again.steps) and again.refs() == state.refs()


def test_flow_from_the_data_state_skips_sets_without_reward_data(prefect_harness, evolforge_home):
    store = DatasetStore(home())
    refs = write_all(store)
    data = DataState(
        seeds=refs["seeds"], instructions=refs["instructions"], sft_answers=refs["sft_answers"],
        solutions=refs["solutions"], answers=refs["answers"],
    )  # fmt: skip
    state = training_sets(params=PARAMS, inputs=TrainingSetsState.from_states(data))
    assert state.sft_set is not None and state.rl_prompts is not None
    assert state.irm_set is None and state.prm_steps is None  # no reward flow ran


def test_a_data_home_without_data_is_one_clear_error(evolforge_home):
    with pytest.raises(UserError, match="run the data flow first"):
        TrainingSetsState.newest()
