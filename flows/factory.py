"""The factory flow: the data flow, then the flows that consume its datasets.

Run it: `evolforge run --config configs/demo.yaml`, from the Prefect UI (deployments in
`flows/serve.py`), or `python -m flows.factory`.
"""

from __future__ import annotations

from prefect import flow

from flows.data import data
from flows.evaluation import evaluation, pinned
from flows.params import FactoryParams
from flows.reports.factory import publish_factory_report
from flows.rewards import rewards
from flows.state import FactoryState, TrainingSetsState, TrainingState
from flows.training import TrainingParams, training
from flows.training_sets import TrainingSetsParams, training_sets
from infra.engines import describe_engines
from storage.locks import run_lock
from storage.settings import home
from tasks.executors import executor_scope


@flow(name="factory", log_prints=True, validate_parameters=True)
def factory(params: FactoryParams = FactoryParams()) -> FactoryState:
    """Build math instruction data from seed problems (WizardMath RLEIF + MAmmoTH rationales),
    label its rewards, then train and evaluate on it."""
    params.check_factory()
    for line in describe_engines(params):  # in the run's log, for runs started from the UI
        print(line)
    executor = params.executor  # one Ray connection for the whole run: each flow reuses it
    with run_lock(home(), "factory"), executor_scope(executor):
        data_state = data(params=params.data_params(), executor=executor)
        reward_state = rewards(params=params.rewards, data=data_state, executor=executor)
        sets = training_sets(
            params=params.for_flow(TrainingSetsParams),
            inputs=TrainingSetsState.from_states(data_state, reward_state),
            executor=executor,
        )
        trained = training(
            params=params.for_flow(TrainingParams),
            inputs=TrainingState.from_states(sets),
            executor=executor,
        )
        evaluated = (
            evaluation(params=pinned(params.evaluation, trained), executor=executor)
            if params.evaluation.enabled
            else None
        )
        state = FactoryState(
            data=data_state,
            rewards=reward_state,
            training_sets=sets,
            training=trained,
            evaluation=evaluated,
        )
        publish_factory_report(state=state)
        return state


if __name__ == "__main__":
    factory()
