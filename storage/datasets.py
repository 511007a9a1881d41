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

On a home on S3 (`storage/fs.py`) the same layout lives on the object store under the home's
prefix. A version is staged in the local folder as above; each file is then uploaded under a
name derived from its content (`part-00000.<sha256>.parquet`, the manifest's `key`) with a
conditional put, and the manifest last, also with a conditional put: of two writers of one
version exactly one commits, the other finds its manifest taken and returns the winner's (its
own parts, if they differ, stay unreferenced). Until the manifest is committed the version does
not exist for anyone. Readers get local paths: the files of a version read here are copied into
the local folder (same layout, each file checked against the manifest's sha256, the manifest
written last), so `files()`, `version_dir()` and `read()` work as on a local home; the catalog's
views read the objects on S3 through DuckDB's registered file system (`urls()`).
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
from storage.fs import ObjectStore, content_key
from storage.settings import remote_of

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
        # The object store when `home` is the local folder of a home on S3, else None.
        self.remote: ObjectStore | None = remote_of(self.home)

    @staticmethod
    def _key(name: str, version: str | None = None, file: str | None = None) -> str:
        key = f"datasets/{name}"
        if version is not None:
            key += f"/{version}"
        if file is not None:
            key += f"/{file}"
        return key

    # -- reading ----------------------------------------------------------------------------
    def version_dir(self, name: str, version: str) -> Path:
        """A version's local folder. On a home on S3 an existing version is first copied here
        (checked against its manifest), so model checkpoints and plots are read as files."""
        folder = self.root / name / version
        local = (folder / MANIFEST).is_file()
        if self.remote is not None and not local and self.exists(name, version):
            self._mirror(self.manifest(DatasetRef(name, version)))
        return folder

    def location(self, name: str, version: str) -> str:
        """Where a version lives, for people and the catalog: a folder or an `s3://` URL."""
        if self.remote is not None:
            return self.remote.uri(self._key(name, version))
        return str(self.root / name / version)

    def exists(self, name: str, version: str) -> bool:
        if (self.root / name / version / MANIFEST).is_file():
            return True  # versions are immutable: a local copy means it is committed
        if self.remote is None:
            return False
        if self._cached_manifest(name, version).is_file():
            return True
        return self.remote.exists(self._key(name, version, MANIFEST))

    def _cached_manifest(self, name: str, version: str) -> Path:
        return self.home / "manifests" / name / f"{version}.json"

    def manifest(self, ref: DatasetRef | str) -> Manifest:
        ref = DatasetRef.parse(ref) if isinstance(ref, str) else ref
        path = self.root / ref.name / ref.version / MANIFEST
        if path.is_file():
            return Manifest.from_file(path)
        if self.remote is None:
            raise DatasetError(f"no such dataset version: {ref}")
        cached = self._cached_manifest(ref.name, ref.version)
        if cached.is_file():
            return Manifest.from_file(cached)
        try:
            data = self.remote.get(self._key(ref.name, ref.version, MANIFEST))
        except FileNotFoundError:
            raise DatasetError(f"no such dataset version: {ref}") from None
        _write_atomic(cached, data)
        return Manifest.from_file(cached)

    def names(self, internal: bool = False) -> list[str]:
        """Dataset and artifact names; `_shard.*` (a sharded stage's per-shard outputs) only
        with `internal`."""
        if self.remote is not None:
            found = self.remote.listdir("datasets")
        else:
            found = [p.name for p in self.root.iterdir() if p.is_dir()]
        return sorted(
            n for n in found if not n.startswith(".") and (internal or not n.startswith("_"))
        )

    def versions(self, name: str) -> list[Manifest]:
        """Complete versions of a dataset, oldest first."""
        if self.remote is not None:
            keys = self.remote.glob(self._key(name, "*", MANIFEST))
            found = [self.manifest(DatasetRef(name, key.split("/")[-2])) for key in keys]
            return sorted(found, key=lambda m: (m.created_at, m.version))
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
        version = self._current(name)
        if version and self.exists(name, version):
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
        if self.remote is not None:
            self.remote.put(self._key(ref.name, file=CURRENT), (ref.version + "\n").encode())
            return
        folder = self.root / ref.name
        tmp = folder / f".{CURRENT}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(ref.version + "\n", encoding="utf-8")
        os.replace(tmp, folder / CURRENT)

    def _current(self, name: str) -> str | None:
        if self.remote is not None:
            try:
                return self.remote.get(self._key(name, file=CURRENT)).decode().strip()
            except FileNotFoundError:
                return None
        current = self.root / name / CURRENT
        return current.read_text(encoding="utf-8").strip() if current.is_file() else None

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
        """A version's files as local paths (on a home on S3: its local copy)."""
        manifest = self.manifest(ref)
        folder = self.version_dir(manifest.name, manifest.version)
        return [folder / f["path"] for f in manifest.files]

    def urls(self, ref: DatasetRef | str) -> list[str]:
        """A version's files where they live: local paths, or `s3://` URLs (for DuckDB through
        the registered file system) without copying anything here."""
        manifest = self.manifest(ref)
        if self.remote is None:
            return [str(p) for p in self.files(manifest.ref)]
        return [
            self.remote.uri(self._key(manifest.name, manifest.version, f.get("key", f["path"])))
            for f in manifest.files
        ]

    def _mirror(self, manifest: Manifest) -> Path:
        """Copy a committed version from the object store into the local folder: every file
        checked against the manifest's sha256, the manifest last, the folder renamed into place."""
        assert self.remote is not None
        folder = self.root / manifest.name / manifest.version
        if (folder / MANIFEST).is_file():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = (
            folder.parent / f".staging-{manifest.version}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        staging.mkdir()
        try:
            for entry in manifest.files:
                key = self._key(manifest.name, manifest.version, entry.get("key", entry["path"]))
                target = staging / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                self.remote.download(key, target)
                digest = sha256_file(target)
                if digest != entry["sha256"]:
                    raise DatasetError(
                        f"{self.remote.uri(key)}: sha256 {digest[:16]}… does not match its "
                        f"manifest ({entry['sha256'][:16]}…)"
                    )
            _write_atomic(staging / MANIFEST, manifest.to_json().encode())
            _place(staging, folder)
            return folder
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def read(self, ref: DatasetRef | str, columns: list[str] | None = None) -> pl.DataFrame:
        manifest = self.manifest(ref)
        if not manifest.is_dataset:
            raise DatasetError(
                f"{manifest.ref} is a {manifest.kind} artifact (a folder), not a dataset: "
                f"{self.location(manifest.name, manifest.version)}"
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
            if self.remote is not None:
                won = self._upload(manifest, staging)
                if not won:  # another writer committed this version first: theirs stands
                    shutil.rmtree(staging, ignore_errors=True)
                    return self.manifest(DatasetRef(name, version))
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

    def _upload(self, manifest: Manifest, staging: Path) -> bool:
        """Put a staged version on the object store: its files by content (a conditional put;
        one already there is the same bytes), then its manifest with a conditional put. True
        when this writer committed the version, False when another had (nothing of ours is
        then referenced)."""
        assert self.remote is not None
        for entry in manifest.files:
            entry["key"] = content_key(entry["path"], entry["sha256"])
            key = self._key(manifest.name, manifest.version, entry["key"])
            self.remote.put_file_new(key, staging / entry["path"])
        crash_point("dataset_upload", manifest.name)
        key = self._key(manifest.name, manifest.version, MANIFEST)
        return self.remote.put_new(key, manifest.to_json().encode())

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


def _place(staging: Path, folder: Path) -> bool:
    """Rename a complete copy (its manifest inside) into place; False, dropping it, when another
    thread or process placed one first (versions are immutable: theirs is the same)."""
    if not (folder / MANIFEST).is_file() and folder.exists():
        shutil.rmtree(folder, ignore_errors=True)  # a folder without manifest is never read
    try:
        os.rename(staging, folder)
        return True
    except OSError:
        if not (folder / MANIFEST).is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
