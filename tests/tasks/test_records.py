"""Records: columns declared as polars dtypes, in order; the one-line check a stage's write runs;
and every stage declaring a record for each dataset output."""

import importlib
import pkgutil

import polars as pl
import pytest

import tasks
from tasks.records import BenchmarkItem, Record, RecordError, Seed
from tasks.stage import Stage


class Item(Record):
    """A test row."""

    id: pl.String
    score: pl.Float64  # a comment does not matter
    tags: pl.List(pl.String)


class ScoredItem(Item):
    """A test row with one more column."""

    round: pl.Int32


def test_schema_is_the_declaration_in_order_base_columns_first():
    assert ScoredItem.columns() == ["id", "score", "tags", "round"]
    assert ScoredItem.schema() == pl.Schema(
        {"id": pl.String(), "score": pl.Float64(), "tags": pl.List(pl.String), "round": pl.Int32()}
    )
    assert Item.columns() == ["id", "score", "tags"]  # the subclass left its base alone
    assert isinstance(ScoredItem.schema(), dict)


def test_empty_and_frame_have_exactly_the_records_columns():
    assert Item.empty().schema == Item.schema() and Item.empty().is_empty()
    frame = Item.frame([{"id": "a", "score": 1, "unknown": "dropped"}, {"id": "b"}])
    assert frame.schema == Item.schema()
    assert frame.rows() == [("a", 1.0, None), ("b", None, None)]
    rows = Item.frame([("a", 0.5, ["x"])], orient="row")
    assert rows.row(0) == ("a", 0.5, ["x"])


def test_check_passes_a_matching_frame_with_nulls_anywhere():
    Item.check(Item.frame([{"id": None, "score": None, "tags": None}]))
    Seed.check(Seed.empty(), stage="ingest", output="seeds")


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (
            pl.DataFrame({"id": ["a"], "score": [1], "tags": [["x"]]}),
            "stage rank: output 'items' (Item): column 'score' has type Int64, expected Float64",
        ),
        (
            pl.DataFrame({"id": ["a"], "score": [1.0], "tags": [[1]]}),
            "stage rank: output 'items' (Item): column 'tags' has type List(Int64), "
            "expected List(String)",
        ),
        (
            pl.DataFrame({"id": ["a"], "tags": [["x"]]}),
            "stage rank: output 'items' (Item): column 'score' (Float64) is missing",
        ),
        (
            Item.empty().with_columns(pl.lit(None).alias("note"), pl.lit(1).alias("n")),
            "stage rank: output 'items' (Item): unexpected column 'note' (Null) and 1 more",
        ),
        (
            Item.empty().select("score", "id", "tags"),
            "stage rank: output 'items' (Item): column 'score' is at position 0, "
            "expected 'id' there",
        ),
    ],
)
def test_check_names_stage_output_column_and_both_types(frame, message):
    with pytest.raises(RecordError) as error:
        Item.check(frame, stage="rank", output="items")
    assert str(error.value) == message
    assert isinstance(error.value, ValueError) and "\n" not in message


def test_check_outside_a_stage_names_the_record():
    with pytest.raises(RecordError, match=r"^Item: column 'id' \(String\) is missing$"):
        Item.check(pl.DataFrame({"score": [1.0]}))


def test_a_column_must_be_a_complete_polars_dtype():
    with pytest.raises(TypeError, match=r"Broken\.id: <class 'str'> is not a polars dtype"):

        class Broken(Record):
            id: str

    with pytest.raises(TypeError, match=r"Bare\.tags: .* needs parameters"):

        class Bare(Record):
            tags: pl.List


def test_string_annotations_are_resolved_in_the_records_module():
    quoted = type(
        "Quoted",
        (Record,),
        {"__annotations__": {"tags": "pl.List(pl.Int64)"}, "__module__": __name__},
    )
    assert quoted.schema() == pl.Schema({"tags": pl.List(pl.Int64)})


def _stages() -> list[Stage]:
    found: dict[int, Stage] = {}
    for info in pkgutil.walk_packages(tasks.__path__, "tasks."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, Stage):
                found[id(value)] = value
    return list(found.values())


def test_every_stage_declares_a_record_for_each_dataset_output():
    stages = _stages()
    names = {s.name for s in stages}
    assert {"ingest", "evolve", "combine", "solve", "compute_rewards", "sft_set"} <= names
    assert {"eval_items", "evaluate", "train_sft", "funnel_plot"} <= names
    records: dict[str, type[Record]] = {}
    for declared in stages:
        for output in declared.outputs:
            record = declared.records.get(output)
            if output in declared.artifacts:
                assert record is None, f"{declared.name}: {output} is a folder and a dataset"
                continue
            assert record is not None, f"stage {declared.name}: output {output} has no record"
            # Records live in records modules, so that readers need not import the writer.
            assert record.__module__.split(".")[-1] == "records", (declared.name, record)
            # A dataset written by several stages (instructions, pool) has one record.
            assert records.setdefault(output, record) is record, (declared.name, output)
    assert records["eval_items"] is BenchmarkItem
