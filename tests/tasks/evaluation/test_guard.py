"""The contamination guard: benchmark items found in a model's training sets (through lineage)
with the decontamination SQL; unknown (null) for models without training sets."""

from __future__ import annotations

import polars as pl
import pytest

from storage.datasets import DatasetStore
from storage.settings import home
from tasks.benchmarks import Benchmark, benchmark_source, read_items
from tasks.evaluation.guard import (
    GuardParams,
    guard_contamination,
    guard_models,
    training_texts,
)
from tasks.evaluation.models import ModelTarget
from tasks.evaluation.records import Contamination

UNRELATED = (
    "Tom keeps chickens that lay 20 eggs per day. He uses 5 eggs every day to bake bread and "
    "gives 3 eggs to his neighbour. How many eggs are left each week?"
)


def target(label: str, sets: list[str]) -> ModelTarget:
    return ModelTarget(
        label=label,
        spec=label,
        model=None,
        identity=label,
        prompt_format="alpaca",
        training_sets=sets,
    )


@pytest.fixture
def setup(shared_data):
    store = DatasetStore(home())
    items = read_items(benchmark_source("gsm8k"), limit=6, seed=3)
    leaked = items.row(1, named=True)
    # The SFT set holds one test question in an Alpaca prompt, and a paraphrase of another.
    paraphrase = items.row(4, named=True)["question"].replace("How", "Tell me: how", 1)
    prompts = [
        "Below is an instruction.\n\n### Instruction:\n" + leaked["question"] + "\n\n### Response:",
        paraphrase,
        UNRELATED,
        None,
    ]
    sft_set = store.write(
        "sft_set",
        pl.DataFrame({"prompt": prompts, "completion": ["a", "b", "c", "d"]}),
        stage="t",
        code_version="t",
        params={},
    )
    store.write("eval_items", items, stage="t", code_version="t", params={})
    return {
        "store": store,
        "items": items,
        "sft_set": str(sft_set.ref),
        "leaked": leaked["id"],
        "paraphrased": items.row(4, named=True)["id"],
    }


def test_items_in_a_models_training_sets_are_flagged(setup):
    models = [target("base", []), target("sft", [setup["sft_set"]])]
    frame, stats = guard_models(setup["items"], models, GuardParams(), setup["store"])
    assert frame.schema == Contamination.schema()
    assert frame.height == 2 * setup["items"].height  # one row per model x item
    base = frame.filter(pl.col("model") == "base")
    assert base["contaminated"].null_count() == base.height  # unknown, not clean
    sft = frame.filter(pl.col("model") == "sft")
    flagged = sft.filter(pl.col("contaminated"))
    assert sorted(flagged["item_id"]) == sorted([setup["leaked"], setup["paraphrased"]])
    assert set(flagged["training_set"]) == {setup["sft_set"]}
    assert flagged["training_id"].to_list() != [None, None]
    assert all(s >= 0.3 for s in flagged["similarity"])
    assert sft.filter(~pl.col("contaminated"))["training_set"].null_count() == 4
    assert stats["flagged_items"] == {"base": None, "sft": 2}
    assert stats["training_sets"] == [setup["sft_set"]]


def test_the_guard_can_be_switched_off(setup):
    frame, stats = guard_models(
        setup["items"],
        [target("sft", [setup["sft_set"]])],
        GuardParams(enabled=False),
        setup["store"],
    )
    assert frame["contaminated"].null_count() == frame.height
    assert stats["flagged_items"] == {"sft": None}


def test_the_stage_versions_on_items_models_and_settings(setup):
    items = f"eval_items@{setup['store'].latest('eval_items').version}"
    models = [target("sft", [setup["sft_set"]])]
    first = guard_contamination.run(eval_items=items, models=models, params=GuardParams())
    again = guard_contamination.run(eval_items=items, models=models, params=GuardParams())
    assert not first.cached and again.cached
    assert first.stats["flagged_items"] == {"sft": 2}
    stricter = guard_contamination.run(
        eval_items=items, models=models, params=GuardParams(overlap_threshold=0.9)
    )
    assert stricter.version != first.version
    assert stricter.stats["flagged_items"]["sft"] <= 2


def test_training_texts_take_the_first_text_column():
    frame = pl.DataFrame({"id": [1, 2, 3], "prompt": ["a b", None, "  "], "text": ["x", "y", "z"]})
    assert training_texts(frame, "s@1").rows() == [("1", "a b")]
    assert training_texts(pl.DataFrame({"question": ["q"]}), "s@1").rows() == [("0", "q")]
    with pytest.raises(ValueError, match=r"training set s@1 has none of the text columns"):
        training_texts(pl.DataFrame({"chosen": ["a"]}), "s@1")


def test_the_guard_uses_the_decontamination_rule_with_its_defaults():
    """One n-gram rule: the guard's settings are decontamination's, fields and defaults."""
    from tasks.evolution.dedup import DecontamParams, NgramRule

    assert issubclass(GuardParams, NgramRule) and issubclass(DecontamParams, NgramRule)
    assert GuardParams().ngram_rule() == DecontamParams().ngram_rule() == NgramRule().model_dump()
    rule = {"ngram": 4, "overlap_threshold": 0.5, "min_shared": 3, "max_ngram_df": 7}
    decontam = GuardParams(**rule).decontam([Benchmark(name="b", path="b.jsonl", text_field="q")])
    assert decontam.ngram_rule() == rule and [b.name for b in decontam.benchmarks] == ["b"]
