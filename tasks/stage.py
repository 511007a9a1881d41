"""A stage is declared once, by its signature; this module turns the declaration into the rest.

    @stage(outputs={"evolutions": Evolution}, shard=Shard("pool"))
    def evolve(ctx: StageContext, pool: pl.DataFrame, round: int, engine: EngineConfig,
               params: EvolutionParams) -> StageOutput:
        ...

From the function's typed parameters come:

- **inputs**: a parameter annotated `pl.DataFrame` is a dataset (the caller passes `name@version`,
  a `DatasetRef`, or None where the annotation allows it; the body receives the frame);
  `ParquetFiles` gives the version's parquet files instead (for DuckDB set logic), and
  `ArtifactDir` an artifact version's folder (a model checkpoint);
- **parameters**: every other parameter except `ctx`. Pydantic models go into the version by
  `fingerprint()` where they define one (engine settings that do not change outputs, file
  hashes), else by their JSON dump;
- **outputs**: `outputs` maps each output's name to its record (`tasks.records`: the columns
  and dtypes every frame written under that name is checked against) or to `Artifact(...)` for
  a folder;
- **the version id**: a hash of (stage name, code version, parameters, input versions), the code
  version being the hash of the stage's module and everything it imports
  (`storage.code_version`). When every output exists at that version the stage is a cache hit:
  nothing is read, computed or written;
- **the Prefect task** (inside a flow run), cached on that version id, never on the run id;
- **shards**: with `shard=Shard("pool")` the named input is cut into runs of `rows` rows, each a
  separate Prefect task run whose output is cached by the shard's own content (and the rows of
  any `lookups` input its rows refer to), so rows appended to an input recompute only the new
  shards. Shards are submitted to the flow's task runner (a Ray task runner places them on a
  cluster without touching stage code); their outputs are concatenated in order.

Calling a stage inside a flow runs it as Prefect task(s); outside a flow (tests, `evolforge
ingest`) it runs in process. Either way it returns a `StageResult`: output refs, whether it was
a cache hit, and its stats (row counts, engine requests, tokens and seconds from the engines the
stage opened through `ctx.engine`).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import shutil
import threading
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel

from storage.catalog import Catalog
from storage.code_version import code_version
from storage.datasets import DatasetRef, DatasetStore, Manifest, current_flow_run, version_id
from storage.settings import home as default_home
from tasks.records import Record

log = logging.getLogger(__name__)

SHARD_PREFIX = "_shard."
_code_versions: dict[str, str] = {}
_code_versions_lock = threading.Lock()
DEFAULT_SHARD_ROWS = 512


class ParquetFiles(list):
    """Annotation: the input's parquet files (list[Path]) instead of a loaded frame."""


class ArtifactDir(type(Path())):  # type: ignore[misc]
    """Annotation: the folder of an artifact version (a model checkpoint) as a Path."""


@dataclass(frozen=True)
class Artifact:
    """An output that is a folder (a checkpoint, a tokenizer, plots), stored as a version."""

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


# -- the context a stage body receives --------------------------------------------------------


