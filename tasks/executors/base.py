"""The one interface every executor implements, and the work they all share.

An executor takes a declared stage and its bound arguments (`tasks/stage.py`) and makes its
outputs exist: it answers from the store when every output already exists at the stage's version
(a cache hit), runs the shards that are not done (where and how is what tells executors apart),
merges them, and writes and registers the versions. What a unit of work is — load the inputs,
call the body, check the records, write the outputs — is the same everywhere and lives here, so
an executor only decides *where* units run (in this process, as Prefect task runs on the flow's
task runner, on a Ray cluster through that runner) and how it reports.

Every write is idempotent: a version is named by its content and written atomically, so a shard
that an executor runs twice (a retried task, a node that died after writing) writes once.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from storage.catalog import Catalog
from storage.datasets import DatasetRef, DatasetStore, Manifest, current_flow_run
from tasks.contracts import (
    SHARD_PREFIX,
    Artifact,
    ParquetFiles,
    ProgressReporter,
    Shard,
    ShardSpec,
    StageContext,
    StageError,
    StageOutput,
    StageResult,
    lookup_rows,
)

log = logging.getLogger("tasks.stage")

# The stats key of a shard manifest naming the process that computed it (never merged).
WORKER = "worker"


def engine_builds() -> int:
    """Engines this thread has built so far (`infra.engines.build_engine` keeps each for the
    process)."""
    from infra.engines import builds

    return builds()


class Declared(Protocol):
    """What an executor needs of a declared stage (`tasks.stage.Stage` is one)."""

    name: str
    task_name: str
    fn: Callable[..., Any]
    outputs: list[str]
    artifacts: dict[str, Artifact]
    shard: Shard | None
    inputs: dict[str, Any]
    wants_ctx: bool
    signature: Any

    def bind(self, kwargs: dict[str, Any]) -> dict[str, Any]: ...

    @property
    def code_version(self) -> str: ...

    def version_of(self, values: dict[str, Any]) -> str: ...

    def params_fingerprint(self, values: dict[str, Any]) -> dict[str, Any]: ...

    def parents(self, values: dict[str, Any]) -> list[str]: ...

    def shard_plan(self, values: dict[str, Any], home: Path) -> list[ShardSpec]: ...

    def check_outputs(self, frames: dict[str, pl.DataFrame]) -> None: ...


class Executor(ABC):
    """Runs declared stages. `run` is the whole interface; the rest is shared work."""

    # Rows per shard in place of each stage's declared size (`ExecutorSettings.shard_rows`).
    shard_rows: int | None = None

    def __init__(self, home: Path | None = None):
        self._home = home

    @property
    def home(self) -> Path:
        from storage.settings import home as default_home

        return self._home or default_home()

    @abstractmethod
    def run(self, stage: Declared, values: dict[str, Any]) -> StageResult:
        """Make the stage's outputs exist for these bound arguments; return their refs."""

    # -- how an executor reports; subclasses publish elsewhere ----------------------------------
    def log(self, message: str) -> None:
        log.info(message)

    def reporter(self, stage: Declared) -> ProgressReporter | None:
        return None

    # -- the shared work ------------------------------------------------------------------------
    def done(self, stage: Declared, values: dict[str, Any]) -> bool:
        store = DatasetStore(self.home)
        version = stage.version_of(values)
        return all(store.exists(o, version) for o in stage.outputs)

    def shard_done(self, stage: Declared, spec: ShardSpec) -> bool:
        store = DatasetStore(self.home)
        return all(store.exists(SHARD_PREFIX + o, spec.version) for o in stage.outputs)

    def execute(self, stage: Declared, values: dict[str, Any]) -> StageResult:
        """Answer from the store, or compute (merging shards) and write every output. The
        versions are written, not yet published (`publish`: current pointers, the catalog)."""
        home = self.home
        store = DatasetStore(home)
        version = stage.version_of(values)
        if all(store.exists(o, version) for o in stage.outputs):
            manifests = [store.manifest(DatasetRef(o, version)) for o in stage.outputs]
            self.log(
                f"{stage.name}: cache hit, " + ", ".join(f"{m.ref} ({_rows(m)})" for m in manifests)
            )
            return StageResult(
                stage.name, version, {m.name: m.ref for m in manifests}, True, manifests[0].stats
            )
        if stage.shard is not None:
            output = self.merge_shards(stage, values)
            frames, stats = output.frames, output.stats
            artifact_dirs: dict[str, Path] = {}
        else:
            ctx = StageContext(stage.name, version, home, reporter=self.reporter(stage))
            output = self.call_body(stage, ctx, values, store)
            frames, stats = output.frames, output.stats
            artifact_dirs = {name: ctx.output_dir(name) for name in stage.artifacts}
        missing = [o for o in stage.outputs if o not in frames and o not in artifact_dirs]
        if missing:
            raise StageError(f"stage {stage.name} did not produce output(s): {', '.join(missing)}")
        stage.check_outputs(frames)
        refs: dict[str, DatasetRef] = {}
        written: list[str] = []
        common = {
            "stage": stage.name,
            "code_version": stage.code_version,
            "params": stage.params_fingerprint(values),
            "parents": stage.parents(values),
            "stats": stats,
            "version": version,
        }
        for name in stage.outputs:
            if name in stage.artifacts:
                manifest = store.write_folder(
                    name, artifact_dirs[name], kind=stage.artifacts[name].kind, **common
                )
                shutil.rmtree(store.root / name / f".work-{version}", ignore_errors=True)
            else:
                manifest = store.write(name, frames[name], **common)
            refs[name] = manifest.ref
            written.append(f"{manifest.ref} ({_rows(manifest)})")
        self.log(f"{stage.name}: computed {', '.join(written)}{_work(stats)}")
        return StageResult(stage.name, version, refs, False, stats)

    def publish(self, result: StageResult) -> StageResult:
        """Make a stage's versions the current ones and register them in the catalog.

        Called by `run` where the flow is driven, never inside a task run: the catalog has one
        writer (the driver), so workers on other processes or nodes never open `catalog.duckdb`;
        the manifests on storage stay the source of truth (`evolforge catalog rebuild`). A cache
        hit is published too: this run's result is the current one again, and a lost catalog
        entry comes back (registering is idempotent)."""
        store = DatasetStore(self.home)
        catalog = Catalog(self.home)
        for ref in result.refs.values():
            store.set_current(ref)
            catalog.register(store.manifest(ref))
        return result

    def call_body(
        self,
        stage: Declared,
        ctx: StageContext,
        values: dict[str, Any],
        store: DatasetStore,
        override: dict[str, Any] | None = None,
    ) -> StageOutput:
        """Load the inputs, call the stage's function, and gather its stats."""
        arguments = {**values, **load_inputs(stage, values, store), **(override or {})}
        if stage.wants_ctx:
            arguments["ctx"] = ctx
        result = stage.fn(**arguments)
        if isinstance(result, dict):
            result = StageOutput(frames=result)
        if not isinstance(result, StageOutput):
            raise StageError(f"stage {stage.name} returned {type(result).__name__}, not frames")
        stats = {**ctx.stats, **result.stats}
        engine = ctx.engine_stats()
        if engine:
            stats["engine"] = engine
        return StageOutput(result.frames, stats)

    def run_shard(self, stage: Declared, values: dict[str, Any], spec: ShardSpec) -> dict[str, Any]:
        """Compute one shard (or find it done); its outputs are `_shard.<output>@<version>`."""
        home = self.home
        store = DatasetStore(home)
        if self.shard_done(stage, spec):
            return {"shard": spec.index, "cached": True}
        assert stage.shard is not None
        part = store.read(values[stage.shard.by]).slice(spec.offset, spec.rows)
        override: dict[str, Any] = {stage.shard.by: part}
        for name, (column, key) in stage.shard.lookups.items():
            if values.get(name) is not None:
                override[name] = lookup_rows(store.read(values[name]), part, column, key)
        ctx = StageContext(
            stage.name, spec.version, home, shard=f"{spec.index}", reporter=self.reporter(stage)
        )
        builds = engine_builds()
        output = self.call_body(stage, ctx, values, store, override)
        # Which process computed the shard, and how many engines it had to build for it (0
        # when the process kept its engine from an earlier shard): shard manifests only.
        worker = {"host": socket.gethostname(), "pid": os.getpid()}
        worker["engines_built"] = engine_builds() - builds
        missing = [o for o in stage.outputs if o not in output.frames]
        if missing:
            raise StageError(f"stage {stage.name} did not produce output(s): {', '.join(missing)}")
        stage.check_outputs(output.frames)
        for name in stage.outputs:
            store.write(
                SHARD_PREFIX + name,
                output.frames[name],
                stage=stage.name,
                code_version=stage.code_version,
                params={"shard": spec.index, "offset": spec.offset, "rows": spec.rows},
                parents=stage.parents(values),
                stats={**output.stats, WORKER: worker},
                version=spec.version,
            )
        self.log(
            f"{stage.name} shard {spec.index}: computed {spec.rows} input rows{_work(output.stats)}"
        )
        return {"shard": spec.index, "cached": False}

    def merge_shards(self, stage: Declared, values: dict[str, Any]) -> StageOutput:
        """Concatenate the shards' outputs in order, computing here any shard not yet done."""
        store = DatasetStore(self.home)
        specs = stage.shard_plan(values, self.home, self.shard_rows)
        run = current_flow_run()
        new = 0
        for spec in specs:
            computed = not self.run_shard(stage, values, spec)["cached"]
            first = store.manifest(DatasetRef(SHARD_PREFIX + stage.outputs[0], spec.version))
            new += computed or (run is not None and first.flow_run == run)
        frames: dict[str, pl.DataFrame] = {}
        stats: dict[str, Any] = {}
        for name in stage.outputs:
            parts = [store.read(DatasetRef(SHARD_PREFIX + name, s.version)) for s in specs]
            frames[name] = pl.concat(parts, how="diagonal_relaxed")
        for spec in specs:
            manifest = store.manifest(DatasetRef(SHARD_PREFIX + stage.outputs[0], spec.version))
            add_stats(stats, {k: v for k, v in manifest.stats.items() if k != WORKER})
        stats["shards"] = {"total": len(specs), "new": new, "reused": len(specs) - new}
        return StageOutput(frames, stats)


