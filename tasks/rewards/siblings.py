"""Sibling evolutions for the instruction reward model's data (the `evolve_siblings` stage).

WizardMath's IRM data: for each instruction, 2-4 evolutions from each of two evolvers, the 4-8
ranked by quality. Here, for a seeded share of each round's parents (capped per round), the
sibling group of a parent in round r is

- its own evolutions of round r from the data flow (`instructions`, `source = "instructions"`):
  they are siblings in fact, and ranking them gives the rI of the instructions that have
  solutions;
- `k` new evolutions, spread over the evolver engines in turn (k = 4 with two evolvers: two
  each), each with an operation drawn from the Evol-Instruct mix and rendered from the same
  templates as the data flow (`source = "evolver"`, `evolver` = the engine's index).

New evolutions are not eliminated: the ranking is where a bad evolution should come last. An
evolution whose reply could not be parsed keeps its row with `text` null (the ranking stage
counts it as unrankable). Request seeds are derived from ("siblings", seed, evolver) and the
evolution id, so a sibling never replays the data flow's own request from the cache.

Rounds come from the data: parents of round r are the `parent_id`s of round-r instructions, so
a parent evolved again in a later round (its first evolution was eliminated) forms a group per
round.
"""

from __future__ import annotations

from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from infra.engines import EngineConfig
from infra.engines.base import SamplingParams
from tasks.evolution.evolve import (
    EvolutionMix,
    EvolverSampling,
    build_evolution_requests,
    draw_operations,
    make_instructions,
)
from tasks.frames import require_columns
from tasks.rewards.judging import stable_int, unit_draw
from tasks.rewards.records import Sibling
from tasks.stage import StageContext, StageOutput, stage


