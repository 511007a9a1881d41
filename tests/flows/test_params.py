"""Run profiles and `--set` overrides: unknown keys are errors, list items are addressable."""

from __future__ import annotations

import pytest

from flows.params import ConfigError, DataParams, FactoryParams
from flows.registry import load_params
from infra.engines.base import SamplingParams
from storage.settings import PROJECT_ROOT


def test_unknown_keys_name_the_nearest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown key 'seeds\.bogus'"):
        load_params(None, ["seeds.bogus=1"])
    with pytest.raises(ConfigError, match=r"'evolution\.roundz'; did you mean 'evolution\.rounds'"):
        load_params(None, ["evolution.roundz=2"])
    with pytest.raises(ConfigError, match=r"did you mean 'solutions\.sandbox\.wall_s'"):
        load_params(None, ["solutions.sandbox.wal_s=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'enginee'; did you mean 'engine'"):
        load_params(None, ["enginee.kind=vllm"])


def test_list_items_are_addressable_by_index():
    params = load_params(None, ["seeds.sources.0.limit=6"])
    assert isinstance(params, FactoryParams)
    assert params.seeds.sources[0].kind == "sample" and params.seeds.sources[0].limit == 6
    two = load_params(None, ["seeds.sources.1.kind=gsm8k", "seeds.sources.1.limit=3"])
    assert [(s.kind, s.limit) for s in two.seeds.sources] == [("sample", None), ("gsm8k", 3)]
    with pytest.raises(ConfigError, match="index 5 past the end"):
        load_params(None, ["seeds.sources.5.limit=1"])
    with pytest.raises(ConfigError, match="is a list: use an index"):
        load_params(None, ["seeds.sources.first.limit=1"])


def test_profiles_load_for_the_factory_and_for_each_flow():
    demo = PROJECT_ROOT / "configs" / "demo.yaml"
    full = load_params(demo, [])
    data = load_params(demo, ["evolution.rounds=2"], "data")
    assert type(data) is DataParams and data.evolution.rounds == 2
    assert data.engine == full.engine
    paper = load_params(PROJECT_ROOT / "configs" / "paper.yaml", [])
    assert paper.engine.kind == "vllm"


def test_a_profile_extends_another(tmp_path):
    nightly = load_params(PROJECT_ROOT / "configs" / "nightly.yaml", [])
    demo = load_params(PROJECT_ROOT / "configs" / "demo.yaml", [])
    assert nightly.training == demo.training and nightly.evolution == demo.evolution
    assert [s.kind for s in nightly.seeds.sources] == ["sample", "file"]
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nevolution: {rounds: 3}\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="in a circle"):
        load_params(tmp_path / "a.yaml", [])


def test_the_demo_samples_as_it_did_before_the_sampling_model():
    """Every request of the demo keeps its sampling (so its rows and its request cache stay):
    the values are those the demo sent when each model declared its own fields."""
    full = load_params(PROJECT_ROOT / "configs" / "demo.yaml", [])
    assert isinstance(full, FactoryParams)
    rewards, elimination = full.rewards, full.elimination
    solutions = full.solutions
    sampled = {
        "sft": full.sft.sampling.engine_params(seed=full.sft.seed),
        "evolve": full.evolution.sampling.engine_params(seed=full.evolution.seed),
        "probe": elimination.probe_sampling.engine_params(seed=elimination.seed),
        "judge": elimination.judge_sampling.engine_params(seed=elimination.seed),
        "cot": solutions.cot_sampling(),
        "pot": solutions.pot_sampling(),
        "siblings": rewards.siblings.evolver_sampling(0),
        "ranking": rewards.ranking.sampling.engine_params(),
        "step_judge": rewards.step_judge.sampling.engine_params(),
        "rollouts": rewards.monte_carlo.sampling.engine_params(n=rewards.monte_carlo.n),
    }
    assert sampled == {
        "sft": SamplingParams(temperature=0.7, top_p=1.0, max_tokens=160),
        "evolve": SamplingParams(temperature=0.7, top_p=0.95, max_tokens=128),
        "probe": SamplingParams(temperature=0.0, max_tokens=48),
        "judge": SamplingParams(temperature=0.0, max_tokens=48),
        "cot": SamplingParams(temperature=0.7, top_p=0.95, max_tokens=160),
        "pot": SamplingParams(temperature=0.7, top_p=0.95, max_tokens=160),
        "siblings": SamplingParams(temperature=0.7, top_p=0.95, max_tokens=96, seed=1478247569),
        "ranking": SamplingParams(temperature=0.0, max_tokens=256),
        "step_judge": SamplingParams(temperature=0.0, max_tokens=64),
        "rollouts": SamplingParams(temperature=0.7, top_p=0.95, max_tokens=64, n=2),
    }
    rl = full.training.rl.sampling
    assert (rl.temperature, rl.top_p, rl.max_tokens) == (0.9, 1.0, 48)
    maj = full.evaluation.decoding.maj_sampling
    assert (maj.temperature, maj.top_p, maj.max_tokens) == (0.7, 0.95, 64)


def test_a_sampling_key_is_set_in_its_group_and_the_old_key_points_there():
    params = load_params(None, ["evolution.sampling.temperature=0.2"])
    assert isinstance(params, FactoryParams)
    assert (params.evolution.sampling.temperature, params.evolution.sampling.top_p) == (0.2, 0.95)
    with pytest.raises(ConfigError, match=r"did you mean 'evolution\.sampling\.temperature'"):
        load_params(None, ["evolution.temperature=0.2"])


def test_each_registered_flow_gets_the_parameters_its_signature_declares():
    import typing

    from flows.registry import FLOWS

    full = FactoryParams()
    for name, entry in FLOWS.items():
        hints = typing.get_type_hints(entry.flow.fn)
        assert type(entry.params(full)) is hints["params"], name
        assert callable(entry.summary), name
