"""The flows' parameters: one pydantic model per flow, rendered as a form in the Prefect UI.

`FactoryParams` holds every section; each flow's own model (`DataParams`, ...) is the part of it
that flow reads, so one run profile (`configs/*.yaml`, a partial dump of `FactoryParams`) serves
the factory and each flow run on its own (`evolforge run --flow data`).

`--set key=value` overrides any field by its dotted path, list items by index
(`--set evolution.rounds=2 --set seeds.sources.0.limit=6`). An unknown key is an error naming
the key and the nearest valid one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flows.evaluation import EvaluationParams
from flows.overrides import ConfigError, set_dotted, validation_message
from flows.rewards import RewardParams
from flows.training import TrainingParams
from flows.training_sets import TrainingSetsParams
from infra.engines import EngineConfig
from tasks.evolution.dedup import DecontamParams, DedupParams
from tasks.evolution.eliminate import EliminationParams
from tasks.evolution.evolve import EvolutionParams
from tasks.seeds import IngestParams
from tasks.solutions.sft import SftParams
from tasks.solutions.solve import SolutionParams
from tasks.training.config import TrainingConfig
from tasks.training.sets import TrainingSetParams


class DataParams(BaseModel):
    """Seeds → SFT answers → evolution rounds → solutions: the data flow."""

    model_config = ConfigDict(extra="forbid")

    seeds: IngestParams = Field(
        default_factory=IngestParams,
        title="Seeds",
        description="Seed problems: sources (gsm8k, math, sample, file, hf) and how strictly to read them.",
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        title="LLM engine",
        description="The engine for every stage: embedded (CPU), vllm (GPU) or openai (any compatible server).",
    )
    sft: SftParams = Field(
        default_factory=SftParams,
        title="SFT answers",
        description="WizardMath step 1: seeds re-solved step by step, only correct solutions kept.",
    )
    evolution: EvolutionParams = Field(
        default_factory=EvolutionParams,
        title="Evolution",
        description="Math Evol-Instruct: rounds, operation mix, sampling.",
    )
    elimination: EliminationParams = Field(
        default_factory=EliminationParams,
        title="Elimination",
        description="The instruction eliminator's rules and judges.",
    )
    dedup: DedupParams = Field(
        default_factory=DedupParams,
        title="Dedup",
        description="Exact and near duplicates (MinHash LSH) across the seeds and all rounds.",
    )
    decontamination: DecontamParams = Field(
        default_factory=DecontamParams,
        title="Decontamination",
        description="Overlap with benchmark test sets (GSM8K test, MATH test).",
    )
    solutions: SolutionParams = Field(
        default_factory=SolutionParams,
        title="Solutions",
        description="CoT + PoT solutions with sandboxed programs and the self-consistency vote.",
    )


class FactoryParams(DataParams):
    """Everything a factory run needs; defaults run the built-in sample on the embedded engine."""

    rewards: RewardParams = Field(
        default_factory=RewardParams,
        title="Rewards",
        description="IRM rankings of sibling evolutions, PRM step labels and r = rI · rA.",
    )
    training_sets: TrainingSetParams = Field(
        default_factory=TrainingSetParams,
        title="Training sets",
        description="SFT (CoT/PoT mix), IRM pairs, PRM steps, RL prompts; held-out split by seed.",
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig,
        title="Training",
        description="Base model and the SFT, IRM, PRM and RL trainers (steps, batch, lengths).",
    )
    evaluation: EvaluationParams = Field(
        default_factory=EvaluationParams,
        title="Evaluation",
        description="Models (base, trained checkpoints), benchmarks, cot/pot/hybrid/maj@k modes.",
    )

    def check_factory(self) -> None:
        """What a whole factory run needs of its sections, said before the data flow runs:
        the rewards label the data flow's solutions."""
        if self.rewards.enabled and not self.solutions.enabled:
            raise ConfigError(
                "rewards.enabled needs solutions.enabled (the rewards label the solutions): "
                "set rewards.enabled=false as well, or run `--flow data`"
            )

    def for_flow(self, model: type[BaseModel]) -> BaseModel:
        """The part of these parameters that `model` (a flow's own parameter model) reads."""
        return model.model_validate(self.model_dump(include=set(model.model_fields)))

    def data_params(self) -> DataParams:
        params = self.for_flow(DataParams)
        assert isinstance(params, DataParams)
        return params


# Each flow's parameters, taken from the factory's: a whole run profile serves every flow.
FLOW_PARAMS: dict[str, Callable[[FactoryParams], BaseModel]] = {
    "factory": lambda full: full,
    "data": FactoryParams.data_params,
    "rewards": lambda full: full.rewards,
    "training_sets": lambda full: full.for_flow(TrainingSetsParams),
    "training": lambda full: full.for_flow(TrainingParams),
    "evaluation": lambda full: full.evaluation,
}


def _defaults_for(data: dict[str, Any], model: type[BaseModel]) -> None:
    """Fill list fields that an override indexes into with their defaults, so that
    `seeds.sources.0.limit=6` edits the default source instead of replacing the list."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            data.setdefault(name, {})
            if isinstance(data[name], dict):
                _defaults_for(data[name], annotation)
        elif name not in data and info.default_factory is not None:
            default = info.default_factory()
            if isinstance(default, list) and default and isinstance(default[0], BaseModel):
                data[name] = [item.model_dump(exclude_unset=True) for item in default]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, groups merged key by key (lists and values replaced)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_profile(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A run profile as a dict. `extends: other.yaml` (relative to the profile) starts from
    another profile and changes only what this one sets."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: profiles extend each other in a circle")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of parameters at the top level")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: expected a profile file name")
    return _merge(read_profile(path.parent / parent, (*seen, path.resolve())), data)


def load_params(
    config: str | Path | None, overrides: list[str], flow: str = "factory"
) -> BaseModel:
    """A flow's parameters from a run profile and `--set` overrides."""
    data = read_profile(Path(config)) if config else {}
    if overrides:
        _defaults_for(data, FactoryParams)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        set_dotted(data, key.strip(), yaml.safe_load(raw) if raw else "")
    try:
        full = FactoryParams.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            validation_message(exc, FactoryParams, str(config or "parameters"))
        ) from exc
    if flow == "factory":
        full.check_factory()
    return FLOW_PARAMS[flow](full)


def load_factory_params(config: str | Path | None, overrides: list[str]) -> FactoryParams:
    params = load_params(config, overrides, "factory")
    assert isinstance(params, FactoryParams)
    return params
