"""What a stage body and the executors that run it exchange.

The declaration (`tasks/stage.py`) and the executors (`tasks/executors/`) both build on these
types; neither imports the other's internals. A stage body receives a `StageContext` and returns
a `StageOutput`; an executor returns a `StageResult` to the flow. `Shard` and `ShardSpec` say how
a row-wise stage is cut; `ParquetFiles` and `ArtifactDir` are input annotations.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from storage.datasets import DatasetRef

DEFAULT_SHARD_ROWS = 512
SHARD_PREFIX = "_shard."


class ParquetFiles(list):
    """Annotation: the input's parquet files (list[Path]) instead of a loaded frame."""


class ArtifactDir(type(Path())):  # type: ignore[misc]
    """Annotation: the folder of an artifact version (a model checkpoint) as a Path."""


@dataclass(frozen=True)
class Artifact:
    """An output that is a folder (a checkpoint, a tokenizer, plots), stored as a version;
    declared as `outputs={"sft_model": Artifact(kind="model")}`."""

    kind: str = "model"


@dataclass(frozen=True)
class Shard:
    """Run a row-wise stage over runs of about `rows` rows of the input `by`.

    Shard boundaries are content-defined: a shard ends after a row whose `key` hashes to 0
    modulo `rows` (and never holds fewer than rows/4 or more than 4 x rows), and wherever the
    value of `split_on` changes. So rows inserted into an input change only the shard they land
    in, and every other shard keeps its content, its version and its cached output.

    `lookups` maps another input to (column of the shard, column of that input): the shard
    receives only that input's rows it refers to (an evolution's parent in the pool), and those
    rows are part of the shard's cache key.
    """

    by: str
    rows: int = DEFAULT_SHARD_ROWS
    key: str = "id"
    split_on: str | None = None
    lookups: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Resources:
    """What one task run of a stage (each shard, or the stage itself) needs where it runs:
    declared as `@stage(..., resources=Resources(num_cpus=2))`. On a Ray cluster these become
    the task's Ray `remote_options` (`memory` in bytes); in process and on threads they are
    ignored. They never enter a version: where a stage runs does not change what it writes."""

    num_cpus: float | None = None
    num_gpus: float | None = None
    memory: int | None = None

    def options(self) -> dict[str, float | int]:
        """The declared fields, as Ray's `remote_options` (unset ones left to Ray)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class ShardSpec:
    """One shard of a stage's input: where it lies and its version (a hash of its content)."""

    index: int
    offset: int
    rows: int
    version: str


@dataclass
class StageOutput:
    """What a stage body returns: one frame per dataset output, and stats for the manifest."""

    frames: dict[str, pl.DataFrame] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    """The small value a stage returns: its output refs, whether it was cached, its stats."""

    stage: str
    version: str
    refs: dict[str, DatasetRef]
    cached: bool
    stats: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> DatasetRef:
        return self.refs[name]


class StageError(ValueError):
    """A stage declared or called wrongly (missing input, unknown parameter, missing output)."""


# What an executor hands a context to publish progress with: (done, total, description).
ProgressReporter = Callable[[float, float, "str | None"], None]


class StageContext:
    """Per-run services for a stage body: engines, artifact folders, extra stats, progress.

    The executor that runs the body makes it: `reporter` is where progress goes (a Prefect
    progress artifact in a flow run, nowhere in process)."""

    def __init__(
        self,
        name: str,
        version: str,
        home: Path,
        shard: str | None = None,
        reporter: ProgressReporter | None = None,
    ):
        self.name = name
        self.version = version
        self.home = home
        self.shard = shard
        self.stats: dict[str, Any] = {}
        self._engines: list[Any] = []
        self._counted: list[dict[str, float]] = []
        self._reporter = reporter

    def engine(self, config: Any) -> Any:
        """The configured engine behind the request cache; its counters go into this stage's
        stats (`engine`: requests, hits, misses, tokens, seconds)."""
        from infra.engines import open_engine

        engine = open_engine(config, self.name)
        self._engines.append(engine)
        return engine

    def count_engine(self, stats: dict[str, float]) -> None:
        """Add the counters of engines this body's work opened elsewhere (launched training
        processes) to this stage's `engine` stats."""
        self._counted.append(dict(stats))

    def engine_stats(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for stats in [engine.stats for engine in self._engines] + self._counted:
            for key, value in stats.items():
                total[key] = round(total.get(key, 0) + value, 3)
        return total

    def work_dir(self, output: str) -> Path:
        """A folder that survives a crash of this version's computation (checkpoints to resume
        from); removed once the version is written."""
        path = self.home / "datasets" / output / f".work-{self.version}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def output_dir(self, output: str) -> Path:
        """Where the body writes an artifact output's files; it becomes the version's folder."""
        path = self.work_dir(output) / "final"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def progress(self, done: float, total: float, description: str | None = None) -> None:
        """Progress of a long stage, for the executor to publish (nothing in process)."""
        if self._reporter is not None:
            self._reporter(done, total, description)


def frame_digest(frame: pl.DataFrame) -> str:
    """A hash of a frame's schema and rows (a shard's content)."""
    digest = hashlib.sha256(",".join(f"{k}:{v}" for k, v in frame.schema.items()).encode())
    for batch in frame.iter_slices(4096):
        digest.update(batch.write_ndjson().encode())
    return digest.hexdigest()


def shard_bounds(frame: pl.DataFrame, shard: Shard) -> Iterator[tuple[int, int]]:
    """(offset, rows) of each shard of `frame`: content-defined boundaries (see `Shard`)."""
    height = frame.height
    if height == 0:
        yield 0, 0
        return
    if shard.key in frame.columns:
        keys = frame[shard.key].cast(pl.String).fill_null("").to_list()
    else:
        keys = [str(h) for h in frame.hash_rows(seed=0).to_list()]
    splits = frame[shard.split_on].to_list() if shard.split_on else None
    size = max(1, shard.rows)
    smallest, largest = max(1, size // 4), 4 * size
    start = 0
    for i in range(height - 1):
        length = i + 1 - start
        cut = splits is not None and splits[i + 1] != splits[i]
        if not cut and length >= largest:
            cut = True
        if not cut and length >= smallest:
            digest = hashlib.blake2b(keys[i].encode(), digest_size=8).digest()
            cut = int.from_bytes(digest, "big") % size == 0
        if cut:
            yield start, length
            start = i + 1
    yield start, height - start


def lookup_rows(table: pl.DataFrame, part: pl.DataFrame, column: str, key: str) -> pl.DataFrame:
    """The rows of `table` whose `key` a row of `part` refers to through `column`."""
    wanted = part.select(pl.col(column).alias(key)).unique()
    return table.join(wanted, on=key, how="semi")
