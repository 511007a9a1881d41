"""Serve the factory's deployments to a Prefect server: nightly and ad hoc, and each flow alone.

- `factory/nightly`: a scheduled refresh at 02:00 every day (cron `0 2 * * *`), with at most one
  run at a time (further runs queue); it runs the profile named by `EVOLFORGE_NIGHTLY_CONFIG`
  (default `configs/nightly.yaml`: the demo's settings over the built-in sample plus every seed
  file dropped into `$EVOLFORGE_HOME/inbox`, re-read each night).
- `factory/adhoc`: no schedule; trigger it from the Prefect UI ("Run" → custom run), where the
  `FactoryParams` model renders as a form, or with
  `prefect deployment run factory/adhoc --param params='{"evolution": {"rounds": 2}}'`.
- `data/adhoc` (and one per further flow): each part of the factory on its own, reading the
  newest datasets of the data home for its inputs.

`python -m flows.serve` registers them with the server at `PREFECT_API_URL` and executes their
runs in this process until interrupted (`make serve` starts a local server and this). For work
pools and workers instead, see `infra/prefect.yaml`.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import serve

from flows.factory import factory
from flows.params import load_factory_params
from flows.registry import FLOWS
from flows.ui import for_the_ui
from storage.settings import PROJECT_ROOT, home

NIGHTLY_CRON = "0 2 * * *"


def build_deployments(nightly_config: str | Path | None = None):
    config = (
        nightly_config
        or os.environ.get("EVOLFORGE_NIGHTLY_CONFIG")
        or PROJECT_ROOT / "configs" / "nightly.yaml"
    )
    os.environ.setdefault("EVOLFORGE_HOME", str(home()))
    (home() / "inbox").mkdir(exist_ok=True)  # the nightly profile's folder of new seed files
    nightly_params = load_factory_params(config, [])
    nightly_params.check_factory()
    nightly = factory.to_deployment(
        name="nightly",
        cron=NIGHTLY_CRON,
        concurrency_limit=1,
        parameters={"params": nightly_params.model_dump(mode="json")},
        description="Nightly refresh of the factory's datasets (02:00, one run at a time).",
        tags=["evolforge", "nightly"],
    )
    adhoc = [
        entry.flow.to_deployment(
            name="adhoc",
            description=f"Run the {name} flow with parameters from the UI form.",
            tags=["evolforge", "adhoc"],
        )
        for name, entry in FLOWS.items()
    ]
    return tuple(for_the_ui(d) for d in (nightly, *adhoc))


def main() -> None:
    serve(*build_deployments())


if __name__ == "__main__":
    main()
