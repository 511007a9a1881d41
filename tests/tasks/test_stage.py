"""The stage declaration: versions, cache hits, inputs, artifacts, shards, engine counters."""

from __future__ import annotations

import itertools

import polars as pl
import pytest
from pydantic import BaseModel

import infra.engines as engines
import tasks.stage as stage_module
from infra.engines import EngineConfig
from infra.engines.base import ChatRequest, SamplingParams
from storage.catalog import Catalog
from storage.datasets import DatasetStore
from tasks.records import Record, RecordError
from tasks.stage import (
    SHARD_PREFIX,
    Artifact,
    Shard,
    StageContext,
    StageError,
    StageOutput,
    shard_bounds,
    stage,
)
from tests.fakes import ScriptedEngine

CALLS: list[str] = []


class Number(Record):
    """A numbered row of the test inputs."""

    id: pl.String
    x: pl.Int64


class Answered(Number):
    """A number with the engine's answer."""

    answer: pl.String


class LabelledChild(Record):
    """A child row with its parent's name."""

    id: pl.String
    parent: pl.String
    name: pl.String


class Scale(BaseModel):
    factor: int = 2

    def fingerprint(self) -> dict:
        return {"factor": self.factor}  # `note` below does not change outputs


class ScaleWithNote(Scale):
    note: str = ""


@stage(outputs={"scaled": Number})
def scale_numbers(
    numbers: pl.DataFrame, offsets: pl.DataFrame | None, params: Scale
) -> StageOutput:
    """Multiply, then add the offset of each row when there is one."""
    CALLS.append("scale")
    out = numbers.with_columns(pl.col("x") * params.factor)
    if offsets is not None:
        out = out.join(offsets, on="id", how="left").with_columns(
            pl.col("x") + pl.col("offset").fill_null(0)
        )
        out = out.drop("offset")
    return StageOutput({"scaled": out}, {"rows": out.height})


@stage(outputs={"doubled": Number}, shard=Shard("numbers", rows=4))
def double_rows(numbers: pl.DataFrame) -> StageOutput:
    CALLS.append(f"shard:{numbers.height}")
    return StageOutput({"doubled": numbers.with_columns(pl.col("x") * 2)}, {"rows": numbers.height})


@stage(
    outputs={"labelled": LabelledChild},
    shard=Shard("children", rows=2, lookups={"parents": ("parent", "id")}),
)
def label_children(children: pl.DataFrame, parents: pl.DataFrame) -> StageOutput:
    CALLS.append(f"lookup:{sorted(parents['id'].to_list())}")
    joined = children.join(parents.rename({"id": "parent"}), on="parent", how="left")
    return StageOutput({"labelled": joined})


@stage(outputs={"model": Artifact(kind="model")})
def train_toy(ctx: StageContext, numbers: pl.DataFrame, fail_after_checkpoint: bool) -> StageOutput:
    checkpoint = ctx.work_dir("model") / "checkpoint.txt"
    resumed = checkpoint.exists()
    checkpoint.write_text(str(numbers.height))
    if fail_after_checkpoint and not resumed:
        raise RuntimeError("killed mid-training")
    (ctx.output_dir("model") / "weights.txt").write_text(f"sum={numbers['x'].sum()}")
    return StageOutput(stats={"resumed": resumed, "loss": 0.5})


@stage(outputs={"answers": Answered})
def ask_engine(ctx: StageContext, numbers: pl.DataFrame, engine: EngineConfig) -> StageOutput:
    llm = ctx.engine(engine)
    requests = [
        ChatRequest(({"role": "user", "content": f"x={x}"},), SamplingParams(max_tokens=4))
        for x in numbers["x"]
    ]
    texts = [r.text for r in llm.generate(requests)]
    return StageOutput({"answers": numbers.with_columns(pl.Series("answer", texts))})


