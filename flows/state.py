"""Typed flow state: the dataset versions a flow produced and the steps that produced them.

Flows pass these small objects between tasks and subflows instead of dicts of strings, and the
CLI and the reports (`flows/reports/`) read them. Every flow's state is here, apart from the flow
that fills it, so a report imports the state it renders without importing the flow (which
imports the report). They serialise to JSON (`name@version` strings), so they show as
plain text in the Prefect UI.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from storage.datasets import DatasetStore, Ref
from storage.errors import UserError
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
            raise UserError("no seeds in this data home: run `evolforge run` (or the data flow)")
        return cls(**found)


class RewardState(FlowState):
    """What the rewards flow leaves for the training flows."""

    siblings: Ref | None = None
    instruction_rankings: Ref | None = None
    irm_pairs: Ref | None = None
    segmented_solutions: Ref | None = None
    step_judgments: Ref | None = None
    step_rollouts: Ref | None = None
    step_labels: Ref | None = None
    rewards: Ref | None = None


TRAINING_SETS_INPUTS = (
    "seeds",
    "instructions",
    "sft_answers",
    "solutions",
    "answers",
    "irm_pairs",
    "step_labels",
    "rewards",
)


class TrainingSetsState(FlowState):
    """The datasets the training sets are built from, and the sets."""

    seeds: Ref | None = None
    instructions: Ref | None = None
    sft_answers: Ref | None = None
    solutions: Ref | None = None
    answers: Ref | None = None
    irm_pairs: Ref | None = None
    step_labels: Ref | None = None
    rewards: Ref | None = None
    sft_set: Ref | None = None
    irm_set: Ref | None = None
    prm_steps: Ref | None = None
    rl_prompts: Ref | None = None

    @classmethod
    def from_states(cls, *states: FlowState) -> TrainingSetsState:
        """The inputs found in other flows' states (the data flow's, the reward flow's)."""
        found: dict[str, Any] = {}
        for state in states:
            found.update({k: v for k, v in state.refs().items() if k in TRAINING_SETS_INPUTS})
        return cls(**found)

    @classmethod
    def newest(cls) -> TrainingSetsState:
        """The newest version of each input in the data home (for a run on its own)."""
        store = DatasetStore(home())
        found = {n: store.latest(n).ref for n in TRAINING_SETS_INPUTS if store.versions(n)}
        missing = [n for n in ("seeds", "instructions") if n not in found]
        if missing:
            raise UserError(
                f"no {', '.join(missing)} in this data home: run the data flow first "
                "(`evolforge run --flow data`)"
            )
        return cls(**found)


TRAINING_SETS = ("sft_set", "irm_set", "prm_steps", "rl_prompts")


class TrainingState(FlowState):
    """The training sets a run read and the checkpoints it made."""

    sft_set: Ref | None = None
    irm_set: Ref | None = None
    prm_steps: Ref | None = None
    rl_prompts: Ref | None = None
    sft_model: Ref | None = None
    irm_model: Ref | None = None
    prm_model: Ref | None = None
    rl_model: Ref | None = None
    training_curves: Ref | None = None

    @classmethod
    def from_states(cls, *states: FlowState) -> TrainingState:
        """The training sets found in other flows' states (the training-sets flow's)."""
        found: dict[str, Any] = {}
        for state in states:
            found.update({k: v for k, v in state.refs().items() if k in TRAINING_SETS})
        return cls(**found)

    @classmethod
    def newest(cls) -> TrainingState:
        """The newest version of each training set in the data home (for a run on its own)."""
        store = DatasetStore(home())
        found = {n: store.latest(n).ref for n in TRAINING_SETS if store.versions(n)}
        if not found:
            raise UserError(
                "no training sets in this data home: run `evolforge run --flow training_sets` first"
            )
        return cls(**found)


class EvaluationState(FlowState):
    """What an evaluation run wrote."""

    eval_items: Ref | None = None
    eval_contamination: Ref | None = None
    eval_requests: Ref | None = None
    eval_results: Ref | None = None
    eval_scores: Ref | None = None
    eval_chart: Ref | None = None


class FactoryState(BaseModel):
    """Each flow's state, in the order the factory ran them."""

    data: DataState
    rewards: RewardState | None = None
    training_sets: TrainingSetsState | None = None
    training: TrainingState | None = None
    evaluation: EvaluationState | None = None
