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
  version being the hash of the stage's function and the project code, prompts and SQL it
  refers to (`storage.code_version`). When every output exists at that version the stage is a
  cache hit: nothing is read, computed or written;
- **shards**: with `shard=Shard("pool")` the named input is cut into runs of `rows` rows, each a
  separate Prefect task run whose output is cached by the shard's own content (and the rows of
  any `lookups` input its rows refer to), so rows appended to an input recompute only the new
  shards; their outputs are concatenated in order.

This module is the declaration, the binding and the version; it runs nothing itself. Calling a
stage hands it to an executor (`tasks/executors/`): Prefect task runs cached on the version
inside a flow run (the flow's task runner places the shards: threads, or a Ray cluster), in
process elsewhere (tests, `evolforge ingest`). Either way it returns a `StageResult`: output
refs, whether it was a cache hit, and its stats (row counts, engine requests, tokens and seconds
from the engines the stage opened through `ctx.engine`). The types a body and an executor
exchange are in `tasks/contracts.py`.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel

from storage.code_version import Coverage, code_version, coverage
from storage.datasets import DatasetRef, DatasetStore, Manifest, version_id
from storage.settings import home as default_home
from tasks.contracts import (
    DEFAULT_SHARD_ROWS,
    SHARD_PREFIX,
    Artifact,
    ArtifactDir,
    ParquetFiles,
    Resources,
    Shard,
    ShardSpec,
    StageContext,
    StageError,
    StageOutput,
    StageResult,
    frame_digest,
    lookup_rows,
    shard_bounds,
)
from tasks.executors import InProcessExecutor, current_executor
from tasks.records import Record

# What stage modules import from here: the decorator and the types a body uses.
__all__ = [
    "DEFAULT_SHARD_ROWS",
    "SHARD_PREFIX",
    "Artifact",
    "ArtifactDir",
    "ParquetFiles",
    "Resources",
    "Shard",
    "ShardSpec",
    "Stage",
    "StageContext",
    "StageError",
    "StageOutput",
    "StageResult",
    "fingerprint",
    "manifest",
    "read",
    "shard_bounds",
    "stage",
]

_code_versions: dict[str, str] = {}
_code_versions_lock = threading.Lock()


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
        resources: Resources | None = None,
    ):
        self.fn = fn
        self.resources = resources or Resources()
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
        self.__doc__ = fn.__doc__
        self.__name__ = name

    # -- planning ---------------------------------------------------------------------------
    @property
    def code_version(self) -> str:
        """The code version of the code this process runs: computed once per process, since
        an edit to a file during a run changes the file, not the modules already imported (and
        must not give the second half of a run other versions than the first)."""
        target = f"{self.module}:{self.fn.__qualname__}"
        with _code_versions_lock:
            if target not in _code_versions:
                _code_versions[target] = code_version(target)
            return _code_versions[target]

    def code_coverage(self) -> Coverage:
        """What the code version covers (symbols, files, resources), as the files are now."""
        return coverage(f"{self.module}:{self.fn.__qualname__}")

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
        return self.version_of(values)

    def version_of(self, values: dict[str, Any]) -> str:
        """The version id of bound arguments (see `bind`)."""
        return version_id(
            self.name, self.code_version, self.params_fingerprint(values), self.parents(values)
        )

    def check_outputs(self, frames: Mapping[str, pl.DataFrame]) -> None:
        """Before anything is written: each dataset output is a polars frame whose columns
        and dtypes are its record's (`RecordError`, one line naming stage, output, column)."""
        for output, record in self.records.items():
            frame = frames[output]
            if not isinstance(frame, pl.DataFrame):
                raise StageError(
                    f"stage {self.name}: output {output!r} is {type(frame).__name__}, "
                    "not a polars DataFrame"
                )
            record.check(frame, stage=self.name, output=output)

    def resources_for(self, values: dict[str, Any], cluster_gpus: bool = True) -> dict[str, Any]:
        """Ray `remote_options` for this stage's task runs: the declared `resources`, and one
        GPU per tensor-parallel rank for an engine of kind vllm among the parameters (a vLLM
        stage on a cluster with GPUs is placed on a GPU node; on a cluster without any, asking
        for one would leave the task pending forever, and vLLM runs its CPU build).
        Empty: Ray's defaults (one CPU)."""
        options: dict[str, Any] = dict(self.resources.options())
        engines = _vllm_engines(values) if cluster_gpus else []
        gpus = max((e.tensor_parallel_size for e in engines), default=0)
        if gpus:
            options["num_gpus"] = max(gpus, options.get("num_gpus") or 0)
        return options

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickled by name (its module and attribute), so a task shipped to another process
        (a Ray worker) finds the declaration that process imported, not a copy of its code."""
        module = sys.modules.get(self.module)
        if module is not None and getattr(module, self.task_name, None) is self:
            return (_declared, (self.module, self.task_name))
        return super().__reduce_ex__(protocol)

    # -- running: handed to an executor ------------------------------------------------------
    def __call__(self, **kwargs: Any) -> StageResult:
        """Run on the executor in force: Prefect task runs inside a flow run, else in process
        (`tasks.executors.use_executor` chooses another)."""
        return current_executor().run(self, self.bind(kwargs))

    def run(self, home: Path | None = None, **kwargs: Any) -> StageResult:
        """Run in this process (no Prefect): a cache hit when every output exists."""
        return InProcessExecutor(home).run(self, self.bind(kwargs))

    # -- shards -----------------------------------------------------------------------------
    def shard_plan(
        self, values: dict[str, Any], home: Path, rows: int | None = None
    ) -> list[ShardSpec]:
        """The shards of the input, each with its version (a hash of its own content). `rows`
        (the executor's `shard_rows`) replaces the declared shard size: more, smaller shards to
        spread over a cluster. It changes the shards' versions, never the stage's."""
        assert self.shard is not None
        shard = self.shard if rows is None else replace(self.shard, rows=rows)
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
        for index, (offset, length) in enumerate(shard_bounds(frame, shard)):
            part = frame.slice(offset, length)
            digests = [frame_digest(part)]
            for name, (column, key) in sorted(self.shard.lookups.items()):
                table = lookups[name]
                if table is not None:
                    digests.append(frame_digest(lookup_rows(table, part, column, key)))
            version = version_id(f"{self.name}[shard]", base["code"], base, digests)
            specs.append(ShardSpec(index, offset, length, version))
        return specs


def stage(
    *,
    outputs: Mapping[str, type[Record] | Artifact],
    shard: Shard | None = None,
    name: str | None = None,
    resources: Resources | None = None,
) -> Callable[[Callable[..., Any]], Stage]:
    """Declare a stage (see the module docstring). The function's name (a verb phrase) names
    its Prefect task; `name` (default: the same) names the stage in manifests and versions;
    `resources` is what each of its task runs needs on a cluster (`Resources`)."""

    def decorate(fn: Callable[..., Any]) -> Stage:
        return Stage(fn, name or fn.__name__, outputs, shard, resources)

    return decorate


def _declared(module: str, attribute: str) -> Stage:
    """A declared stage by its module and attribute (how a pickled `Stage` comes back)."""
    found = getattr(importlib.import_module(module), attribute)
    if not isinstance(found, Stage):
        raise StageError(f"{module}.{attribute} is not a declared stage")
    return found


def _vllm_engines(value: Any) -> list[Any]:
    """The engine configurations of kind vllm anywhere in a stage's parameters."""
    from infra.engines import engines_in

    return [e for e in engines_in(value) if e.kind == "vllm"]


def read(ref: DatasetRef | str | None, home: Path | None = None) -> pl.DataFrame | None:
    """A dataset version as a frame (None for None): for reports and summaries."""
    if ref is None:
        return None
    return DatasetStore(home or default_home()).read(ref)


def manifest(ref: DatasetRef | str, home: Path | None = None) -> Manifest:
    return DatasetStore(home or default_home()).manifest(ref)
