"""The `eval_items` stage: the benchmark items an evaluation runs on (`tasks.benchmarks`).

One row per item (`tasks.records.BenchmarkItem`: benchmark, id, question, answer, choices,
subject, level, solution), a seeded subset of `limit` items per benchmark when a limit is given.
The version follows each benchmark file's content hash, the limit and the seed.
"""

from __future__ import annotations

import polars as pl

from tasks.benchmarks import BenchmarkSource, read_items
from tasks.records import BenchmarkItem
from tasks.stage import StageOutput, stage


def load_items(
    benchmarks: list[BenchmarkSource], limit: int | None = None, seed: int = 0
) -> pl.DataFrame:
    """Every benchmark's items (each a seeded subset of `limit`), benchmarks in the given order."""
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark names must be unique, got {names}")
    if not benchmarks:
        raise ValueError("no benchmarks to evaluate on")
    frames = [read_items(source, limit, seed) for source in benchmarks]
    return pl.concat(frames, how="vertical") if frames else BenchmarkItem.empty()


@stage(name="eval_items", outputs={"eval_items": BenchmarkItem})
def load_eval_items(benchmarks: list[BenchmarkSource], limit: int | None, seed: int) -> StageOutput:
    """Read the benchmark items to evaluate on (a seeded subset of `limit` per benchmark)."""
    items = load_items(benchmarks, limit, seed)
    per = dict(items.group_by("benchmark", maintain_order=True).len().iter_rows())
    return StageOutput({"eval_items": items}, {"items": items.height, "per_benchmark": per})
