"""One round of Math Evol-Instruct as a Prefect subflow: evolve → eliminate → dedup → combine →
solve. It passes dataset references between cached tasks; each task's outputs are versions
named by the hash of its inputs, so a rerun of an unchanged round is all cache hits."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.params import FactoryParams
from tasks.rounds import combine_round, dedup_batch, eliminate_batch, evolve_batch, solve_batch


@flow(name="evolve_round", flow_run_name="round-{round}", log_prints=True)
def evolve_round(round: int, state: dict[str, str | None], params: FactoryParams) -> dict[str, Any]:
    """Evolve the pool of round `round - 1`; returns the new dataset refs and the round's counts."""
    evolved = evolve_batch(round, state["pool"], params.engine, params.evolution)
    evolutions = evolved["refs"]["evolutions"]
    eliminated = eliminate_batch(evolutions, state["pool"], params.engine, params.elimination)
    elimination = eliminated["refs"]["elimination"]
    deduped = dedup_batch(
        evolutions, elimination, state["instructions"], params.dedup, params.decontamination
    )
    combined = combine_round(
        round,
        evolutions,
        elimination,
        deduped["refs"]["dedup"],
        state["instructions"],
        state["pool"],
        state.get("eliminated"),
        state.get("funnel"),
        params.evolution,
    )
    new_state = {**state, **combined["refs"]}
    steps = {"evolve": evolved, "eliminate": eliminated, "dedup": deduped, "combine": combined}
    if params.solutions.enabled:
        solved = solve_batch(
            round,
            new_state["instructions"],
            state["seeds"],
            state.get("solutions"),
            state.get("answers"),
            params.engine,
            params.solutions,
        )
        new_state.update(solved["refs"])
        steps["solve"] = solved
    totals = combined["stats"]
    create_table_artifact(
        key=f"funnel-round-{round}",
        table=[
            {
                k: totals.get(k)
                for k in (
                    "round",
                    "generated",
                    "eliminated",
                    "duplicate",
                    "contaminated",
                    "kept",
                    "pool",
                )
            }
        ],
        description=f"Evolution funnel of round {round}",
    )
    print(
        f"round {round}: generated {totals['generated']} → eliminated {totals['eliminated']}, "
        f"duplicate {totals['duplicate']}, contaminated {totals['contaminated']} → kept {totals['kept']}"
    )
    return {"state": new_state, "steps": steps}
