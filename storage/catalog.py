"""The DuckDB catalog: a `versions` table and one view per dataset showing its newest version.

Artifacts (model checkpoints, plots: folders stored as versions) are rows of `versions` with
their `kind`; the `artifacts` view lists every artifact version with its folder, parents,
parameters and stats (final metrics), and `models` the model checkpoints among them.

The catalog is a DuckDB file in `EVOLFORGE_HOME`. DuckDB lets one process hold a file read-write
and then no other may open it, so the writer holds it only for the moment of an update, under a
file lock (`catalog.lock`): one writer at a time, and readers (`evolforge sql`, the DuckDB CLI,
a notebook) open it read-only between updates, retrying briefly if an update is in progress.

Views read the parquet files of the newest version directly; a `_version` column in each view
names the version a row came from, and the `versions` table records parents, so every row traces
back through lineage. DuckDB is configured never to download extensions: only those built into
the wheel (parquet, json, icu) are used.

On a home on S3 the catalog file and its lock are in the home's local folder (one per machine,
written by the flow's driver only), and the views read the parquet objects on S3 through the
s3fs file system registered on every connection this module opens (no httpfs extension). The
manifests on S3 are the source of truth: `rebuild` recreates a lost catalog from them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
from filelock import FileLock

from storage.datasets import DatasetStore, Manifest
from storage.faults import crash_point

CATALOG_FILE = "catalog.duckdb"
logger = logging.getLogger(__name__)

# Never reach the network for extensions; parquet and json are built in.
DUCKDB_CONFIG = {
    "autoinstall_known_extensions": "false",
    "autoload_known_extensions": "false",
    "allow_community_extensions": "false",
}

_VERSIONS_DDL = """
CREATE TABLE IF NOT EXISTS versions (
    name VARCHAR NOT NULL,
    version VARCHAR NOT NULL,
    stage VARCHAR,
    code_version VARCHAR,
    parents VARCHAR[],
    params JSON,
    rows BIGINT,
    stats JSON,
    created_at TIMESTAMPTZ,
    flow_run VARCHAR,
    path VARCHAR,
    kind VARCHAR DEFAULT 'dataset',
    PRIMARY KEY (name, version)
)
"""
# Catalogs written before artifacts existed lack the kind column.
_MIGRATE = "ALTER TABLE versions ADD COLUMN IF NOT EXISTS kind VARCHAR DEFAULT 'dataset'"
_ARTIFACT_VIEWS = """
CREATE OR REPLACE VIEW artifacts AS
    SELECT name, version, kind, stage, path, parents, params, stats, created_at, flow_run
    FROM versions WHERE kind <> 'dataset';
CREATE OR REPLACE VIEW models AS
    SELECT name, version, path, parents, params, stats AS metrics, created_at, flow_run
    FROM versions WHERE kind = 'model';
"""


def connect(
    path: Path | str = ":memory:", read_only: bool = False, filesystem: Any = None
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that will not try to download extensions; with `filesystem` (an
    fsspec file system, s3fs for a home on S3) registered, so `s3://` paths read through it."""
    con = duckdb.connect(str(path), read_only=read_only, config=dict(DUCKDB_CONFIG))
    if filesystem is not None:
        con.register_filesystem(filesystem)
    return con


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class CatalogBusyError(Exception):
    """The catalog stayed locked by another process for longer than we would wait."""


