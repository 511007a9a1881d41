"""The data flow: seeds → SFT answers → evolution rounds → solutions → difficulty.

The body reads like a recipe: it calls stages with keywords and passes typed state (dataset
versions) along; stages read and write the data, report tasks publish artifacts.

Run it on its own with `evolforge run --flow data --config configs/demo.yaml`; the factory flow
runs it first.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.params import DataParams
from flows.reports.data import publish_data_report, publish_round_funnel
from flows.state import DataState
from infra.engines import engine_scope
from storage.datasets import DatasetStore
from storage.locks import run_lock
from storage.settings import home, shard_workers
from tasks.evolution.combine import combine_round, start_pool
from tasks.evolution.dedup import dedup_batch
from tasks.evolution.eliminate import eliminate_batch
from tasks.evolution.evolve import evolve_batch
from tasks.evolution.funnel import draw_funnel_plot
from tasks.executors import ExecutorSettings, executor_scope
from tasks.seeds import ingest_seeds
from tasks.solutions.difficulty import report_difficulty
from tasks.solutions.sft import write_sft_answers
from tasks.solutions.solve import solve_batch

# Shards of a stage are task runs on this runner; `EVOLFORGE_SHARD_WORKERS` sets how many run at
# once. The run's `executor` setting (kind ray) sends them to a Ray cluster instead.
RUNNER = ThreadPoolTaskRunner(max_workers=shard_workers())


@flow(name="evolve_round", flow_run_name="round-{round}", log_prints=True, task_runner=RUNNER)
def evolve_round(round: int, state: DataState, params: DataParams) -> DataState:
    """One round of Math Evol-Instruct: evolve → eliminate → dedup → combine."""
    evolved = evolve_batch(
        pool=state.pool, round=round, engine=params.engine, params=params.evolution
    )
    eliminated = eliminate_batch(
        evolutions=evolved["evolutions"],
        pool=state.pool,
        engine=params.engine,
        params=params.elimination,
    )
    deduped = dedup_batch(
        evolutions=evolved["evolutions"],
        elimination=eliminated["elimination"],
        instructions=state.instructions,
        dedup=params.dedup,
        decontamination=params.decontamination,
    )
    combined = combine_round(
        round=round,
        evolutions=evolved["evolutions"],
        elimination=eliminated["elimination"],
        dedup=deduped["dedup"],
        instructions=state.instructions,
        pool=state.pool,
        eliminated=state.eliminated,
        funnel=state.funnel,
        params=params.evolution,
    )
    publish_round_funnel(round=round, stats=combined.stats)
    for result in (evolved, eliminated, deduped, combined):
        state = state.updated(result, round=round)
    return state


def pin_irm(params: DataParams) -> DataParams:
    """Active Evol-Instruct's IRM named by its model name alone (`irm_model`: the newest trained
    one) pinned to that version (`irm_model@<version>`), so elimination's version follows the
    IRM's weights. Where none is trained yet (a fresh data home: the IRM learns from this flow's
    own rounds), the rounds run without the IRM rule, and the log says so; the first run after
    the IRM is trained applies it (WizardMath trains the reward models before the evolution they
    filter)."""
    name = params.elimination.irm_model
    if name is None or "@" in name or Path(name).expanduser().is_dir():
        return params
    store = DatasetStore(home())
    if store.versions(name):
        pinned: str | None = str(store.latest(name).ref)
        print(f"Active Evol-Instruct: the IRM is {pinned}")
    else:
        pinned = None
        print(
            f"Active Evol-Instruct: no {name} trained yet in this data home; the rounds run "
            "without the IRM rule, which applies from the first run after the IRM is trained"
        )
    elimination = params.elimination.model_copy(update={"irm_model": pinned})
    return params.model_copy(update={"elimination": elimination})


@flow(name="data", log_prints=True, validate_parameters=True, task_runner=RUNNER)
def data(
    params: DataParams = DataParams(), executor: ExecutorSettings = ExecutorSettings()
) -> DataState:
    """Seeds → SFT answers → evolution rounds → CoT/PoT solutions → difficulty check."""
    with run_lock(home(), "data"), engine_scope(), executor_scope(executor):
        params = pin_irm(params)
        seeds = ingest_seeds(params=params.seeds)
        state = DataState(seeds=seeds["seeds"]).updated(seeds)
        if params.sft.enabled:
            state = state.updated(
                write_sft_answers(seeds=state.seeds, engine=params.engine, params=params.sft)
            )
        state = state.updated(start_pool(seeds=state.seeds), round=0)
        for round in range(1, params.evolution.rounds + 1):
            state = evolve_round(round=round, state=state, params=params)
        if params.solutions.enabled:
            state = state.updated(
                solve_batch(
                    instructions=state.instructions,
                    seeds=state.seeds,
                    engine=params.engine,
                    params=params.solutions,
                )
            )
        state = state.updated(
            report_difficulty(instructions=state.instructions, answers=state.answers)
        )
        if state.funnel is not None:
            state = state.updated(draw_funnel_plot(funnel=state.funnel))
        publish_data_report(state=state)
        return state


if __name__ == "__main__":
    data()
