"""The factory's parameters: one pydantic model, rendered as a form in the Prefect UI.

Run profiles in `configs/*.yaml` are partial dumps of this model; `--set key=value` overrides
any field by its dotted path (`--set evolution.rounds=2 --set engine.batch_size=32`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infra.engines import EngineConfig
from infra.errors import UserError
from tasks.elimination import EliminationConfig
from tasks.rounds import DecontamParams, DedupParams, EvolutionParams, SftParams, SolutionParams
from tasks.seeds import IngestParams


class FactoryParams(BaseModel):
    """Everything a factory run needs; defaults run the built-in sample on the embedded engine."""

    model_config = ConfigDict(extra="forbid")

    # Seed problems: sources (gsm8k, math, sample, file, hf) and how strictly to read them.
    seeds: IngestParams = Field(default_factory=IngestParams)
    # The LLM engine for every stage: embedded (CPU), vllm (GPU) or openai (any compatible server).
    engine: EngineConfig = Field(default_factory=EngineConfig)
    # WizardMath step 1: seeds re-solved step by step, only correct solutions kept.
    sft: SftParams = Field(default_factory=SftParams)
    # Math Evol-Instruct: rounds, operation mix, sampling.
    evolution: EvolutionParams = Field(default_factory=EvolutionParams)
    # The instruction eliminator's rules and judges.
    elimination: EliminationConfig = Field(default_factory=EliminationConfig)
    # Dedup (exact + MinHash LSH) and decontamination against benchmark test sets.
    dedup: DedupParams = Field(default_factory=DedupParams)
    decontamination: DecontamParams = Field(default_factory=DecontamParams)
    # CoT + PoT solutions with sandboxed programs and the self-consistency vote.
    solutions: SolutionParams = Field(default_factory=SolutionParams)


class ConfigError(UserError):
    """A run profile or override that does not fit the parameter model."""


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a group of settings")
    node[keys[-1]] = value


def load_factory_params(config: str | Path | None, overrides: list[str]) -> FactoryParams:
    data: dict[str, Any] = {}
    if config:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of parameters at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw else "")
    try:
        return FactoryParams.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ConfigError(f"{config or 'parameters'}: {where}: {err['msg']}") from exc
