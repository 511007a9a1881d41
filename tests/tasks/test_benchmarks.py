"""Benchmark registry: every shared set read into normalised items, the same loaders over local
files and the hub, seeded subsets, and clear errors for bad records."""

from __future__ import annotations

import json

import polars as pl
import pytest

from tasks.benchmarks import (
    REGISTRY,
    BenchmarkError,
    BenchmarkSource,
    benchmark_source,
    format_number,
    parse_options,
    read_items,
    seeded_subset,
    strip_unit_note,
)
from tasks.records import BenchmarkItem

SIZES = {
    "gsm8k": 1319,
    "math500": 500,
    "svamp": 1000,
    "asdiv": 2215,
    "mawps": 2065,
    "sat_math": 32,
    "mmlu_stem": 3018,
}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_shared_set_reads_into_normalised_items(shared_data, name):
    items = read_items(benchmark_source(name))
    assert items.schema == BenchmarkItem.schema()
    assert items.height == SIZES[name]
    assert items["id"].n_unique() == items.height
    assert items["question"].null_count() == 0 and items["answer"].null_count() == 0
    assert set(items["benchmark"]) == {name}
    if REGISTRY[name].multiple_choice:
        assert items["choices"].null_count() == 0
        letters = items.select(
            pl.col("answer"), pl.col("choices").list.len().alias("n")
        ).iter_rows()
        assert all("ABCDEFGHIJ".index(a) < n for a, n in letters)
    else:
        assert items["choices"].null_count() == items.height


def test_reference_answers_are_normalised_once(shared_data):
    first = {name: read_items(benchmark_source(name)).row(0, named=True) for name in REGISTRY}
    assert first["gsm8k"]["answer"] == "18" and first["gsm8k"]["id"] == "1"
    assert first["gsm8k"]["solution"].endswith("#### 18")
    assert first["math500"]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first["math500"]["level"] == 2 and first["math500"]["subject"] == "Precalculus"
    assert first["svamp"]["answer"] == "145"  # 145.0
    assert first["svamp"]["question"].endswith("groups. How big is each group of bananas?")
    assert first["asdiv"]["answer"] == "9"  # "9 (apples)"
    assert first["mawps"]["answer"] == "43"  # 43.0
    assert first["mmlu_stem"]["answer"] == "C"  # index 2
    assert first["sat_math"]["choices"] == ["$f(-6)=0$", "$f(6)=-6$", "$f(-6)=6$", "$f(0)=-6$"]


def test_number_and_unit_normalisation():
    assert format_number(145.0) == "145"
    assert format_number(2.5) == "2.5"
    assert format_number("1,024") == "1024"
    with pytest.raises(ValueError, match="not a number"):
        format_number("many")
    assert strip_unit_note("9 (apples)") == "9"
    assert strip_unit_note("14  (seats)") == "14"
    assert strip_unit_note("-(1/3)") == "-(1/3)"  # a numeric parenthesis is the answer
    assert strip_unit_note("3:30 p.m.") == "3:30 p.m."


def test_option_strings_are_split_into_choices():
    assert parse_options("A) -10 B) 0 C) 10 D) -10 and 10") == ["-10", "0", "10", "-10 and 10"]
    assert parse_options("A. $x$ B. $y$") == ["$x$", "$y$"]
    with pytest.raises(ValueError, match="not lettered"):
        parse_options("B) 1 A) 2")


def test_seeded_subset_is_nested_ordered_and_seeded(shared_data):
    items = read_items(benchmark_source("gsm8k"))
    five = read_items(benchmark_source("gsm8k"), limit=5, seed=0)
    fifty = read_items(benchmark_source("gsm8k"), limit=50, seed=0)
    assert five.height == 5 and fifty.height == 50
    assert set(five["id"]) <= set(fifty["id"])  # a larger run reuses a smaller one's answers
    order = {i: k for k, i in enumerate(items["id"])}
    assert [order[i] for i in fifty["id"]] == sorted(order[i] for i in fifty["id"])
    assert five["id"].to_list() == read_items(benchmark_source("gsm8k"), 5, 0)["id"].to_list()
    assert five["id"].to_list() != read_items(benchmark_source("gsm8k"), 5, 1)["id"].to_list()
    assert seeded_subset(five, 10, 0).height == 5  # a limit above the size keeps everything


def test_local_files_in_every_format_with_a_mapping(tmp_path):
    records = [
        {"q": "What is 2 + 3?", "sol": "2 + 3 = 5\n#### 5"},
        {"q": "What is 1,000 + 24?", "sol": "#### 1,024"},
    ]
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    parquet = tmp_path / "set.parquet"
    pl.DataFrame(records).write_parquet(parquet)
    csv_path = tmp_path / "set.csv"
    pl.DataFrame(records).write_csv(csv_path)
    json_path = tmp_path / "set.json"
    json_path.write_text(json.dumps(records))
    for path in (jsonl, parquet, csv_path, json_path):
        source = BenchmarkSource(
            name="mine", format="gsm8k", path=str(path), mapping={"question": "q", "answer": "sol"}
        )
        items = read_items(source)
        assert items.select("benchmark", "id", "answer").rows() == [
            ("mine", "1", "5"),
            ("mine", "2", "1024"),
        ], path.suffix


