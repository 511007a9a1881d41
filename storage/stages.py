"""Run a stage at most once per version: the store-level cache every task goes through.

`run_stage` computes the stage's version id from (stage, code version, parameters, parent
versions). When every output already exists at that version the stage is a cache hit: nothing
is computed or written. Otherwise `compute()` runs, each output is written as an immutable
version and registered in the catalog.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from infra.settings import home as default_home
from storage.catalog import Catalog
from storage.datasets import DatasetRef, DatasetStore, Manifest, version_id


@dataclass
class StageOutput:
    """What a stage's compute function returns: one frame per output name, and its stats."""

    frames: dict[str, pl.DataFrame]
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    refs: dict[str, DatasetRef]
    cached: bool
    stats: dict[str, Any]

    def __getitem__(self, name: str) -> DatasetRef:
        return self.refs[name]


def code_version(*files: str | Path) -> str:
    """Hash of the source files that define a stage (its code, prompts, SQL)."""
    digest = hashlib.sha256()
    for path in sorted(str(f) for f in files):
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


def stage_version(
    stage: str, code: str, params: dict[str, Any], parents: Iterable[DatasetRef | str]
) -> str:
    return version_id(stage, code, params, [str(p) for p in parents])


def outputs_exist(names: Iterable[str], version: str, home: Path | None = None) -> bool:
    store = DatasetStore(home or default_home())
    return all(store.exists(name, version) for name in names)


def run_stage(
    stage: str,
    code: str,
    params: dict[str, Any],
    parents: Iterable[DatasetRef | str],
    outputs: list[str],
    compute: Callable[[], StageOutput],
    home: Path | None = None,
) -> StageResult:
    home = home or default_home()
    store = DatasetStore(home)
    catalog = Catalog(home)
    parents = [str(p) for p in parents]
    version = stage_version(stage, code, params, parents)
    if all(store.exists(name, version) for name in outputs):
        manifests = [store.manifest(DatasetRef(name, version)) for name in outputs]
        for manifest in manifests:
            catalog.register(manifest)  # idempotent; restores a lost catalog entry
        return StageResult(
            {m.name: m.ref for m in manifests}, cached=True, stats=manifests[0].stats
        )
    result = compute()
    missing = set(outputs) - set(result.frames)
    if missing:
        raise ValueError(f"stage {stage} did not produce output(s): {', '.join(sorted(missing))}")
    manifests: list[Manifest] = []
    for name in outputs:
        manifest = store.write(
            name,
            result.frames[name],
            stage=stage,
            code_version=code,
            params=params,
            parents=parents,
            stats=result.stats,
            version=version,
        )
        catalog.register(manifest)
        manifests.append(manifest)
    return StageResult({m.name: m.ref for m in manifests}, cached=False, stats=result.stats)
