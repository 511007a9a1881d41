"""The flows' parameters: one pydantic model per flow, rendered as a form in the Prefect UI.

`FactoryParams` holds every section; each flow's own model (`DataParams`, ...) is the part of it
that flow reads, so one run profile (`configs/*.yaml`, a partial dump of `FactoryParams`) serves
the factory and each flow run on its own (`evolforge run --flow data`).

`--set key=value` overrides any field by its dotted path, list items by index
(`--set evolution.rounds=2 --set seeds.sources.0.limit=6`). An unknown key is an error naming
the key and the nearest valid one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from flows.evaluation import EvaluationParams
from flows.overrides import ConfigError, load_profile
from flows.rewards import RewardParams
from infra.engines import EngineConfig
from tasks.evolution.dedup import DecontamParams, DedupParams
from tasks.evolution.eliminate import EliminationParams
from tasks.evolution.evolve import EvolutionParams
from tasks.executors.settings import ExecutorSettings
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
        description="The engine for every stage: auto (the default: vLLM where installed, else embedded), embedded (CPU), vllm (GPU, or its CPU build), vllm_server or openai (any compatible server).",
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

    executor: ExecutorSettings = Field(
        default_factory=ExecutorSettings,
        title="Executor",
        description="Where the shards of the stages run: local threads or a Ray cluster "
        "(kind ray, its address). Versions never depend on it.",
    )

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


def load_factory_params(config: str | Path | None, overrides: Sequence[str]) -> FactoryParams:
    """Every section's parameters from a run profile and `--set` overrides (a whole factory
    run also needs `check_factory`; `flows.registry.load_params` gives each flow its part)."""
    return load_profile(config, overrides, FactoryParams)
