"""The factory flow: the data flow, then the flows that consume its datasets.

Run it: `evolforge run --config configs/demo.yaml`, from the Prefect UI (deployments in
`flows/serve.py`), or `python -m flows.factory`.
"""

from __future__ import annotations

from prefect import flow

from flows.data import data
from flows.params import DataParams, FactoryParams
from flows.state import DataState
from storage.locks import run_lock
from storage.settings import home


@flow(name="factory", log_prints=True, validate_parameters=True)
def factory(params: FactoryParams = FactoryParams()) -> DataState:
    """Build math instruction data from seed problems (WizardMath RLEIF + MAmmoTH rationales)."""
    with run_lock(home(), "factory"):
        return data(params=params.for_flow(DataParams))


if __name__ == "__main__":
    factory()
