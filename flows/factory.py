"""The factory flow: seeds → SFT answers → seed solutions → evolution rounds → report.

The body reads like a recipe: it calls tasks and subflows in order and passes dataset
references (`name@version`) between them. No files or models are opened here.

Run it: `evolforge run --config configs/demo.yaml`, from the Prefect UI (deployments in
`infra/serve.py`), or `python -m flows.factory`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.evolution import evolve_round
from flows.params import FactoryParams
from tasks.report import publish_report
from tasks.rounds import report_difficulty, solve_batch, start_pool, write_sft_answers
from tasks.seeds import ingest_seeds


@flow(name="factory", log_prints=True, validate_parameters=True)
def factory(params: FactoryParams = FactoryParams()) -> dict[str, Any]:
    """Build math instruction data from seed problems (WizardMath RLEIF + MAmmoTH rationales)."""
    seeds = ingest_seeds(params.seeds)
    summary: dict[str, Any] = {"seeds": seeds, "steps": {}, "rounds": []}
    seeds_ref = seeds["refs"]["seeds"]
    if params.sft.enabled:
        summary["sft"] = write_sft_answers(seeds_ref, params.engine, params.sft)
    start = start_pool(seeds_ref)
    state: dict[str, str | None] = {"seeds": seeds_ref, **start["refs"]}
    if params.solutions.enabled:
        solved = solve_batch(
            0, state["instructions"], seeds_ref, None, None, params.engine, params.solutions
        )
        state.update(solved["refs"])
        summary["seed_solutions"] = solved
    for round in range(1, params.evolution.rounds + 1):
        result = evolve_round(round, state, params)
        state = result["state"]
        summary["rounds"].append(result["steps"])
    summary["report"] = report_difficulty(
        state["instructions"], state.get("answers"), state.get("funnel")
    )
    summary["state"] = state
    publish_report(summary)
    return summary


if __name__ == "__main__":
    factory()
