"""Rounds of Math Evol-Instruct put together: round 0 from the seeds, and after each round the
cumulative datasets and the next pool.

Round 0 is the seeds. Round r (1..rounds) evolves the pool of round r-1:

1. `evolve`     pool@r-1                    → `evolutions` (every draw, unparseable ones too)
2. `eliminate`  evolutions, pool            → `elimination` (dropped rows, rule + evidence),
                                              `elimination_checks` (probe answers, judgments)
3. `dedup`      survivors, instructions@r-1 → `dedup` (exact/near duplicates, contamination)
4. `combine`    all of the above            → `instructions` (cumulative), `eliminated`
                                              (cumulative, every removal with stage, rule,
                                              evidence, collided id), `pool` (kept evolutions,
                                              and the parents whose every evolution failed),
                                              `funnel` (cumulative counts)

After the last round `solve` (tasks.solutions.solve) writes CoT + PoT solutions for every
instruction and votes.
"""

from __future__ import annotations

import hashlib

import polars as pl

from tasks.evolution import funnel as funnel_mod
from tasks.evolution.evolve import EvolutionParams
from tasks.evolution.records import FunnelCounts, Instruction, Removed
from tasks.stage import StageOutput, stage


def seeds_as_instructions(seeds: pl.DataFrame) -> pl.DataFrame:
    return seeds.select(
        pl.col("id"),
        pl.lit(None, pl.String).alias("parent_id"),
        pl.col("id").alias("root_id"),
        pl.lit(0, pl.Int64).alias("round"),
        pl.lit("seed").alias("direction"),
        pl.lit("seed").alias("op"),
        pl.lit("").alias("template_version"),
        pl.col("source").alias("model"),
        pl.col("question").alias("text"),
    ).cast(Instruction.schema())


@stage(name="start_pool", outputs={"instructions": Instruction, "pool": Instruction})
def start_pool(seeds: pl.DataFrame) -> StageOutput:
    """Round 0: the seeds become the first instructions and the first pool."""
    rows = seeds_as_instructions(seeds)
    return StageOutput({"instructions": rows, "pool": rows}, {"pool": rows.height})


def removed_rows(elimination: pl.DataFrame, dedup: pl.DataFrame, round: int) -> pl.DataFrame:
    """Every removal of a round in one table: elimination rules and dedup/contamination rules."""
    parts = []
    if elimination.height:
        parts.append(
            elimination.with_columns(
                pl.lit("elimination").alias("stage"),
                pl.lit(None, pl.String).alias("collided_with"),
                pl.lit(None, pl.Float64).alias("similarity"),
            ).select(Removed.columns())
        )
    if dedup.height:
        parts.append(
            dedup.with_columns(
                pl.lit("dedup").alias("stage"), pl.col("detail").alias("evidence")
            ).select(Removed.columns())
        )
    if not parts:
        return Removed.empty()
    return pl.concat([p.cast(Removed.schema()) for p in parts]).with_columns(
        pl.lit(round, pl.Int64).alias("round")
    )


def next_pool(
    previous: pl.DataFrame, kept: pl.DataFrame, max_pool: int | None, seed: int, round: int
) -> pl.DataFrame:
    """Kept evolutions, plus each parent none of whose evolutions survived (it stays in the pool)."""
    returning = previous.join(kept.select(pl.col("parent_id").alias("id")), on="id", how="anti")
    pool = pl.concat([kept.select(Instruction.columns()), returning.select(Instruction.columns())])
    if max_pool is not None and pool.height > max_pool:
        keys = pool["id"].map_elements(
            lambda i: hashlib.sha256(f"{seed}:{round}:{i}".encode()).hexdigest(),
            return_dtype=pl.String,
        )
        pool = pool.with_columns(keys.alias("_k")).sort("_k").head(max_pool).drop("_k")
    return pool.sort("id")


@stage(
    name="combine",
    outputs={
        "instructions": Instruction,
        "eliminated": Removed,
        "pool": Instruction,
        "funnel": FunnelCounts,
    },
)
def combine_round(
    round: int,
    evolutions: pl.DataFrame,
    elimination: pl.DataFrame,
    dedup: pl.DataFrame,
    instructions: pl.DataFrame,
    pool: pl.DataFrame,
    eliminated: pl.DataFrame | None,
    funnel: pl.DataFrame | None,
    params: EvolutionParams,
) -> StageOutput:
    """Append the round's kept instructions and removals; build the next pool and the funnel."""
    removed = removed_rows(elimination, dedup, round)
    kept = evolutions.join(removed.select("id"), on="id", how="anti").select(Instruction.columns())
    counts = funnel_mod.round_funnel(evolutions, removed, kept)
    all_instructions = pl.concat(
        [instructions.cast(Instruction.schema()), kept.cast(Instruction.schema())]
    )
    previous_removed = eliminated if eliminated is not None else Removed.empty()
    all_removed = pl.concat([previous_removed.cast(Removed.schema()), removed])
    previous_counts = funnel if funnel is not None else FunnelCounts.empty()
    all_counts = pl.concat([previous_counts.cast(FunnelCounts.schema()), counts])
    new_pool = next_pool(pool, kept, params.max_pool, params.seed, round)
    totals = counts.select([pl.col(c).sum() for c in ["generated", *funnel_mod.OUTCOMES]]).row(
        0, named=True
    )
    stats = {
        "round": round,
        **totals,
        "pool": new_pool.height,
        "instructions": all_instructions.height,
    }
    frames = {
        "instructions": all_instructions,
        "eliminated": all_removed,
        "pool": new_pool,
        "funnel": all_counts,
    }
    return StageOutput(frames, stats)