class StageContext:
    """Per-run services for a stage body: engines, artifact folders, extra stats, progress."""

    def __init__(self, stage: Stage, version: str, home: Path, shard: str | None = None):
        self.stage = stage
        self.name = stage.name
        self.version = version
        self.home = home
        self.shard = shard
        self.stats: dict[str, Any] = {}
        self._engines: list[Any] = []
        self._progress_id = None

    def engine(self, config: Any) -> Any:
        """The configured engine behind the request cache; its counters go into this stage's
        stats (`engine`: requests, hits, misses, tokens, seconds)."""
        from infra.engines import open_engine

        engine = open_engine(config, self.name)
        self._engines.append(engine)
        return engine

    def engine_stats(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for engine in self._engines:
            for key, value in engine.stats.items():
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
        """A Prefect progress artifact for long stages (a no-op outside a flow run)."""
        _report_progress(self, done, total, description)


def _report_progress(ctx: StageContext, done: float, total: float, description: str | None):
    try:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is None:
            return
        percent = 100.0 * done / total if total else 100.0
        text = description or f"{ctx.name}: {done:g} of {total:g}"
        if ctx._progress_id is None:
            ctx._progress_id = create_progress_artifact(
                percent, key=_artifact_key(f"{ctx.name}-progress"), description=text
            )
        else:
            update_progress_artifact(ctx._progress_id, percent, description=text)
    except Exception as exc:  # progress is cosmetic; a failure to report must not fail the stage
        log.debug("progress artifact not updated: %s", exc)


def _artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


# -- fingerprints -------------------------------------------------------------------------------


def fingerprint(value: Any) -> Any:
    """The JSON value a parameter contributes to the version id."""
    if isinstance(value, BaseModel):
        method = getattr(value, "fingerprint", None)
        return method() if callable(method) else value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [fingerprint(v) for v in value]
    if isinstance(value, dict):
        return {str(k): fingerprint(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _frame_digest(frame: pl.DataFrame) -> str:
    digest = hashlib.sha256(",".join(f"{k}:{v}" for k, v in frame.schema.items()).encode())
    for batch in frame.iter_slices(4096):
        digest.update(batch.write_ndjson().encode())
    return digest.hexdigest()


# -- the declaration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Input:
    name: str
    kind: str  # frame | files | artifact
    optional: bool


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _input_kind(annotation: Any) -> str | None:
    if annotation is pl.DataFrame:
        return "frame"
    if annotation is ParquetFiles:
        return "files"
    if annotation is ArtifactDir:
        return "artifact"
    return None


def _split_outputs(
    name: str, outputs: Mapping[str, type[Record] | Artifact]
) -> tuple[dict[str, type[Record]], dict[str, Artifact]]:
    """The declared outputs as (dataset outputs -> record, folder outputs -> artifact)."""
    if not isinstance(outputs, Mapping):
        raise StageError(f"stage {name}: outputs must map each name to a Record or an Artifact")
    records, artifacts = {}, {}
    for output, kind in outputs.items():
        if isinstance(kind, Artifact):
            artifacts[output] = kind
        elif isinstance(kind, type) and issubclass(kind, Record):
            records[output] = kind
        else:
            raise StageError(
                f"stage {name}: output {output!r} is {kind!r}, not a Record or Artifact"
            )
    return records, artifacts


class Stage:
    """A declared stage; see the module docstring. Built by the `stage` decorator."""

    def __init__(
        self,
        fn: Callable[..., StageOutput | dict[str, pl.DataFrame]],
        name: str,
        outputs: Mapping[str, type[Record] | Artifact],
        shard: Shard | None,
    ):
        self.fn = fn
        self.name = name
        self.module = fn.__module__
        self.outputs: list[str] = list(outputs)  # in declaration order
        self.records, self.artifacts = _split_outputs(name, outputs)
        self.shard = shard
        self.task_name = fn.__name__
        hints = typing.get_type_hints(fn)
        signature = inspect.signature(fn)
        self.inputs: dict[str, _Input] = {}
        self.param_names: list[str] = []
        self.wants_ctx = False
        for pname in signature.parameters:
            if pname == "ctx":
                self.wants_ctx = True
                continue
            annotation, optional = _unwrap_optional(hints.get(pname))
            kind = _input_kind(annotation)
            if kind is not None:
                self.inputs[pname] = _Input(pname, kind, optional)
            else:
                self.param_names.append(pname)
        self.signature = signature.replace(
            parameters=[p for n, p in signature.parameters.items() if n != "ctx"]
        )
        if shard is not None:
            if shard.by not in self.inputs or self.inputs[shard.by].kind != "frame":
                raise StageError(f"stage {name}: shard input {shard.by!r} is not a frame input")
            for lookup in shard.lookups:
                if lookup not in self.inputs or self.inputs[lookup].kind != "frame":
                    raise StageError(f"stage {name}: lookup {lookup!r} is not a frame input")
            if self.artifacts:
                raise StageError(f"stage {name}: a sharded stage cannot write artifacts")
        self._tasks: dict[str, Any] = {}
        self.__doc__ = fn.__doc__
        self.__name__ = name

    def check_outputs(self, frames: Mapping[str, pl.DataFrame]) -> None:
        """Each dataset output's frame against its record (`RecordError`, one line)."""
        for output, record in self.records.items():
            record.check(frames[output], stage=self.name, output=output)

    # -- planning ---------------------------------------------------------------------------
    @property
    def code_version(self) -> str:
        """The code version of the code this process runs: computed once per process, since
        an edit to a file during a run changes the file, not the modules already imported (and
        must not give the second half of a run other versions than the first)."""
        with _code_versions_lock:
            if self.module not in _code_versions:
                _code_versions[self.module] = code_version(self.module)
            return _code_versions[self.module]

    def bind(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            bound = self.signature.bind(**kwargs)
        except TypeError as exc:
            raise StageError(f"stage {self.name}: {exc}") from exc
        bound.apply_defaults()
        values = dict(bound.arguments)
        for name, spec in self.inputs.items():
            value = values.get(name)
            if value is None:
                if not spec.optional:
                    raise StageError(f"stage {self.name}: input {name!r} is required")
                continue
            values[name] = value if isinstance(value, DatasetRef) else DatasetRef.parse(str(value))
        return values

    def parents(self, values: dict[str, Any]) -> list[str]:
        return [str(values[n]) for n in self.inputs if values.get(n) is not None]

    def params_fingerprint(self, values: dict[str, Any]) -> dict[str, Any]:
        return {n: fingerprint(values[n]) for n in self.param_names}

    def version(self, **kwargs: Any) -> str:
        values = self.bind(kwargs)
        return self._version(values)

    def _version(self, values: dict[str, Any]) -> str:
        return version_id(
            self.name, self.code_version, self.params_fingerprint(values), self.parents(values)
        )

    def done(self, values: dict[str, Any], home: Path | None = None) -> bool:
        store = DatasetStore(home or default_home())
        version = self._version(values)
        return all(store.exists(o, version) for o in self.outputs)

    # -- running ----------------------------------------------------------------------------
    def __call__(self, **kwargs: Any) -> StageResult:
        """Inside a flow run: Prefect task(s), cached on the version. Elsewhere: in process."""
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:
            return self.run(**kwargs)
        values = self.bind(kwargs)
        done = self.done(values)
        if self.shard is not None and not done:
            self._run_shard_tasks(values)
        result = self._task("stage")(**values)
        # Prefect may answer from its result cache, whose record says how the version was made
        # the first time: the outputs existing before this call is what makes it a cache hit.
        return replace(result, cached=True) if done else result

    def run(self, home: Path | None = None, **kwargs: Any) -> StageResult:
        """Run in this process (no Prefect): a cache hit when every output exists."""
        return self._execute(self.bind(kwargs), home or default_home())

    def _execute(self, values: dict[str, Any], home: Path) -> StageResult:
        store = DatasetStore(home)
        catalog = Catalog(home)
        version = self._version(values)
        if all(store.exists(o, version) for o in self.outputs):
            manifests = [store.manifest(DatasetRef(o, version)) for o in self.outputs]
            for manifest in manifests:
                store.set_current(manifest.ref)  # this run's result is the current one again
                catalog.register(manifest)  # idempotent; restores a lost catalog entry
            _log(
                f"{self.name}: cache hit, " + ", ".join(f"{m.ref} ({_rows(m)})" for m in manifests)
            )
            return StageResult(
                self.name, version, {m.name: m.ref for m in manifests}, True, manifests[0].stats
            )
        if self.shard is not None:
            output = self._merge_shards(values, home)
            frames, stats = output.frames, output.stats
            artifact_dirs: dict[str, Path] = {}
        else:
            ctx = StageContext(self, version, home)
            output = self._call_body(ctx, values, store)
            frames, stats = output.frames, output.stats
            artifact_dirs = {name: ctx.output_dir(name) for name in self.artifacts}
        missing = [o for o in self.outputs if o not in frames and o not in artifact_dirs]
        if missing:
            raise StageError(f"stage {self.name} did not produce output(s): {', '.join(missing)}")
        self.check_outputs(frames)
        refs: dict[str, DatasetRef] = {}
        written: list[str] = []
        common = {
            "stage": self.name,
            "code_version": self.code_version,
            "params": self.params_fingerprint(values),
            "parents": self.parents(values),
            "stats": stats,
            "version": version,
        }
        for name in self.outputs:
            if name in self.artifacts:
                manifest = store.write_folder(
                    name, artifact_dirs[name], kind=self.artifacts[name].kind, **common
                )
                shutil.rmtree(store.root / name / f".work-{version}", ignore_errors=True)
            else:
                manifest = store.write(name, frames[name], **common)
            store.set_current(manifest.ref)
            catalog.register(manifest)
            refs[name] = manifest.ref
            written.append(f"{manifest.ref} ({_rows(manifest)})")
        _log(f"{self.name}: computed {', '.join(written)}{_work(stats)}")
        return StageResult(self.name, version, refs, False, stats)

    def _load(self, values: dict[str, Any], store: DatasetStore) -> dict[str, Any]:
        loaded = {}
        for name, spec in self.inputs.items():
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

    def _call_body(
        self,
        ctx: StageContext,
        values: dict[str, Any],
        store: DatasetStore,
        override: dict[str, Any] | None = None,
    ) -> StageOutput:
        arguments = {**values, **self._load(values, store), **(override or {})}
        if self.wants_ctx:
            arguments["ctx"] = ctx
        result = self.fn(**arguments)
        if isinstance(result, dict):
            result = StageOutput(frames=result)
        if not isinstance(result, StageOutput):
            raise StageError(f"stage {self.name} returned {type(result).__name__}, not frames")
        stats = {**ctx.stats, **result.stats}
        engine = ctx.engine_stats()
        if engine:
            stats["engine"] = engine
        return StageOutput(result.frames, stats)

    # -- shards -----------------------------------------------------------------------------
    def shard_plan(self, values: dict[str, Any], home: Path) -> list[ShardSpec]:
        """The shards of the input, each with its version (a hash of its own content)."""
        assert self.shard is not None
        store = DatasetStore(home)
        frame = store.read(values[self.shard.by])
        lookups = {
            name: store.read(values[name]) if values.get(name) is not None else None
            for name in self.shard.lookups
        }
        fixed = [
            str(values[n])
            for n in self.inputs
            if values.get(n) is not None and n != self.shard.by and n not in self.shard.lookups
        ]
        base = {
            "stage": self.name,
            "code": self.code_version,
            "params": self.params_fingerprint(values),
            "inputs": fixed,
        }
        specs = []
        for index, (offset, rows) in enumerate(shard_bounds(frame, self.shard)):
            part = frame.slice(offset, rows)
            digests = [_frame_digest(part)]
            for name, (column, key) in sorted(self.shard.lookups.items()):
                table = lookups[name]
                if table is not None:
                    digests.append(_frame_digest(_lookup(table, part, column, key)))
            version = version_id(f"{self.name}[shard]", base["code"], base, digests)
            specs.append(ShardSpec(index, offset, rows, version))
        return specs

    def run_shard(self, values: dict[str, Any], spec: ShardSpec, home: Path) -> dict[str, Any]:
        """Compute one shard (or find it done); its outputs are `_shard.<output>@<version>`."""
        store = DatasetStore(home)
        names = [SHARD_PREFIX + o for o in self.outputs]
        if all(store.exists(n, spec.version) for n in names):
            return {"shard": spec.index, "cached": True}
        assert self.shard is not None
        part = store.read(values[self.shard.by]).slice(spec.offset, spec.rows)
        override: dict[str, Any] = {self.shard.by: part}
        for name, (column, key) in self.shard.lookups.items():
            if values.get(name) is not None:
                override[name] = _lookup(store.read(values[name]), part, column, key)
        ctx = StageContext(self, spec.version, home, shard=f"{spec.index}")
        output = self._call_body(ctx, values, store, override)
        missing = [o for o in self.outputs if o not in output.frames]
        if missing:
            raise StageError(f"stage {self.name} did not produce output(s): {', '.join(missing)}")
        self.check_outputs(output.frames)
        for name in self.outputs:
            store.write(
                SHARD_PREFIX + name,
                output.frames[name],
                stage=self.name,
                code_version=self.code_version,
                params={"shard": spec.index, "offset": spec.offset, "rows": spec.rows},
                parents=self.parents(values),
                stats=output.stats,
                version=spec.version,
            )
        _log(
            f"{self.name} shard {spec.index}: computed {spec.rows} input rows{_work(output.stats)}"
        )
        return {"shard": spec.index, "cached": False}

    def _merge_shards(self, values: dict[str, Any], home: Path) -> StageOutput:
        store = DatasetStore(home)
        specs = self.shard_plan(values, home)
        run = current_flow_run()
        new = 0
        for spec in specs:  # shards not yet done by Prefect task runs (or outside a flow)
            computed = not self.run_shard(values, spec, home)["cached"]
            first = store.manifest(DatasetRef(SHARD_PREFIX + self.outputs[0], spec.version))
            new += computed or (run is not None and first.flow_run == run)
        frames: dict[str, pl.DataFrame] = {}
        stats: dict[str, Any] = {}
        for name in self.outputs:
            parts = [store.read(DatasetRef(SHARD_PREFIX + name, s.version)) for s in specs]
            frames[name] = pl.concat(parts, how="diagonal_relaxed")
        for spec in specs:
            manifest = store.manifest(DatasetRef(SHARD_PREFIX + self.outputs[0], spec.version))
            _add_stats(stats, manifest.stats)
        stats["shards"] = {"total": len(specs), "new": new, "reused": len(specs) - new}
        return StageOutput(frames, stats)

    def _run_shard_tasks(self, values: dict[str, Any]) -> None:
        """Submit the shards that are not done to the flow's task runner, as task runs."""
        home = default_home()
        specs = self.shard_plan(values, home)
        task = self._task("shard")
        futures = [task.submit(values=values, spec=spec) for spec in specs]
        for done, future in enumerate(futures, start=1):
            future.result()
            if len(specs) > 1:
                _flow_progress(self.name, done, len(specs))

    # -- Prefect tasks ------------------------------------------------------------------------
    def _task(self, which: str):
        if which in self._tasks:
            return self._tasks[which]
        from prefect import task

        if which == "stage":

            def run_stage(*args: Any, **kwargs: Any) -> StageResult:
                bound = self.signature.bind(*args, **kwargs)
                return self._execute(self.bind(dict(bound.arguments)), default_home())

            run_stage.__signature__ = self.signature  # type: ignore[attr-defined]

            def stage_key(context: Any, parameters: dict[str, Any]) -> str | None:
                values = self.bind(parameters)
                return f"{self.name}-{self._version(values)}" if self.done(values) else None

            made = task(
                name=self.task_name,
                description=(self.fn.__doc__ or "").strip().splitlines()[0]
                if self.fn.__doc__
                else None,
                cache_key_fn=stage_key,
                persist_result=True,
            )(run_stage)
        else:

            def run_shard(values: dict[str, Any], spec: ShardSpec) -> dict[str, Any]:
                return self.run_shard(values, spec, default_home())

            def shard_key(context: Any, parameters: dict[str, Any]) -> str | None:
                spec: ShardSpec = parameters["spec"]
                store = DatasetStore(default_home())
                names = [SHARD_PREFIX + o for o in self.outputs]
                done = all(store.exists(n, spec.version) for n in names)
                return f"{self.name}-shard-{spec.version}" if done else None

            made = task(
                name=f"{self.task_name}-shard",
                task_run_name=f"{self.task_name}-shard-{{spec.index}}",
                cache_key_fn=shard_key,
                persist_result=True,
            )(run_shard)
        self._tasks[which] = made
        return made


@dataclass(frozen=True)
class ShardSpec:
    index: int
    offset: int
    rows: int
    version: str


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


def _lookup(table: pl.DataFrame, part: pl.DataFrame, column: str, key: str) -> pl.DataFrame:
    wanted = part.select(pl.col(column).alias(key)).unique()
    return table.join(wanted, on=key, how="semi")


def _add_stats(total: dict[str, Any], stats: dict[str, Any]) -> None:
    """Sum numbers (recursively through dicts) across shards; keep the first of anything else."""
    for key, value in stats.items():
        if isinstance(value, bool) or not isinstance(value, int | float | dict):
            total.setdefault(key, value)
        elif isinstance(value, dict):
            _add_stats(total.setdefault(key, {}), value)
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


def _log(message: str) -> None:
    """To the task run's log (the Prefect UI shows it) or, outside a run, this module's."""
    from prefect.context import TaskRunContext
    from prefect.logging import get_run_logger

    if TaskRunContext.get() is not None:
        get_run_logger().info(message)
    else:
        log.info(message)


_shard_progress: dict[tuple[str, str], Any] = {}


def _flow_progress(name: str, done: int, total: int) -> None:
    """A Prefect progress artifact per sharded stage and flow run: shards done of total."""
    try:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        run = current_flow_run() or ""
        percent = 100.0 * done / total
        text = f"{name}: {done} of {total} shards"
        artifact = _shard_progress.get((run, name))
        if artifact is None:
            _shard_progress[(run, name)] = create_progress_artifact(
                percent, key=_artifact_key(f"{name}-shards"), description=text
            )
        else:
            update_progress_artifact(artifact, percent, description=text)
    except Exception as exc:  # progress is cosmetic; a failure to report must not fail a stage
        log.debug("progress artifact not updated: %s", exc)


def stage(
    *,
    outputs: Mapping[str, type[Record] | Artifact],
    shard: Shard | None = None,
    name: str | None = None,
) -> Callable[[Callable[..., Any]], Stage]:
    """Declare a stage (see the module docstring). The function's name (a verb phrase) names
    its Prefect task; `name` (default: the same) names the stage in manifests and versions."""

    def decorate(fn: Callable[..., Any]) -> Stage:
        return Stage(fn, name or fn.__name__, outputs, shard)

    return decorate


def read(ref: DatasetRef | str | None, home: Path | None = None) -> pl.DataFrame | None:
    """A dataset version as a frame (None for None): for reports and summaries."""
    if ref is None:
        return None
    return DatasetStore(home or default_home()).read(ref)


def manifest(ref: DatasetRef | str, home: Path | None = None) -> Manifest:
    return DatasetStore(home or default_home()).manifest(ref)
