"""The rewards flow: IRM rankings, PRM step labels and r = rI · rA from the data flow's output.

    siblings ─► rank_siblings ─► instruction_rankings, irm_pairs ─────────────┐
    solutions ─► segment_solutions ─► judge_steps ──┐                           ├─► compute_rewards
                                  └─► rollout_steps ─┴─► label_steps ─► step_labels ┘

It reads the data flow's `DataState` (instructions, solutions, answers, seeds): the factory
passes the state it just made; run alone (`evolforge run --flow rewards`), it takes the newest
versions in the data home. Every stage is cached on its inputs and parameters, so a rerun costs
nothing and a change to, say, the Monte Carlo settings recomputes only the rollouts and what
follows them.
"""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field

from flows.reports.rewards import publish_rewards_report
from flows.state import DataState, RewardState
from infra.engines import EngineConfig, engine_scope
from storage.errors import UserError
from storage.locks import run_lock
from storage.settings import home, shard_workers
from tasks.executors import ExecutorSettings, executor_scope
from tasks.rewards.consensus import label_steps
from tasks.rewards.monte_carlo import MonteCarloParams, rollout_steps
from tasks.rewards.rankings import RankingParams, rank_siblings
from tasks.rewards.scores import ScoringParams, compute_rewards
from tasks.rewards.segment import StepParams, segment_solutions
from tasks.rewards.siblings import SiblingParams, evolve_siblings
from tasks.rewards.step_judge import StepJudgeParams, judge_steps

RUNNER = ThreadPoolTaskRunner(max_workers=shard_workers())


class RewardParams(BaseModel):
    """IRM rankings, PRM step labels and r = rI · rA: the rewards flow."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="run the reward stages (the factory skips them when off)"
    )
    # Engines
    judge: EngineConfig = Field(
        default_factory=EngineConfig,
        title="Judge engine",
        description="Ranks sibling evolutions and names the first incorrect step of solutions.",
    )
    evolvers: list[EngineConfig] = Field(
        default_factory=lambda: [EngineConfig()],
        min_length=1,
        title="Evolver engines",
        description="Write the sibling evolutions, k per parent spread over them (WizardMath: two).",
    )
    completer: EngineConfig = Field(
        default_factory=EngineConfig,
        title="Completer engine",
        description="Completes solutions from each step prefix (Monte Carlo labels).",
    )
    # Stages
    siblings: SiblingParams = Field(
        default_factory=SiblingParams,
        description="Which parents get sibling evolutions (share, cap per round) and how many (k).",
    )
    ranking: RankingParams = Field(
        default_factory=RankingParams,
        description="The listwise judge: two seeded orders per group, reason length.",
    )
    steps: StepParams = Field(
        default_factory=StepParams,
        description="Which solutions get step labels (max_solutions_per_round caps the cost).",
    )
    step_judge: StepJudgeParams = Field(
        default_factory=StepJudgeParams, description="The step judge (first incorrect step)."
    )
    monte_carlo: MonteCarloParams = Field(
        default_factory=MonteCarloParams,
        description="Math-Shepherd rollouts: n completions from every step prefix.",
    )
    scoring: ScoringParams = Field(
        default_factory=ScoringParams,
        description="rA from the step labels: which label scores a step, min or product.",
    )


def _check_inputs(data: DataState) -> DataState:
    missing = [n for n in ("instructions", "solutions", "answers") if getattr(data, n) is None]
    if missing:
        raise UserError(
            f"the rewards flow needs {', '.join(missing)} from the data flow "
            "(run `evolforge run --flow data` with solutions enabled)"
        )
    return data


@flow(name="rewards", log_prints=True, validate_parameters=True, task_runner=RUNNER)
def rewards(
    params: RewardParams = RewardParams(),
    data: DataState | None = None,
    executor: ExecutorSettings = ExecutorSettings(),
) -> RewardState:
    """Sibling rankings (IRM data), step labels (PRM data) and r = rI · rA per solution."""
    state = RewardState()
    if not params.enabled:
        return state
    with run_lock(home(), "rewards"), engine_scope(), executor_scope(executor):
        return _label(params, _check_inputs(data if data is not None else DataState.newest()))


def _label(params: RewardParams, data: DataState) -> RewardState:
    state = RewardState()
    state = state.updated(
        evolve_siblings(
            instructions=data.instructions, evolvers=params.evolvers, params=params.siblings
        )
    )
    state = state.updated(
        rank_siblings(
            siblings=state.siblings,
            instructions=data.instructions,
            judge=params.judge,
            params=params.ranking,
        )
    )
    state = state.updated(
        segment_solutions(
            solutions=data.solutions,
            answers=data.answers,
            instructions=data.instructions,
            seeds=data.seeds,
            params=params.steps,
        )
    )
    state = state.updated(
        judge_steps(
            segmented_solutions=state.segmented_solutions,
            judge=params.judge,
            params=params.step_judge,
        )
    )
    state = state.updated(
        rollout_steps(
            segmented_solutions=state.segmented_solutions,
            engine=params.completer,
            params=params.monte_carlo,
        )
    )
    state = state.updated(
        label_steps(
            segmented_solutions=state.segmented_solutions,
            step_judgments=state.step_judgments,
            step_rollouts=state.step_rollouts,
        )
    )
    state = state.updated(
        compute_rewards(
            solutions=data.solutions,
            instructions=data.instructions,
            instruction_rankings=state.instruction_rankings,
            step_labels=state.step_labels,
            params=params.scoring,
        )
    )
    publish_rewards_report(state=state)
    return state


if __name__ == "__main__":
    rewards()
