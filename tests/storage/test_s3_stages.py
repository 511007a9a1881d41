"""Stages on a home on S3: a sharded stage's shards, a trained artifact (resumed from its local
work folder) uploaded as a version, and read back as a folder on another node."""

from __future__ import annotations

import polars as pl
import pytest

from storage.datasets import DatasetStore
from storage.settings import home
from tasks.records import Record
from tasks.stage import SHARD_PREFIX, ArtifactDir, StageOutput, stage
from tests.tasks.test_stage import Number, double_rows, train_toy


class Weights(Record):
    """The text of a toy checkpoint's weights file."""

    text: pl.String


@stage(outputs={"weights": Weights})
def read_weights(model: ArtifactDir) -> StageOutput:
    return StageOutput({"weights": Weights.frame([{"text": (model / "weights.txt").read_text()}])})


def _numbers(store: DatasetStore, n: int = 10):
    frame = Number.frame([{"id": f"n{i}", "x": i} for i in range(n)])
    return store.write("numbers", frame, stage="test", code_version="c", params={"n": n}).ref


def test_sharded_stage_and_artifact_on_s3(s3_home, tmp_path, monkeypatch):
    store = DatasetStore(home())
    numbers = _numbers(store)
    doubled = double_rows(numbers=numbers)
    assert store.read(doubled.refs["doubled"])["x"].to_list() == [2 * i for i in range(10)]
    assert store.remote is not None
    shards = store.remote.glob(f"datasets/{SHARD_PREFIX}doubled/*/_manifest.json")
    assert len(shards) == doubled.stats["shards"]["total"] > 1

    with pytest.raises(RuntimeError, match="killed mid-training"):
        train_toy(numbers=numbers, fail_after_checkpoint=True)
    assert store.versions("model") == []  # nothing committed to S3
    trained = train_toy(numbers=numbers, fail_after_checkpoint=True)
    manifest = store.manifest(trained.refs["model"])
    assert manifest.stats["resumed"] is True and manifest.kind == "model"
    assert [f["path"] for f in manifest.files] == ["weights.txt"]
    assert store.remote.exists(f"datasets/model/{manifest.version}/{manifest.files[0]['key']}")

    # another node: an empty local folder; the checkpoint comes down by content when read
    monkeypatch.setenv("EVOLFORGE_CACHE", str(tmp_path / "node-b"))
    other = DatasetStore(home())
    assert other.home != store.home and not (other.root / "model").exists()
    result = read_weights(model=trained.refs["model"])
    assert other.read(result.refs["weights"])["text"].to_list() == ["sum=45"]
    assert (other.root / "model" / manifest.version / "weights.txt").read_text() == "sum=45"
    # the stages done on the first node are cache hits here
    assert double_rows(numbers=numbers).cached
    assert train_toy(numbers=numbers, fail_after_checkpoint=True).cached