def _open_retrying(
    path: Path, read_only: bool, wait_s: float, filesystem: Any = None
) -> duckdb.DuckDBPyConnection:
    """DuckDB takes a process-level file lock (shared for readers, exclusive for the writer):
    wait for the other side's short hold to end instead of failing at once."""
    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        try:
            return connect(path, read_only=read_only, filesystem=filesystem)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise CatalogBusyError(
                    f"catalog {path} is busy: {str(exc).splitlines()[0]}"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def catalog_wait_s() -> float:
    """How long one catalog update waits for readers to let go (`EVOLFORGE_CATALOG_WAIT_S`)."""
    return float(os.environ.get("EVOLFORGE_CATALOG_WAIT_S", "60"))


# Manifests whose registration a busy catalog made this process skip, per catalog file; they are
# registered with the next update that gets through (or by `evolforge catalog rebuild`).
_pending: dict[Path, dict[tuple[str, str], Manifest]] = {}
_pending_lock = threading.Lock()
# After one update gave up waiting, later ones in this process wait only this long, so a reader
# that holds the catalog for a whole run delays the run by `catalog_wait_s()` once, not per update.
BUSY_RETRY_WAIT_S = 1.0


def pending(home: Path) -> list[Manifest]:
    """Versions this process wrote but could not yet record in the catalog."""
    with _pending_lock:
        return list(_pending.get(Path(home) / CATALOG_FILE, {}).values())


class Catalog:
    def __init__(self, home: Path):
        self.home = Path(home)
        self.path = self.home / CATALOG_FILE
        self.lock = FileLock(str(self.home / "catalog.lock"), timeout=120)
        self.store = DatasetStore(self.home)
        # s3fs for a home on S3: the views read `s3://` objects through it
        self.filesystem = self.store.remote.fs if self.store.remote is not None else None

    def register(self, manifest: Manifest, wait_s: float | None = None) -> bool:
        """Record a version and point its dataset's view at the current version
        (`DatasetStore.latest`: what the last run produced or found cached).

        The manifests on disk are the source of truth. A reader holding the catalog open (DuckDB
        locks the file per process) makes an update wait up to `catalog_wait_s()`; past that the
        update is skipped with a warning and kept pending, later updates in this process wait
        only `BUSY_RETRY_WAIT_S`, and the first one that gets through records every pending
        version too. `evolforge catalog rebuild` catches up from the manifests at any time.
        """
        with _pending_lock:
            waiting = _pending.setdefault(self.path, {})
            todo = [*waiting.values(), manifest]
            busy_before = bool(waiting)
        if wait_s is None:
            wait_s = BUSY_RETRY_WAIT_S if busy_before else catalog_wait_s()
        try:
            with self.lock:
                con = _open_retrying(self.path, False, wait_s, self.filesystem)
                with con:
                    for item in todo:
                        self._register(con, item)
            with _pending_lock:
                for item in todo:
                    waiting.pop((item.name, item.version), None)
            return True
        except CatalogBusyError as exc:
            with _pending_lock:
                waiting[(manifest.name, manifest.version)] = manifest
            logger.warning(
                "catalog not updated for %s@%s (%d version(s) pending; "
                "`evolforge catalog rebuild` catches up): %s",
                manifest.name,
                manifest.version,
                len(waiting),
                exc,
            )
            return False

    def _register(self, con: duckdb.DuckDBPyConnection, manifest: Manifest) -> None:
        con.execute(_VERSIONS_DDL)
        con.execute(_MIGRATE)
        con.execute(
            """INSERT INTO versions (name, version, stage, code_version, parents, params, rows,
                                     stats, created_at, flow_run, path, kind)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (name, version) DO NOTHING""",
            [
                manifest.name,
                manifest.version,
                manifest.stage,
                manifest.code_version,
                manifest.parents,
                json.dumps(manifest.params, default=str),
                manifest.rows,
                json.dumps(manifest.stats, default=str),
                manifest.created_at,
                manifest.flow_run,
                self.store.location(manifest.name, manifest.version),
                manifest.kind,
            ],
        )
        crash_point("catalog_update", manifest.name)
        con.execute(_ARTIFACT_VIEWS)
        if not manifest.is_dataset:
            return
        self._create_view(con, self.store.latest(manifest.name))

    def _create_view(self, con: duckdb.DuckDBPyConnection, manifest: Manifest) -> None:
        files = self.store.urls(manifest.ref)
        file_list = "[" + ", ".join(_quote_str(f) for f in files) + "]"
        con.execute(
            f"CREATE OR REPLACE VIEW {_quote_ident(manifest.name)} AS "
            f"SELECT *, {_quote_str(manifest.version)} AS _version "
            f"FROM read_parquet({file_list}, union_by_name = true)"
        )

    def rebuild(self) -> int:
        """Recreate the catalog from the manifests on storage (after a lost or deleted catalog
        file, or on another machine of a home on S3)."""
        count = 0
        for name in self.store.names():
            for manifest in self.store.versions(name):
                self.register(manifest)
                count += 1
        return count

    def query(self, sql: str, params: list[Any] | None = None, wait_s: float = 10.0):
        """Run a read-only query; returns (column names, rows)."""
        if not self.path.exists():
            with self.lock, _open_retrying(self.path, False, wait_s, self.filesystem) as con:
                con.execute(_VERSIONS_DDL)
                con.execute(_ARTIFACT_VIEWS)
        with _open_retrying(self.path, True, wait_s, self.filesystem) as con:
            cursor = con.execute(sql, params or [])
            columns = [d[0] for d in cursor.description] if cursor.description else []
            return columns, cursor.fetchall()
