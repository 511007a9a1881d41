"""The flows by name, for the CLI (`evolforge run --flow NAME`) and the deployments, and the
text each prints after a run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flows.data import data
from flows.factory import factory
from flows.rewards import rewards
from tasks.report import factory_summary, render_summary
from tasks.rewards.report import rewards_summary

FLOWS = {"factory": factory, "data": data, "rewards": rewards}
SUMMARIES: dict[str, Callable[[Any], str]] = {
    "factory": factory_summary,
    "data": render_summary,
    "rewards": rewards_summary,
}