def test_bad_records_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"question": "ok?", "answer": "#### 1"})
        + "\n"
        + json.dumps({"question": "no final answer", "answer": "it is 2"})
        + "\n"
    )
    source = BenchmarkSource(name="gsm8k", path=str(path))
    with pytest.raises(BenchmarkError, match=r"bad\.jsonl line 2: answer has no '#### "):
        read_items(source)
    path.write_text(json.dumps({"answer": "#### 1"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"line 1: field 'question' missing or empty"):
        read_items(source)
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 3}) + "\n")
    with pytest.raises(BenchmarkError, match=r"line 1: answer 3 is outside the 2 options"):
        read_items(BenchmarkSource(name="mine", format="mmlu_stem", path=str(mc)))
    dup = tmp_path / "dup.jsonl"
    dup.write_text(
        "\n".join(json.dumps({"problem": "p", "answer": "1", "unique_id": "x"}) for _ in "ab")
    )
    with pytest.raises(BenchmarkError, match=r"line 2: id 'x' already used at line 1"):
        read_items(BenchmarkSource(name="math500", path=str(dup)))
    with pytest.raises(BenchmarkError, match="file not found"):
        read_items(BenchmarkSource(name="gsm8k", path=str(tmp_path / "nope.jsonl")))


def test_unknown_names_and_formats_are_one_line_errors():
    with pytest.raises(BenchmarkError, match=r"unknown benchmark 'gsm9k' \(known: gsm8k"):
        benchmark_source("gsm9k")
    with pytest.raises(ValueError, match="unknown format 'mine'"):
        BenchmarkSource(name="mine")
    with pytest.raises(ValueError, match="a path or a hub data set, not both"):
        BenchmarkSource(name="gsm8k", path="x.jsonl", hub="openai/gsm8k")


def test_hub_copy_offline_fails_with_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BenchmarkError, match=r"^hf:openai/gsm8k: could not load split 'test'"):
        read_items(BenchmarkSource.from_hub("gsm8k"))


def test_hub_copy_reads_through_the_same_loader(monkeypatch):
    import datasets

    rows = [
        {
            "problem": "What is $1+1$?",
            "solution": "$\\boxed{2}$",
            "answer": "2",
            "subject": "Algebra",
            "level": 1,
            "unique_id": "test/algebra/1.json",
        }
    ]
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    items = read_items(BenchmarkSource.from_hub("math500"))
    assert calls == [("HuggingFaceH4/MATH-500", None, "test")]
    assert items.select("id", "answer", "level").rows() == [("test/algebra/1.json", "2", 1)]
    source = BenchmarkSource.from_hub("math500")
    assert source.fingerprint()["hub"] == "HuggingFaceH4/MATH-500"  # no file to hash


def test_fingerprint_follows_the_file_content(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    source = BenchmarkSource(name="gsm8k", path=str(path))
    before = source.fingerprint()
    path.write_text(json.dumps({"question": "q", "answer": "#### 2"}) + "\n")
    assert source.fingerprint() != before


def test_a_benchmark_is_identified_by_its_content_not_its_place(tmp_path, monkeypatch):
    """The same file at two places (another checkout, a moved shared-data folder) is the same
    benchmark, for decontamination and for evaluation; changed content is another."""
    from tasks.benchmarks import Benchmark
    from tasks.evolution.dedup import DecontamParams

    rows = json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}) + "\n"
    for place in ("a", "b"):
        (tmp_path / place / "gsm8k").mkdir(parents=True)
        (tmp_path / place / "gsm8k" / "test.jsonl").write_text(rows)
    first, second = (tmp_path / p / "gsm8k" / "test.jsonl" for p in ("a", "b"))

    def decontam(path):
        return DecontamParams(benchmarks=[Benchmark(name="g", path=path, text_field="question")])

    assert decontam(first).fingerprint() == decontam(second).fingerprint()
    assert str(tmp_path) not in json.dumps(decontam(first).fingerprint())
    by_path = [BenchmarkSource(name="gsm8k", path=str(p)).fingerprint() for p in (first, second)]
    assert by_path[0] == by_path[1] and str(tmp_path) not in json.dumps(by_path[0])
    monkeypatch.setenv("EVOLFORGE_SHARED_DATA", str(tmp_path / "a"))
    shared = benchmark_source("gsm8k").fingerprint()
    monkeypatch.setenv("EVOLFORGE_SHARED_DATA", str(tmp_path / "b"))
    assert benchmark_source("gsm8k").fingerprint() == shared

    second.write_text(rows.replace("1 + 1", "1 + 3"))
    assert decontam(first).fingerprint() != decontam(second).fingerprint()
    assert benchmark_source("gsm8k").fingerprint() != shared
    assert BenchmarkSource(name="gsm8k", path=str(second)).fingerprint() != by_path[0]