def load_inputs(stage: Declared, values: dict[str, Any], store: DatasetStore) -> dict[str, Any]:
    """The body's input arguments: frames, parquet file lists or artifact folders."""
    loaded: dict[str, Any] = {}
    for name, spec in stage.inputs.items():
        ref = values.get(name)
        if ref is None:
            loaded[name] = None
        elif spec.kind == "frame":
            loaded[name] = store.read(ref)
        elif spec.kind == "files":
            loaded[name] = ParquetFiles(store.files(ref))
        else:
            loaded[name] = store.version_dir(ref.name, ref.version)
    return loaded


def add_stats(total: dict[str, Any], stats: dict[str, Any]) -> None:
    """Sum numbers (recursively through dicts) across shards; keep the first of anything else."""
    for key, value in stats.items():
        if isinstance(value, bool) or not isinstance(value, int | float | dict):
            total.setdefault(key, value)
        elif isinstance(value, dict):
            add_stats(total.setdefault(key, {}), value)
        else:
            total[key] = round(total.get(key, 0) + value, 6)


def _rows(manifest: Manifest) -> str:
    return f"{manifest.rows} rows" if manifest.is_dataset else f"{len(manifest.files)} files"


def _work(stats: dict[str, Any]) -> str:
    """What a computed stage cost: shards new vs reused, engine requests and tokens."""
    parts = []
    shards = stats.get("shards")
    if shards:
        parts.append(f"shards {shards.get('new', 0)} new / {shards.get('reused', 0)} reused")
    engine = stats.get("engine")
    if engine and engine.get("requests"):
        parts.append(
            f"engine {int(engine['requests'])} requests: {int(engine.get('hits', 0))} cached, "
            f"{int(engine.get('misses', 0))} sent, {int(engine.get('completion_tokens', 0))} "
            f"tokens out, {engine.get('engine_seconds', 0):.1f} s"
        )
    return "; " + "; ".join(parts) if parts else ""
