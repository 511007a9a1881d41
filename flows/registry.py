"""The flows by name, for the CLI (`evolforge run --flow NAME`) and the deployments, and the
text each prints after a run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flows.data import data
from flows.evaluation import evaluation
from flows.factory import factory
from flows.rewards import rewards
from flows.training import training
from flows.training_sets import training_sets
from tasks.evaluation.report import render_evaluation_summary
from tasks.report import factory_summary, render_summary
from tasks.rewards.report import rewards_summary
from tasks.training.report import render_training_summary

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
