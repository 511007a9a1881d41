"""The training-sets flow: SFT set, IRM pairs, PRM steps and RL prompts from the data and reward
datasets, each with a held-out split by root seed.

    seeds, sft_answers, instructions, solutions, answers ─► build_sft_set     ─► sft_set
    irm_pairs, instructions                              ─► build_irm_set     ─► irm_set
    step_labels, instructions, solutions                 ─► build_prm_steps   ─► prm_steps
    seeds, instructions, answers, rewards                ─► build_rl_prompts  ─► rl_prompts

The factory passes the states of the data and reward flows (`TrainingSetsState.from_states`);
run alone (`evolforge run --flow training_sets`) it reads the newest versions in the data home.
A set whose input is missing (no reward flow yet: no `irm_pairs`, `step_labels`) is skipped.
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from flows.reports.training import publish_training_sets_report
from flows.state import TrainingSetsState
from storage.locks import run_lock
from storage.settings import home
from tasks.executors import ExecutorSettings, executor_scope
from tasks.training.sets import (
    TrainingSetParams,
    build_irm_set,
    build_prm_steps,
    build_rl_prompts,
    build_sft_set,
)


class TrainingSetsParams(BaseModel):
    """Training sets from the data and reward datasets."""

    model_config = ConfigDict(extra="forbid")

    training_sets: TrainingSetParams = Field(
        default_factory=TrainingSetParams,
        title="Training sets",
        description="SFT (CoT/PoT mix), IRM pairs, PRM steps (labeller), RL prompts; held-out split by seed.",
    )


@flow(name="training_sets", log_prints=False, validate_parameters=True)
def training_sets(
    params: TrainingSetsParams = TrainingSetsParams(),
    inputs: TrainingSetsState | None = None,
    executor: ExecutorSettings = ExecutorSettings(),
) -> TrainingSetsState:
    """SFT set, IRM pairs, PRM steps and RL prompts, split by root seed."""
    if not params.training_sets.enabled:
        return inputs if inputs is not None else TrainingSetsState()
    with run_lock(home(), "training_sets"), executor_scope(executor):
        return _build(params, inputs if inputs is not None else TrainingSetsState.newest())


def _build(params: TrainingSetsParams, state: TrainingSetsState) -> TrainingSetsState:
    sets = params.training_sets
    if sets.sft.enabled:
        state = state.updated(
            build_sft_set(
                seeds=state.seeds,
                instructions=state.instructions,
                sft_answers=state.sft_answers,
                solutions=state.solutions,
                answers=state.answers,
                split=sets.split,
                params=sets.sft,
            )
        )
    if sets.irm.enabled and state.irm_pairs is not None:
        state = state.updated(
            build_irm_set(
                irm_pairs=state.irm_pairs,
                instructions=state.instructions,
                split=sets.split,
                params=sets.irm,
            )
        )
    if sets.prm.enabled and state.step_labels is not None:
        state = state.updated(
            build_prm_steps(
                step_labels=state.step_labels,
                instructions=state.instructions,
                solutions=state.solutions,
                split=sets.split,
                params=sets.prm,
            )
        )
    if sets.rl.enabled:
        state = state.updated(
            build_rl_prompts(
                seeds=state.seeds,
                instructions=state.instructions,
                answers=state.answers,
                rewards=state.rewards,
                split=sets.split,
                params=sets.rl,
            )
        )
    publish_training_sets_report(state=state)
    return state


if __name__ == "__main__":
    training_sets()