class SiblingParams(BaseModel):
    """Which parents get sibling evolutions, how many, and how they are sampled."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(
        4, ge=1, le=16, description="new evolutions per parent, spread over the evolvers in turn"
    )
    share: float = Field(
        0.1, ge=0, le=1, description="seeded share of each round's parents that get siblings"
    )
    max_parents_per_round: int | None = Field(
        None, ge=1, description="cap on parents per round after the share (None: no cap)"
    )
    include_data_evolutions: bool = Field(
        True, description="rank the data flow's own evolutions of the parent with the new ones"
    )
    mix: EvolutionMix = Field(default_factory=EvolutionMix)
    seed: int = 0
    sampling: EvolverSampling = Field(
        default_factory=EvolverSampling, description="sampling of the evolvers"
    )

    def evolver_sampling(self, evolver: int) -> SamplingParams:
        """Each evolver samples with its own seed."""
        return self.sampling.engine_params(seed=stable_int("siblings", self.seed, evolver, bits=31))


def per_evolver(k: int, evolvers: int) -> list[int]:
    """k new evolutions spread over the evolvers in turn: 4 over 2 → [2, 2], 5 over 2 → [3, 2]."""
    if evolvers < 1:
        raise ValueError("need at least one evolver engine")
    return [k // evolvers + (1 if e < k % evolvers else 0) for e in range(evolvers)]


def select_parents(instructions: pl.DataFrame, params: SiblingParams) -> pl.DataFrame:
    """(parent_id, round) of the groups that get siblings: a seeded share of each round's
    parents, the first `max_parents_per_round` of them by the same seeded draw."""
    require_columns(instructions, ["id", "parent_id", "round"], "select_parents instructions")
    pairs = (
        instructions.filter(pl.col("round") >= 1, pl.col("parent_id").is_not_null())
        .select("parent_id", "round")
        .unique()
    )
    rows = []
    for pid, rnd in pairs.iter_rows():
        draw = unit_draw("sibling-parents", params.seed, rnd, pid)
        if draw < params.share:
            rows.append({"parent_id": pid, "round": rnd, "_draw": draw})
    chosen = pl.DataFrame(
        rows, schema={"parent_id": pl.String, "round": pl.Int64, "_draw": pl.Float64}
    ).sort("round", "_draw", "parent_id")
    if params.max_parents_per_round is not None:
        chosen = chosen.group_by("round", maintain_order=True).head(params.max_parents_per_round)
    return chosen.select("parent_id", "round").sort("round", "parent_id")


def sibling_evolutions(
    instructions: pl.DataFrame,
    groups: pl.DataFrame,
    evolvers: list[Any],
    params: SiblingParams,
) -> pl.DataFrame:
    """The sibling groups (`Sibling`), ordered by round, parent, source, id.

    `evolvers` are engines (anything with `generate` and `identity`), one per evolver config.
    """
    require_columns(
        instructions, ["id", "parent_id", "root_id", "round", "text"], "siblings instructions"
    )
    by_id = instructions.unique("id", keep="first")
    parents_of = {
        r: groups.filter(pl.col("round") == r)["parent_id"].to_list()
        for r in groups["round"].unique()
    }
    frames = []
    if params.include_data_evolutions and groups.height:
        own = instructions.join(groups, on=["parent_id", "round"], how="semi")
        frames.append(
            own.select(
                pl.col("id"),
                pl.col("parent_id"),
                pl.col("root_id"),
                pl.col("round"),
                pl.lit("instructions").alias("source"),
                pl.lit(None, dtype=pl.Int64).alias("evolver"),
                *[
                    (pl.col(c) if c in own.columns else pl.lit(None, dtype=pl.String)).alias(c)
                    for c in ("direction", "op", "model", "template_version", "text")
                ],
                pl.lit(None, dtype=pl.String).alias("finish_reason"),
                pl.lit(None, dtype=pl.String).alias("error"),
            )
        )
    counts = per_evolver(params.k, len(evolvers))
    for e, (engine, k_e) in enumerate(zip(evolvers, counts, strict=True)):
        if k_e == 0:
            continue
        # Every round's requests of this evolver go to the engine as one batch.
        batches = []
        for rnd, parent_ids in sorted(parents_of.items()):
            parents = by_id.filter(pl.col("id").is_in(parent_ids))
            missing = sorted(set(parent_ids) - set(parents["id"]))
            if missing:
                raise ValueError(f"siblings: parent {missing[0]!r} is not in instructions")
            draws = draw_operations(
                sorted(parent_ids), stable_int("siblings", params.seed, e), rnd, params.mix, k_e
            )
            requests = build_evolution_requests(
                parents, draws, params.evolver_sampling(e), round=rnd
            )
            batches.append((rnd, parents, draws, requests))
        if not batches:
            continue
        responses = engine.generate([r for *_, requests in batches for r in requests])
        offset = 0
        for rnd, parents, draws, requests in batches:
            part = responses[offset : offset + len(requests)]
            offset += len(requests)
            made = make_instructions(parents, draws, part, engine.identity, round=rnd)
            frames.append(
                made.select(
                    (pl.lit(f"s{e}-") + pl.col("id")).alias("id"),
                    "parent_id",
                    "root_id",
                    "round",
                    pl.lit("evolver").alias("source"),
                    pl.lit(e, dtype=pl.Int64).alias("evolver"),
                    "direction",
                    "op",
                    "model",
                    "template_version",
                    "text",
                    "finish_reason",
                    "error",
                )
            )
    if not frames:
        return Sibling.empty()
    out = pl.concat(frames, how="diagonal_relaxed").with_columns(
        (pl.col("parent_id") + "@" + pl.col("round").cast(pl.String)).alias("group_id")
    )
    return out.select([pl.col(c).cast(t) for c, t in Sibling.schema().items()]).sort(
        "round", "parent_id", "source", "id", descending=[False, False, True, False]
    )


@stage(name="evolve_siblings", outputs={"siblings": Sibling})
def evolve_siblings(
    ctx: StageContext,
    instructions: pl.DataFrame,
    evolvers: list[EngineConfig],
    params: SiblingParams,
) -> StageOutput:
    """k sibling evolutions per sampled parent from the evolver engines, with the parent's own."""
    groups = select_parents(instructions, params)
    engines = [ctx.engine(config) for config in evolvers]
    frame = sibling_evolutions(instructions, groups, engines, params)
    eligible = (
        instructions.filter(pl.col("round") >= 1).select("parent_id", "round").unique().height
    )
    stats = {
        "eligible_parents": eligible,
        "parents": groups.height,
        "siblings": frame.height,
        "from_instructions": frame.filter(pl.col("source") == "instructions").height,
        "generated": frame.filter(pl.col("source") == "evolver").height,
        "unparsed": frame.filter(pl.col("text").is_null()).height,
    }
    return StageOutput({"siblings": frame}, stats)
