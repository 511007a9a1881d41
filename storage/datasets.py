"""Immutable, content-addressed parquet dataset versions.

Layout under `EVOLFORGE_HOME/datasets/`::

    <name>/<version>/part-00000.parquet ...
    <name>/<version>/_manifest.json          (written last)

A version id is a content hash of (stage, stage code version, parameters, parent versions), so
the same inputs give the same version and an existing version is never recomputed or rewritten.

Crash safety: a version is assembled in a staging folder `<name>/.staging-<version>-<pid>-<rand>`;
each shard is written to a temporary file, fsynced and renamed; the manifest is written the same
way, last; then the whole folder is renamed to `<name>/<version>`. A version folder without a
manifest, or a staging folder whose writer process is gone, is never read and is removed by the
next write of that dataset.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import polars as pl
import pyarrow.parquet as pq
from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

from storage.errors import UserError
from storage.faults import crash_point

MANIFEST = "_manifest.json"
CURRENT = "CURRENT"
ROWS_PER_SHARD = 250_000


class DatasetError(UserError):
    """A dataset or version that does not exist, or a malformed reference."""


def _parse_ref(value: Any) -> Any:
    if isinstance(value, str):
        return DatasetRef.parse(value)
    if isinstance(value, dict) and set(value) == {"name", "version"}:
        return DatasetRef(value["name"], value["version"])
    return value


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def version_id(
    stage: str, code_version: str, params: dict[str, Any], parents: Iterable[str]
) -> str:
    """Content hash of what determines a version's rows: stage, its code, parameters, parents."""
    payload = _canonical(
        {"stage": stage, "code": code_version, "params": params, "parents": sorted(parents)}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DatasetRef:
    """`name@version`: the small value that flows pass between tasks."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def parse(cls, text: str) -> DatasetRef:
        name, sep, version = text.partition("@")
        if not sep or not name or not version:
            raise DatasetError(f"not a dataset reference (want NAME@VERSION): {text!r}")
        return cls(name, version)


# A `DatasetRef` as a pydantic field: validated from and serialised to `name@version`, so typed
# flow state renders as plain text in the Prefect UI and in JSON.
Ref = Annotated[
    DatasetRef,
    BeforeValidator(_parse_ref),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "pattern": "^[^@]+@[0-9a-f]+$", "title": "name@version"}),
]


@dataclass
class Manifest:
    name: str
    version: str
    stage: str
    code_version: str
    params: dict[str, Any]
    parents: list[str]
    rows: int
    schema: list[dict[str, str]]
    files: list[dict[str, Any]]
    created_at: str
    flow_run: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    # "dataset" (parquet shards) or the kind of an artifact folder ("model", "plot", ...)
    kind: str = "dataset"

    @property
    def is_dataset(self) -> bool:
        return self.kind == "dataset"

    @property
    def ref(self) -> DatasetRef:
        return DatasetRef(self.name, self.version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str, ensure_ascii=False)

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes. Memoised on (path, size, mtime): stage plans hash their
    input files both for the Prefect cache key and in the task body."""
    stat = os.stat(path)
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def current_flow_run() -> str | None:
    try:
        from prefect.runtime import flow_run

        run_id = flow_run.get_id()
        return str(run_id) if run_id else None
    except Exception:
        return None


class DatasetStore:
    """Reads and writes dataset versions under `<home>/datasets`."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.root = self.home / "datasets"
        self.root.mkdir(parents=True, exist_ok=True)

    # -- reading ----------------------------------------------------------------------------
    def version_dir(self, name: str, version: str) -> Path:
        return self.root / name / version

    def exists(self, name: str, version: str) -> bool:
        return (self.version_dir(name, version) / MANIFEST).is_file()

    def manifest(self, ref: DatasetRef | str) -> Manifest:
        ref = DatasetRef.parse(ref) if isinstance(ref, str) else ref
        path = self.version_dir(ref.name, ref.version) / MANIFEST
        if not path.is_file():
            raise DatasetError(f"no such dataset version: {ref}")
        return Manifest.from_file(path)

    def names(self, internal: bool = False) -> list[str]:
        """Dataset and artifact names; `_shard.*` (a sharded stage's per-shard outputs) only
        with `internal`."""
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir()
            and not p.name.startswith(".")
            and (internal or not p.name.startswith("_"))
        )

    def versions(self, name: str) -> list[Manifest]:
        """Complete versions of a dataset, oldest first."""
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = [
            Manifest.from_file(p / MANIFEST)
            for p in folder.iterdir()
            if not p.name.startswith(".") and (p / MANIFEST).is_file()
        ]
        return sorted(found, key=lambda m: (m.created_at, m.version))

    def latest(self, name: str) -> Manifest:
        """The current version: the one the last run produced or found cached (`CURRENT`), else
        the newest by creation time."""
        current = self.root / name / CURRENT
        if current.is_file():
            version = current.read_text(encoding="utf-8").strip()
            if self.exists(name, version):
                return self.manifest(DatasetRef(name, version))
        versions = self.versions(name)
        if not versions:
            raise DatasetError(
                f"no dataset named {name!r} (known: {', '.join(self.names()) or 'none'})"
            )
        return versions[-1]

    def set_current(self, ref: DatasetRef) -> None:
        """Make `ref` the version `latest()` and the catalog view return (atomically). A run that
        finds a version cached makes it current again, just as one that writes it."""
        if not self.exists(ref.name, ref.version):
            raise DatasetError(f"no such dataset version: {ref}")
        folder = self.root / ref.name
        tmp = folder / f".{CURRENT}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(ref.version + "\n", encoding="utf-8")
        os.replace(tmp, folder / CURRENT)

    def resolve(self, spec: str) -> Manifest:
        """`NAME` (newest version) or `NAME@VERSION` (a version id or a unique prefix of one)."""
        name, sep, version = spec.partition("@")
        if not sep:
            return self.latest(name)
        matches = [m for m in self.versions(name) if m.version.startswith(version)]
        if len(matches) != 1:
            what = "no" if not matches else "more than one"
            raise DatasetError(f"{what} version of {name!r} matches {version!r}")
        return matches[0]

    def files(self, ref: DatasetRef | str) -> list[Path]:
        manifest = self.manifest(ref)
        folder = self.version_dir(manifest.name, manifest.version)
        return [folder / f["path"] for f in manifest.files]

    def read(self, ref: DatasetRef | str, columns: list[str] | None = None) -> pl.DataFrame:
        manifest = self.manifest(ref)
        if not manifest.is_dataset:
            raise DatasetError(
                f"{manifest.ref} is a {manifest.kind} artifact (a folder), not a dataset: "
                f"{self.version_dir(manifest.name, manifest.version)}"
            )
        paths = self.files(manifest.ref)
        if not paths:
            return pl.DataFrame(schema=_polars_schema(manifest.schema))
        frame = pl.read_parquet(paths, columns=columns)
        return frame

    # -- writing ----------------------------------------------------------------------------
    def write(
        self,
        name: str,
        data: pl.DataFrame | Iterable[pl.DataFrame],
        *,
        stage: str,
        code_version: str,
        params: dict[str, Any],
        parents: Iterable[DatasetRef | str] = (),
        stats: dict[str, Any] | None = None,
        schema: dict[str, pl.DataType] | None = None,
        version: str | None = None,
    ) -> Manifest:
        """Write a version; a version that already exists is returned as it is (a no-op)."""

        def fill(staging: Path) -> tuple[list[dict[str, Any]], int, list[dict[str, str]]]:
            frames = [data] if isinstance(data, pl.DataFrame) else data
            return self._write_shards(staging, frames, schema)

        return self._commit(
            name, fill, "dataset", stage, code_version, params, parents, stats, version
        )

    def write_folder(
        self,
        name: str,
        source: Path,
        *,
        kind: str,
        stage: str,
        code_version: str,
        params: dict[str, Any],
        parents: Iterable[DatasetRef | str] = (),
        stats: dict[str, Any] | None = None,
        version: str | None = None,
    ) -> Manifest:
        """Store a folder (a model checkpoint, plots) as an immutable artifact version. The
        folder is moved into the staging area (it must be on the same file system), every file
        is fsynced and checksummed, then the manifest is written and the version renamed into
        place, exactly as for a dataset."""
        if kind == "dataset":
            raise ValueError("write_folder stores artifacts; use write() for datasets")
        source = Path(source)
        if not source.is_dir():
            raise DatasetError(f"artifact folder not found: {source}")

        def fill(staging: Path) -> tuple[list[dict[str, Any]], int, list[dict[str, str]]]:
            files = []
            for path in sorted(p for p in source.rglob("*") if p.is_file()):
                rel = path.relative_to(source)
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
                with target.open("rb+") as handle:
                    os.fsync(handle.fileno())
                files.append(
                    {
                        "path": str(rel),
                        "bytes": target.stat().st_size,
                        "sha256": sha256_file(target),
                    }
                )
            return files, 0, []

        return self._commit(name, fill, kind, stage, code_version, params, parents, stats, version)

    def _commit(
        self,
        name: str,
        fill,
        kind: str,
        stage: str,
        code_version: str,
        params: dict[str, Any],
        parents: Iterable[DatasetRef | str],
        stats: dict[str, Any] | None,
        version: str | None,
    ) -> Manifest:
        parent_refs = sorted(str(p) for p in parents)
        version = version or version_id(stage, code_version, params, parent_refs)
        if self.exists(name, version):
            return self.manifest(DatasetRef(name, version))
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        self._clean_stale(folder, version)
        staging = folder / f".staging-{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            files, rows, out_schema = fill(staging)
            crash_point("dataset_write", name)
            manifest = Manifest(
                name=name,
                version=version,
                stage=stage,
                code_version=code_version,
                params=params,
                parents=parent_refs,
                rows=rows,
                schema=out_schema,
                files=files,
                created_at=datetime.now(UTC).isoformat(timespec="microseconds"),
                flow_run=current_flow_run(),
                stats=stats or {},
                kind=kind,
            )
            tmp = staging / f".{MANIFEST}.tmp"
            with tmp.open("w", encoding="utf-8") as handle:
                handle.write(manifest.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, staging / MANIFEST)
            _fsync_dir(staging)
            target = folder / version
            if target.exists():
                if (target / MANIFEST).is_file():  # another writer finished the same version first
                    shutil.rmtree(staging, ignore_errors=True)
                    return self.manifest(DatasetRef(name, version))
                shutil.rmtree(target)
            os.rename(staging, target)
            _fsync_dir(folder)
            return manifest
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _write_shards(
        self,
        staging: Path,
        frames: Iterable[pl.DataFrame],
        schema: dict[str, pl.DataType] | None,
    ) -> tuple[list[dict[str, Any]], int, list[dict[str, str]]]:
        files: list[dict[str, Any]] = []
        rows = 0
        first: pl.DataFrame | None = None
        for frame in _reshard(frames, ROWS_PER_SHARD):
            if schema is not None:
                frame = frame.select([pl.col(c).cast(t) for c, t in schema.items()])
            if first is None:
                first = frame.clear()
            if frame.height == 0:
                continue
            files.append(self._write_shard(staging, len(files), frame))
            rows += frame.height
        if not files:  # an empty dataset still has its schema, in one empty shard
            empty = first if first is not None else pl.DataFrame(schema=schema or {})
            files.append(self._write_shard(staging, 0, empty))
        reference = first if first is not None else pl.DataFrame(schema=schema or {})
        out_schema = [{"name": c, "type": str(t)} for c, t in reference.schema.items()]
        return files, rows, out_schema

    @staticmethod
    def _write_shard(staging: Path, index: int, frame: pl.DataFrame) -> dict[str, Any]:
        path = staging / f"part-{index:05d}.parquet"
        tmp = staging / f".{path.name}.tmp"
        frame.write_parquet(tmp, compression="zstd", statistics=True)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return {
            "path": path.name,
            "rows": frame.height,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }

    def _clean_stale(self, folder: Path, version: str) -> None:
        """Remove leftovers of crashed writes: dead writers' staging folders, manifest-less versions."""
        for entry in folder.iterdir():
            if entry.name.startswith(".work-"):
                continue  # a computation's resumable work folder: removed when it completes
            if entry.name.startswith(".staging-"):
                parts = entry.name.split("-")
                pid = int(parts[2]) if len(parts) >= 4 and parts[2].isdigit() else -1
                if pid != os.getpid() and not _pid_alive(pid):
                    shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and not (entry / MANIFEST).exists() and entry.name == version:
                shutil.rmtree(entry, ignore_errors=True)

    def iter_batches(self, ref: DatasetRef | str, batch_size: int) -> Iterator[pl.DataFrame]:
        """Row batches of a version, in order, for work split into shards."""
        for path in self.files(ref):
            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(batch_size=batch_size):
                yield pl.from_arrow(batch)


def _reshard(frames: Iterable[pl.DataFrame], size: int) -> Iterator[pl.DataFrame]:
    for frame in frames:
        if frame.height == 0:
            yield frame  # carries the schema
            continue
        for start in range(0, frame.height, size):
            yield frame.slice(start, size)


_TYPES = {
    "String": pl.String,
    "Int64": pl.Int64,
    "Int32": pl.Int32,
    "Float64": pl.Float64,
    "Boolean": pl.Boolean,
}


def _polars_schema(schema: list[dict[str, str]]) -> dict[str, pl.DataType]:
    return {col["name"]: _TYPES.get(col["type"], pl.String) for col in schema}
