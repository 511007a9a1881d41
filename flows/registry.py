"""The flows by name: the one table the CLI (`evolforge run --flow NAME`), the deployments
(`flows/serve.py`) and the summaries read. Each entry holds the flow, the part of the factory's
parameters it reads (so one run profile serves every flow) and the text printed after a run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Flow
from pydantic import BaseModel

from flows.data import data
from flows.evaluation import evaluation
from flows.factory import factory
from flows.overrides import ConfigError
from flows.params import FactoryParams, load_factory_params
from flows.reports.data import render_summary
from flows.reports.evaluation import render_evaluation_summary
from flows.reports.factory import factory_summary
from flows.reports.rewards import rewards_summary
from flows.reports.training import render_training_summary
from flows.rewards import rewards
from flows.training import TrainingParams, training
from flows.training_sets import TrainingSetsParams, training_sets


@dataclass(frozen=True)
class FlowEntry:
    """A flow, the parameters it reads out of the factory's, and its printed summary."""

    flow: Flow
    params: Callable[[FactoryParams], BaseModel]
    summary: Callable[[Any], str]


def _checked(full: FactoryParams) -> FactoryParams:
    """A whole factory run's parameters, checked as a whole before it starts."""
    full.check_factory()
    return full


FLOWS: dict[str, FlowEntry] = {
    "factory": FlowEntry(factory, _checked, factory_summary),
    "data": FlowEntry(data, FactoryParams.data_params, render_summary),
    "rewards": FlowEntry(rewards, lambda full: full.rewards, rewards_summary),
    "training_sets": FlowEntry(
        training_sets, lambda full: full.for_flow(TrainingSetsParams), render_training_summary
    ),
    "training": FlowEntry(
        training, lambda full: full.for_flow(TrainingParams), render_training_summary
    ),
    "evaluation": FlowEntry(evaluation, lambda full: full.evaluation, render_evaluation_summary),
}


def load_params(
    config: str | Path | None, overrides: Sequence[str], flow: str = "factory"
) -> BaseModel:
    """A flow's parameters from a run profile and `--set` overrides."""
    if flow not in FLOWS:
        raise ConfigError(f"no flow named {flow!r} (known: {', '.join(FLOWS)})")
    return FLOWS[flow].params(load_factory_params(config, overrides))


def load_run(
    config: str | Path | None, overrides: Sequence[str], flow: str = "factory"
) -> dict[str, Any]:
    """A flow's call arguments from a run profile and `--set` overrides: its parameters and,
    for a flow run on its own, the run's `executor` setting (the factory's is in its params)."""
    if flow not in FLOWS:
        raise ConfigError(f"no flow named {flow!r} (known: {', '.join(FLOWS)})")
    full = load_factory_params(config, overrides)
    arguments: dict[str, Any] = {"params": FLOWS[flow].params(full)}
    if flow != "factory":
        arguments["executor"] = full.executor
    return arguments