@stage(outputs={"halved": Number, "kept": Number})
def halve_numbers(numbers: pl.DataFrame, mistake: str) -> StageOutput:
    """Halve x, making the `mistake` asked for in the `halved` output."""
    halved = numbers.with_columns(pl.col("x") // 2)
    if mistake == "dtype":
        halved = halved.with_columns(pl.col("x") / 2)
    elif mistake == "missing":
        halved = halved.drop("x")
    elif mistake == "extra":
        halved = halved.with_columns(pl.lit(1.5).alias("half"))
    elif mistake == "order":
        halved = halved.select("x", "id")
    return StageOutput({"halved": halved, "kept": numbers})


@stage(outputs={"halves": Number}, shard=Shard("numbers", rows=4))
def halve_rows(numbers: pl.DataFrame) -> StageOutput:
    """A sharded stage that writes x / 2 (a Float64) where its record says Int64."""
    return StageOutput({"halves": numbers.with_columns(pl.col("x") / 2)})


def _numbers(store: DatasetStore, n: int, start: int = 0, name: str = "numbers"):
    frame = pl.DataFrame(
        {"id": [f"r{i:03d}" for i in range(start, start + n)], "x": list(range(n))}
    )
    return store.write(name, frame, stage="test", code_version="t", params={"n": n, "s": start}).ref


@pytest.fixture
def store(evolforge_home) -> DatasetStore:
    CALLS.clear()
    return DatasetStore(evolforge_home)


def test_run_writes_then_hits_and_versions_follow_inputs_params_and_code(store, monkeypatch):
    numbers = _numbers(store, 5)
    first = scale_numbers.run(numbers=numbers, offsets=None, params=Scale())
    assert not first.cached and CALLS == ["scale"]
    assert store.read(first["scaled"])["x"].to_list() == [0, 2, 4, 6, 8]
    again = scale_numbers.run(numbers=str(numbers), offsets=None, params=ScaleWithNote(note="x"))
    assert again.cached and again.version == first.version and CALLS == ["scale"]
    manifest = store.manifest(first["scaled"])
    assert manifest.parents == [str(numbers)] and manifest.stage == "scale_numbers"
    assert manifest.params == {"params": {"factor": 2}} and manifest.stats == {"rows": 5}

    assert (
        scale_numbers.version(numbers=numbers, offsets=None, params=Scale(factor=3))
        != first.version
    )
    assert (
        scale_numbers.version(numbers=_numbers(store, 6), offsets=None, params=Scale())
        != first.version
    )
    # The code version is computed once per process (the code it runs is what it imported);
    # another process, after an edit, sees another one.
    monkeypatch.setattr(stage_module, "code_version", lambda module: "edited")
    assert scale_numbers.version(numbers=numbers, offsets=None, params=Scale()) == first.version
    monkeypatch.setattr(stage_module, "_code_versions", {})
    assert scale_numbers.version(numbers=numbers, offsets=None, params=Scale()) != first.version


def test_optional_inputs_and_bad_calls(store):
    numbers = _numbers(store, 3)
    offsets = store.write(
        "offsets",
        pl.DataFrame({"id": ["r001"], "offset": [10]}),
        stage="t",
        code_version="t",
        params={},
    ).ref
    result = scale_numbers.run(numbers=numbers, offsets=offsets, params=Scale())
    assert store.read(result["scaled"])["x"].to_list() == [0, 12, 4]
    with pytest.raises(StageError, match="input 'numbers' is required"):
        scale_numbers.run(numbers=None, offsets=None, params=Scale())
    with pytest.raises(StageError, match="unexpected keyword argument 'bogus'"):
        scale_numbers.run(numbers=numbers, offsets=None, params=Scale(), bogus=1)


def test_catalog_view_shows_the_output(store, evolforge_home):
    result = scale_numbers.run(numbers=_numbers(store, 4), offsets=None, params=Scale())
    _, rows = Catalog(evolforge_home).query("SELECT sum(x), any_value(_version) FROM scaled")
    assert rows == [(12, result.version)]


def test_shard_bounds_cover_every_row_and_cut_on_content():
    frame = pl.DataFrame(
        {"id": [f"q{i}" for i in range(1000)], "round": [i // 300 for i in range(1000)]}
    )
    spec = Shard("x", rows=32, split_on="round")
    bounds = list(shard_bounds(frame, spec))
    assert bounds[0][0] == 0 and sum(rows for _, rows in bounds) == 1000
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(bounds))
    assert all(8 <= n <= 128 for _, n in bounds[:-1])
    rounds = frame["round"].to_list()
    assert all(len(set(rounds[a : a + n])) == 1 for a, n in bounds)  # never across a round
    # Rows inserted in the middle move only the boundaries next to them.
    inserted = pl.concat(
        [frame[:500], pl.DataFrame({"id": ["new1", "new2"], "round": [1, 1]}), frame[500:]]
    )
    after = {tuple(frame["id"][a : a + n]) for a, n in bounds}
    moved = {tuple(inserted["id"][a : a + n]) for a, n in shard_bounds(inserted, spec)} - after
    assert len(moved) <= 2


def test_sharded_stage_recomputes_only_new_shards(store):
    rows = 40
    first = double_rows.run(numbers=_numbers(store, rows))
    computed = [c for c in CALLS if c.startswith("shard")]
    assert sum(int(c.split(":")[1]) for c in computed) == rows
    assert first.stats["shards"]["total"] == len(computed) == first.stats["shards"]["new"]
    assert first.stats["rows"] == rows  # counts are summed over shards
    assert store.read(first["doubled"])["x"].to_list() == [2 * i for i in range(rows)]
    CALLS.clear()
    # Ten rows appended: the old shards are reused, only the tail is computed again.
    grown = pl.concat(
        [store.read(_numbers(store, rows)), store.read(_numbers(store, 10, start=rows))]
    )
    grown_ref = store.write("numbers", grown, stage="t", code_version="t", params={"grown": 1}).ref
    second = double_rows.run(numbers=grown_ref)
    recomputed = sum(int(c.split(":")[1]) for c in CALLS)
    assert 10 <= recomputed < rows
    assert second.stats["shards"]["reused"] >= 1
    assert store.read(second["doubled"]).height == rows + 10
    assert store.names(internal=True).count(SHARD_PREFIX + "doubled") == 1
    assert SHARD_PREFIX + "doubled" not in store.names()


def test_lookup_inputs_give_each_shard_only_the_rows_it_refers_to(store):
    children = pl.DataFrame({"id": ["c1", "c2", "c3", "c4"], "parent": ["p1", "p1", "p2", "p3"]})
    parents = pl.DataFrame({"id": ["p1", "p2", "p3", "p4"], "name": ["a", "b", "c", "d"]})
    c = store.write("children", children, stage="t", code_version="t", params={}).ref
    p = store.write("parents", parents, stage="t", code_version="t", params={}).ref
    result = label_children.run(children=c, parents=p)
    assert store.read(result["labelled"])["name"].to_list() == ["a", "a", "b", "c"]
    seen = [call for call in CALLS if call.startswith("lookup")]
    assert all("'p4'" not in call for call in seen)  # no shard refers to p4
    # A parent row that no shard refers to is not part of any shard's key.
    CALLS.clear()
    more = pl.concat([parents, pl.DataFrame({"id": ["p5"], "name": ["e"]})])
    p2 = store.write("parents", more, stage="t", code_version="t", params={"v": 2}).ref
    again = label_children.run(children=c, parents=p2)
    assert not again.cached and CALLS == []  # new version, every shard reused


def test_artifact_output_is_a_versioned_folder_and_work_survives_a_crash(store, evolforge_home):
    numbers = _numbers(store, 3)
    with pytest.raises(RuntimeError, match="killed"):
        train_toy.run(numbers=numbers, fail_after_checkpoint=True)
    assert not store.versions("model")
    result = train_toy.run(numbers=numbers, fail_after_checkpoint=True)
    assert result.stats["resumed"] is True  # the checkpoint written before the crash was there
    folder = store.version_dir("model", result.version)
    assert (folder / "weights.txt").read_text() == "sum=3"
    manifest = store.manifest(result["model"])
    assert manifest.kind == "model" and [f["path"] for f in manifest.files] == ["weights.txt"]
    assert not list((evolforge_home / "datasets" / "model").glob(".work-*"))
    _, rows = Catalog(evolforge_home).query("SELECT name, path, parents FROM models")
    assert rows == [("model", str(folder), [str(numbers)])]
    with pytest.raises(Exception, match="artifact"):
        store.read(result["model"])


def test_engine_counters_come_from_the_engine_the_stage_opened(store, monkeypatch):
    fake = ScriptedEngine(lambda request, i: "7", identity="fake@1")
    monkeypatch.setattr(engines, "build_engine", lambda config: fake)
    numbers = _numbers(store, 3)
    result = ask_engine.run(numbers=numbers, engine=EngineConfig())
    assert result.stats["engine"]["requests"] == 3 and result.stats["engine"]["misses"] == 3
    other = ask_engine.run(numbers=_numbers(store, 4), engine=EngineConfig())
    assert (other.stats["engine"]["hits"], other.stats["engine"]["misses"]) == (3, 1)
    # Batch sizes do not change outputs: same version.
    assert ask_engine.version(numbers=numbers, engine=EngineConfig(batch_size=3)) == result.version


def test_in_a_flow_stages_are_cached_prefect_tasks(prefect_harness, store):
    from prefect import flow

    numbers = _numbers(store, 30)

    @flow
    def pipeline():
        return double_rows(numbers=numbers)

    first = pipeline()
    assert not first.cached and first.stats["shards"]["new"] == first.stats["shards"]["total"]
    CALLS.clear()
    second = pipeline()
    assert second.cached and second.refs == first.refs and CALLS == []


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        (
            "dtype",
            "stage halve_numbers: output 'halved' (Number): column 'x' has type Float64, "
            "expected Int64",
        ),
        ("missing", "stage halve_numbers: output 'halved' (Number): column 'x' (Int64) is missing"),
        (
            "extra",
            "stage halve_numbers: output 'halved' (Number): unexpected column 'half' (Float64)",
        ),
        (
            "order",
            "stage halve_numbers: output 'halved' (Number): column 'x' is at position 0, "
            "expected 'id' there",
        ),
    ],
)
def test_a_frame_that_does_not_match_its_record_fails_the_stage_and_writes_nothing(
    store, mistake, message
):
    numbers = _numbers(store, 5)
    with pytest.raises(RecordError) as error:
        halve_numbers.run(numbers=numbers, mistake=mistake)
    assert str(error.value) == message
    assert not store.versions("halved") and not store.versions("kept")
    assert halve_numbers.run(numbers=numbers, mistake="none")["halved"]


def test_each_shard_is_checked_before_it_is_written(store):
    numbers = _numbers(store, 10)
    with pytest.raises(
        RecordError, match=r"stage halve_rows: output 'halves' .*'x' has type Float64"
    ):
        halve_rows.run(numbers=numbers)
    assert SHARD_PREFIX + "halves" not in store.names(internal=True)


def test_outputs_name_a_record_or_an_artifact():
    def body(numbers: pl.DataFrame) -> StageOutput:
        return StageOutput()

    with pytest.raises(StageError, match="outputs must map each name"):
        stage(outputs=["numbers"])(body)
    with pytest.raises(StageError, match="output 'numbers' is <class 'dict'>"):
        stage(outputs={"numbers": dict})(body)
    declared = stage(outputs={"numbers": Number, "plot": Artifact(kind="plot")})(body)
    assert declared.outputs == ["numbers", "plot"]
    assert declared.records == {"numbers": Number} and set(declared.artifacts) == {"plot"}
