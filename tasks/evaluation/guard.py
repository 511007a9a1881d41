"""The contamination guard: benchmark items found in the training sets a model was trained on.

Before scores are trusted, each evaluated item is compared with the training sets the model's
lineage leads to (`tasks.evaluation.models.training_sets`) by the decontamination SQL of the data
flow (`tasks.evolution.dedup.find_contamination`: word n-gram overlap, the same thresholds): a
training row holding at least `overlap_threshold` of a benchmark item's informative n-grams
flags that item for that model. Each training row reports its closest benchmark item.

`eval_contamination` has one row per model x evaluated item: `contaminated` (null when the
model's training sets are unknown: the base, a folder, a served model; its overlap in
`eval_scores` is then null, not 0), the closest flagged training row (training_set, training_id,
similarity, detail) and how many training rows hold the item (`matches`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import polars as pl

from storage.catalog import connect
from storage.datasets import DatasetStore
from storage.settings import home
from tasks.benchmarks import Benchmark
from tasks.evaluation.models import TRAINING_TEXT_COLUMNS, ModelTarget
from tasks.evaluation.records import Contamination, TrainingOverlap
from tasks.evolution.dedup import (
    DecontamParams,
    DedupParams,
    NgramRule,
    configure,
    find_contamination,
)
from tasks.stage import StageOutput, stage


class GuardParams(NgramRule):
    """The n-gram overlap rule of decontamination, applied to benchmark items vs training sets."""

    enabled: bool = True

    def decontam(self, benchmarks: list[Benchmark]) -> DecontamParams:
        return DecontamParams(benchmarks=benchmarks, **self.ngram_rule())


def training_texts(frame: pl.DataFrame, ref: str) -> pl.DataFrame:
    """(id, text) rows of a training set: its first text column, its `id` or the row number;
    rows without text are left out (they cannot hold a benchmark question)."""
    column = next((c for c in TRAINING_TEXT_COLUMNS if c in frame.columns), None)
    if column is None:
        raise ValueError(
            f"training set {ref} has none of the text columns {list(TRAINING_TEXT_COLUMNS)}"
        )
    ids = (
        frame["id"].cast(pl.String)
        if "id" in frame.columns
        else pl.Series([str(i) for i in range(frame.height)])
    )
    texts = frame[column].cast(pl.String)
    return pl.DataFrame({"id": ids, "text": texts}).filter(
        pl.col("text").is_not_null() & (pl.col("text").str.strip_chars() != "")
    )


def find_item_overlap(
    items: pl.DataFrame,
    training: dict[str, pl.DataFrame],
    params: GuardParams,
    cache_dir: Path | None = None,
) -> pl.DataFrame:
    """Per training set, its rows that hold an evaluated item: training_set, training_id,
    benchmark, item_id, similarity, detail."""
    out: list[pl.DataFrame] = []
    if not training or items.is_empty():
        return TrainingOverlap.empty()
    with tempfile.TemporaryDirectory(prefix="eval-guard-") as tmp:
        specs = []
        for name in items["benchmark"].unique(maintain_order=True).to_list():
            path = Path(tmp) / f"{name}.parquet"
            items.filter(pl.col("benchmark") == name).select("id", "question").write_parquet(path)
            specs.append(Benchmark(name=name, path=path, text_field="question", id_field="id"))
        cfg = params.decontam(specs)
        if cache_dir is not None:
            cfg.cache_dir = cache_dir
        for ref, frame in training.items():
            texts = training_texts(frame, ref)
            if texts.is_empty():
                continue
            con = connect()
            try:
                configure(con, DedupParams())
                found = find_contamination(con, texts, cfg, DedupParams(text_columns=("text",)))
            finally:
                con.close()
            if found.is_empty():
                continue
            where = (
                found["collided_with"]
                .str.splitn(":", 2)
                .struct.rename_fields(["benchmark", "item_id"])
            )
            out.append(
                found.with_columns(where.alias("w"))
                .unnest("w")
                .select(
                    pl.lit(ref).alias("training_set"),
                    pl.col("id").alias("training_id"),
                    "benchmark",
                    "item_id",
                    "similarity",
                    "detail",
                )
            )
    return pl.concat(out).cast(TrainingOverlap.schema()) if out else TrainingOverlap.empty()


def guard_models(
    items: pl.DataFrame,
    models: list[ModelTarget],
    params: GuardParams,
    store: DatasetStore,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """One `eval_contamination` row per model x item, and per-model flagged counts (None when a
    model's training sets are unknown or the guard is off)."""
    sets = sorted({ref for m in models for ref in m.training_sets})
    training = {ref: store.read(ref) for ref in sets} if params.enabled else {}
    overlap = find_item_overlap(items, training, params)
    keys = items.select(pl.col("benchmark"), pl.col("id").alias("item_id"))
    frames = []
    stats: dict[str, Any] = {}
    for model in models:
        checked = bool(model.training_sets) and params.enabled
        hits = (
            overlap.filter(pl.col("training_set").is_in(model.training_sets))
            .sort(["similarity", "training_set", "training_id"], descending=[True, False, False])
            .group_by(["benchmark", "item_id"], maintain_order=True)
            .agg(
                pl.col("training_set").first(),
                pl.col("training_id").first(),
                pl.col("similarity").first(),
                pl.col("detail").first(),
                pl.len().cast(pl.Int64).alias("matches"),
            )
        )
        frame = keys.join(hits, on=["benchmark", "item_id"], how="left").with_columns(
            pl.lit(model.label).alias("model"),
            (pl.col("matches").is_not_null() if checked else pl.lit(None, pl.Boolean)).alias(
                "contaminated"
            ),
        )
        frames.append(frame.select(Contamination.columns()))
        stats[model.label] = int(frame["contaminated"].sum()) if checked else None
    result = pl.concat(frames) if frames else Contamination.empty()
    return result.cast(Contamination.schema()), {"flagged_items": stats, "training_sets": sets}


@stage(name="eval_contamination", outputs={"eval_contamination": Contamination})
def guard_contamination(
    eval_items: pl.DataFrame, models: list[ModelTarget], params: GuardParams
) -> StageOutput:
    """Check the benchmark items against each model's training sets (decontamination SQL)."""
    frame, stats = guard_models(eval_items, models, params, DatasetStore(home()))
    return StageOutput({"eval_contamination": frame}, stats)
