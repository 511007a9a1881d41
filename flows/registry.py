"""The flows by name, for the CLI (`evolforge run --flow NAME`) and the deployments, and the
text each prints after a run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flows.data import data
from flows.evaluation import evaluation
from flows.factory import factory
from flows.reports.data import render_summary
from flows.reports.evaluation import render_evaluation_summary
from flows.reports.factory import factory_summary
from flows.reports.rewards import rewards_summary
from flows.reports.training import render_training_summary
from flows.rewards import rewards
from flows.training import training
from flows.training_sets import training_sets

FLOWS = {
    "factory": factory,
    "data": data,
    "rewards": rewards,
    "training_sets": training_sets,
    "training": training,
    "evaluation": evaluation,
}
SUMMARIES: dict[str, Callable[[Any], str]] = {
    "factory": factory_summary,
    "data": render_summary,
    "rewards": rewards_summary,
    "training_sets": render_training_summary,
    "training": render_training_summary,
    "evaluation": render_evaluation_summary,
}
