"""Typed flow state: the dataset versions a flow produced and the steps that produced them.

Flows pass these small objects between tasks and subflows instead of dicts of strings, and the
CLI and the report read them. They serialise to JSON (`name@version` strings), so they show as
plain text in the Prefect UI.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from storage.datasets import DatasetStore, Ref
from storage.settings import home
from tasks.stage import StageResult


class Step(BaseModel):
    """One stage run: what it wrote, whether it was a cache hit, and its stats."""

    stage: str
    round: int | None = None
    version: str
    cached: bool
    outputs: dict[str, str] = Field(default_factory=dict)
    stats: dict[str, Any] = Field(default_factory=dict)


class FlowState(BaseModel):
    """Common behaviour of flow states: fold a stage's result in."""

    model_config = ConfigDict(extra="forbid")

    steps: list[Step] = Field(default_factory=list)

    def updated(self, result: StageResult, round: int | None = None) -> FlowState:
        """A copy with the result's outputs that are fields of this state, and its step."""
        refs = {name: ref for name, ref in result.refs.items() if name in type(self).model_fields}
        step = Step(
            stage=result.stage,
            round=round,
            version=result.version,
            cached=result.cached,
            outputs={name: str(ref) for name, ref in result.refs.items()},
            stats=result.stats,
        )
        return self.model_copy(update={**refs, "steps": [*self.steps, step]})

    def refs(self) -> dict[str, str]:
        """The dataset versions this state holds, by name."""
        return {
            name: str(value)
            for name in type(self).model_fields
            if name != "steps" and (value := getattr(self, name)) is not None
        }


class DataState(FlowState):
    """What the data flow leaves for the flows after it."""

    seeds: Ref
    seeds_rejected: Ref | None = None
    sft_answers: Ref | None = None
    instructions: Ref | None = None
    pool: Ref | None = None
    eliminated: Ref | None = None
    funnel: Ref | None = None
    solutions: Ref | None = None
    answers: Ref | None = None
    difficulty: Ref | None = None
    funnel_plot: Ref | None = None

    @classmethod
    def newest(cls) -> DataState:
        """The newest version of each dataset in the data home (for a flow run on its own)."""
        store = DatasetStore(home())
        found: dict[str, Any] = {}
        for name in cls.model_fields:
            if name != "steps" and store.versions(name):
                found[name] = store.latest(name).ref
        if "seeds" not in found:
            from storage.errors import UserError

            raise UserError("no seeds in this data home: run `evolforge run` (or the data flow)")
        return cls(**found)
