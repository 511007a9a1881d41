"""The factory flow: seeds → SFT answers → evolution rounds → solutions → summary.

The body reads like a recipe: it calls tasks and subflows in order and passes dataset
references (`name@version`) between them. No files or models are opened here.

Run it: `evolforge run --config configs/demo.yaml`, from the Prefect UI (deployments in
`infra/serve.py`), or `python -m flows.factory`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.params import FactoryParams
from tasks.seeds import ingest_seeds


@flow(name="factory", log_prints=True, validate_parameters=True)
def factory(params: FactoryParams = FactoryParams()) -> dict[str, Any]:
    """Build math instruction data from seed problems (WizardMath RLEIF + MAmmoTH rationales)."""
    seeds = ingest_seeds(params.seeds)
    summary: dict[str, Any] = {"seeds": seeds}
    return summary


if __name__ == "__main__":
    factory()
