"""Executors: the one interface, the choice of executor, and the same versions wherever a
stage runs."""

from __future__ import annotations

import polars as pl
import pytest

from storage.datasets import DatasetStore
from tasks.contracts import SHARD_PREFIX, StageError, StageOutput, StageResult
from tasks.executors import (
    Executor,
    InProcessExecutor,
    PrefectExecutor,
    current_executor,
    use_executor,
)
from tasks.records import Record
from tasks.stage import Shard, stage

BODY_CALLS: list[int] = []


class Number(Record):
    """A numbered row."""

    id: pl.String
    x: pl.Int64


@stage(outputs={"tripled": Number}, shard=Shard("numbers", rows=4))
def triple_rows(numbers: pl.DataFrame) -> StageOutput:
    BODY_CALLS.append(numbers.height)
    return StageOutput({"tripled": numbers.with_columns(pl.col("x") * 3)})


@stage(outputs={"broken": Number})
def return_a_list(numbers: pl.DataFrame) -> StageOutput:
    return StageOutput({"broken": numbers["x"].to_list()})  # type: ignore[dict-item]


class CountingExecutor(InProcessExecutor):
    """An executor of our own: in process, counting the shards it computes."""

    def __init__(self, home=None):
        super().__init__(home)
        self.shards_run: list[int] = []

    def run_shard(self, stage, values, spec):
        result = super().run_shard(stage, values, spec)
        if not result["cached"]:
            self.shards_run.append(spec.index)
        return result


@pytest.fixture
def numbers(evolforge_home):
    BODY_CALLS.clear()
    frame = pl.DataFrame({"id": [f"r{i:03d}" for i in range(20)], "x": list(range(20))})
    store = DatasetStore(evolforge_home)
    return store.write("numbers", frame, stage="test", code_version="t", params={}).ref


def test_outside_a_flow_the_in_process_executor_runs_and_use_executor_overrides_it(numbers):
    assert isinstance(current_executor(), InProcessExecutor)
    mine = CountingExecutor()
    with use_executor(mine):
        assert current_executor() is mine
        result = triple_rows(numbers=numbers)
    assert isinstance(current_executor(), InProcessExecutor) and current_executor() is not mine
    specs = triple_rows.shard_plan(triple_rows.bind({"numbers": numbers}), mine.home)
    assert len(specs) > 1 and mine.shards_run == [s.index for s in specs]
    assert sum(BODY_CALLS) == 20 and not result.cached


def test_the_version_does_not_depend_on_the_executor(numbers, prefect_harness):
    from prefect import flow

    local = InProcessExecutor().run(triple_rows, triple_rows.bind({"numbers": numbers}))
    calls = len(BODY_CALLS)

    @flow
    def pipeline() -> StageResult:
        assert isinstance(current_executor(), PrefectExecutor)
        return triple_rows(numbers=numbers)

    in_flow = pipeline()
    assert in_flow.version == local.version and in_flow.refs == local.refs
    assert in_flow.cached and len(BODY_CALLS) == calls  # the flow found the work done


def test_a_shard_run_twice_writes_once(numbers, evolforge_home):
    """A retried task (a Ray worker that died after writing) must not write a second copy."""
    executor = InProcessExecutor()
    values = triple_rows.bind({"numbers": numbers})
    spec = triple_rows.shard_plan(values, executor.home)[0]
    first = executor.run_shard(triple_rows, values, spec)
    again = executor.run_shard(triple_rows, values, spec)
    assert (first["cached"], again["cached"]) == (False, True)
    folder = evolforge_home / "datasets" / (SHARD_PREFIX + "tripled")
    assert [p.name for p in folder.iterdir() if not p.name.startswith(".")] == [spec.version]


def test_an_output_that_is_not_a_frame_fails_before_anything_is_written(numbers, evolforge_home):
    with pytest.raises(StageError, match="stage return_a_list: output 'broken' is list"):
        return_a_list.run(numbers=numbers)
    assert not (evolforge_home / "datasets" / "broken").exists()


def test_executor_is_an_interface():
    with pytest.raises(TypeError):
        Executor()  # type: ignore[abstract]


def test_the_catalog_has_one_writer_the_driver(
    numbers, evolforge_home, monkeypatch, prefect_harness
):
    """Task runs (shards, the stage's merge) write versions; only the flow's own process, outside
    any task run, makes them current and registers them in the catalog."""
    from prefect import flow
    from prefect.context import TaskRunContext

    from storage.catalog import Catalog

    registered: list[tuple[str, bool]] = []
    register = Catalog.register

    def spy(self, manifest):
        registered.append((manifest.name, TaskRunContext.get() is not None))
        return register(self, manifest)

    monkeypatch.setattr(Catalog, "register", spy)

    @flow
    def pipeline() -> StageResult:
        return triple_rows(numbers=numbers)

    result = pipeline()
    assert registered == [("tripled", False)]  # once, from the driver, not inside a task run
    assert DatasetStore(evolforge_home).latest("tripled").ref == result["tripled"]


def test_execute_writes_and_publish_registers(numbers, evolforge_home):
    from storage.catalog import Catalog

    executor = InProcessExecutor()
    values = triple_rows.bind({"numbers": numbers})
    written = executor.execute(triple_rows, values)
    store = DatasetStore(evolforge_home)
    assert store.exists("tripled", written.version)
    count = "SELECT count(*) FROM versions WHERE name = 'tripled'"
    assert Catalog(evolforge_home).query(count)[1] == [(0,)]
    assert not (evolforge_home / "datasets" / "tripled" / "CURRENT").exists()
    executor.publish(written)
    assert Catalog(evolforge_home).query(count)[1] == [(1,)]
    assert store.latest("tripled").ref == written["tripled"]
