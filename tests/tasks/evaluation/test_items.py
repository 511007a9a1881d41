"""The `eval_items` stage: versions follow the benchmark files, the limit and the seed."""

from __future__ import annotations

import json

import pytest

from storage.datasets import DatasetStore
from storage.settings import home
from tasks.benchmarks import BenchmarkSource, benchmark_source
from tasks.evaluation.items import load_eval_items, load_items


def test_items_stage_is_versioned_by_files_limit_and_seed(shared_data, tmp_path):
    sources = [benchmark_source("gsm8k"), benchmark_source("sat_math")]
    first = load_eval_items.run(benchmarks=sources, limit=4, seed=0)
    assert first.stats == {"items": 8, "per_benchmark": {"gsm8k": 4, "sat_math": 4}}
    assert load_eval_items.run(benchmarks=sources, limit=4, seed=0).cached
    assert load_eval_items.run(benchmarks=sources, limit=4, seed=1).version != first.version
    assert load_eval_items.run(benchmarks=sources, limit=5, seed=0).version != first.version
    items = DatasetStore(home()).read(first["eval_items"])
    assert items["benchmark"].to_list() == ["gsm8k"] * 4 + ["sat_math"] * 4
    # A local copy whose content changes is a new version.
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}) + "\n")
    mine = [BenchmarkSource(name="mine", format="gsm8k", path=str(path))]
    before = load_eval_items.run(benchmarks=mine, limit=None, seed=0)
    path.write_text(json.dumps({"question": "What is 1 + 2?", "answer": "#### 3"}) + "\n")
    after = load_eval_items.run(benchmarks=mine, limit=None, seed=0)
    assert before.version != after.version


def test_benchmark_names_must_be_unique():
    with pytest.raises(ValueError, match="benchmark names must be unique"):
        load_items([BenchmarkSource(name="gsm8k"), BenchmarkSource(name="gsm8k")])
    with pytest.raises(ValueError, match="no benchmarks"):
        load_items([])
