"""One `Sampling` model: each use keeps its own defaults, a partial setting keeps the others,
and no parameter model declares sampling fields of its own."""

from __future__ import annotations

import pickle

import pytest
from pydantic import BaseModel, ValidationError

from infra.engines.base import SamplingParams
from tasks.evaluation.evaluate import DecodingParams
from tasks.evolution.evolve import EvolutionParams
from tasks.sampling import Sampling
from tasks.solutions.sft import SftParams
from tasks.solutions.solve import DEFAULT_COT_SAMPLING, DEFAULT_POT_SAMPLING, SolutionParams
from tasks.training.rl import RlTrainParams


def test_each_use_has_its_defaults_and_a_partial_setting_keeps_them():
    assert EvolutionParams().sampling.engine_params(seed=3) == SamplingParams(
        temperature=0.7, top_p=0.95, max_tokens=256, seed=3
    )
    partial = EvolutionParams.model_validate({"sampling": {"max_tokens": 64}}).sampling
    assert (partial.temperature, partial.top_p, partial.max_tokens) == (0.7, 0.95, 64)
    # A base `Sampling` built by hand gives only what was set on it.
    by_hand = EvolutionParams(sampling=Sampling(max_tokens=64)).sampling
    assert by_hand == partial and isinstance(by_hand, type(EvolutionParams().sampling))
    # SFT answers never set a nucleus: top_p stays 1.0.
    assert SftParams().sampling.engine_params().top_p == 1.0


def test_the_constraints_are_the_base_models():
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        EvolutionParams.model_validate({"sampling": {"temperature": -1}})
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        SolutionParams.model_validate({"sampling": {"top_p": 1.5}})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        SolutionParams.model_validate({"sampling": {"temprature": 0.5}})
    with pytest.raises(ValidationError, match="maj@k votes over samples"):
        DecodingParams.model_validate({"maj_sampling": {"temperature": 0}})
    with pytest.raises(ValidationError, match="GRPO compares sampled completions"):
        RlTrainParams.model_validate({"sampling": {"temperature": 0}})


def test_write_solutions_defaults_are_the_stages():
    """`write_solutions`' defaults said max_tokens 512 for CoT where the stage said 384."""
    params = SolutionParams()
    assert params.sampling.engine_params(seed=params.seed) == DEFAULT_COT_SAMPLING
    assert DEFAULT_POT_SAMPLING.max_tokens == params.pot_max_tokens == 384
    assert DEFAULT_COT_SAMPLING.max_tokens == 384


def test_a_use_pickles_and_fingerprints_as_a_plain_dict():
    sampling = EvolutionParams().sampling
    assert pickle.loads(pickle.dumps(sampling)) == sampling
    assert EvolutionParams().fingerprint()["sampling"] == {
        "temperature": 0.7,
        "top_p": 0.95,
        "max_tokens": 256,
    }


def _sampling_fields_outside_sampling(model: type[BaseModel], where: str) -> list[str]:
    found = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, Sampling):
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _sampling_fields_outside_sampling(annotation, f"{where}.{name}")
        elif name in ("temperature", "top_p", "max_tokens", "max_completion_length") or (
            name.endswith(("_temperature", "_top_p")) or name == "instruction_max_tokens"
        ):
            found.append(f"{where}.{name}")
    return found


def test_no_parameter_model_declares_its_own_sampling_fields():
    from flows.params import FactoryParams

    assert _sampling_fields_outside_sampling(FactoryParams, "factory") == []
