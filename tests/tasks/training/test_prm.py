"""The PRM: labels on the last token of each step (checked by decoding), metrics; the stage on a
tiny model; overfitting finds the planted bad step (SmolLM2, slow)."""

from __future__ import annotations

import polars as pl
import pytest

from infra.scoring import IGNORE, PrmScorer
from storage.datasets import DatasetStore
from storage.settings import home
from tasks.training import formats
from tasks.training.common import BaseModelSpec
from tasks.training.prm import PrmCollator, PrmTrainParams, step_accuracy, train_prm
from tasks.training.sets import PrmStepsParams, SplitParams, build_prm_steps
from tests.tasks.training.synthetic import write_all

PROMPT = formats.alpaca_prompt("Tom buys 4 pens at 3 dollars each. How much does he pay?")
STEPS = ["Step 1: 4 * 3 = 12.", "Step 2: He pays 12 dollars.", "The answer is: 12"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tasks.training.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def _check_placement(tokenizer, steps, labels):
    example = {"prompt": PROMPT, "completions": steps, "labels": labels}
    encoded = PrmCollator(tokenizer).encode(example)
    ids, token_labels = encoded["input_ids"], encoded["labels"]
    marked = [i for i, label in enumerate(token_labels) if label != IGNORE]
    expected = [(k, label) for k, label in enumerate(labels) if label is not None]
    assert len(marked) == len(expected)
    for position, (k, label) in zip(marked, expected, strict=True):
        # The text up to and including the labelled token ends with the step (its last token).
        upto = tokenizer.decode(ids[: position + 1])
        assert upto.rstrip().endswith(steps[k].strip()), (upto, steps[k])
        # ... and the token before it does not yet hold the whole step.
        assert not tokenizer.decode(ids[:position]).rstrip().endswith(steps[k].strip())
        assert token_labels[position] == int(label)
    return encoded


def test_collator_puts_each_label_on_the_steps_last_token(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    encoded = _check_placement(tokenizer, STEPS, [True, False, None])
    assert tokenizer.decode(encoded["input_ids"]).startswith("Below is an instruction")
    # Exact slices of a solution (segment_steps keeps the whitespace) land the same way.
    _check_placement(tokenizer, ["\nStep 1: 4 * 3 = 12.", "\nThe answer is: 12\n"], [True, True])


def test_collator_pads_and_ignores_everything_else(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    batch = PrmCollator(tokenizer)(
        [
            {"prompt": PROMPT, "completions": STEPS, "labels": [True, True, False]},
            {"prompt": "Q", "completions": ["a."], "labels": [None]},
        ]
    )
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert sorted(batch["labels"][0][batch["labels"][0] != IGNORE].tolist()) == [0, 1, 1]
    assert (batch["labels"][1] == IGNORE).all()  # an unjudged step teaches nothing
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()


class _FixedPrm(PrmScorer):
    """Probabilities by step text: a step containing 'wrong' is judged wrong."""

    def __init__(self):
        """No model to load: `step_probabilities` below stands in for it."""

    def step_probabilities(self, prompts, steps):
        return [
            [0.1 if "wrong" in s else (None if s == "cut" else 0.9) for s in ss] for ss in steps
        ]


def test_step_accuracy():
    scorer = _FixedPrm()
    rows = pl.DataFrame(
        {
            "prompt": ["p", "p"],
            "completions": [["ok", "wrong"], ["ok", "ok"]],
            "labels": [[True, False], [True, None]],
        }
    )
    metrics = step_accuracy(scorer, rows)
    assert metrics == {"step_accuracy": 1.0, "step_accuracy_wrong": 1.0, "eval_steps": 3}


def _prm_steps(store, test_fraction=0.3):
    refs = write_all(store)
    return build_prm_steps.run(
        step_labels=refs["step_labels"],
        instructions=refs["instructions"],
        solutions=refs["solutions"],
        split=SplitParams(test_fraction=test_fraction),
        params=PrmStepsParams(),
    )["prm_steps"]


def test_train_prm_stage_writes_a_token_classifier(evolforge_home, tiny):
    from transformers import AutoModelForTokenClassification

    store = DatasetStore(home())
    steps = _prm_steps(store)
    params = PrmTrainParams(max_steps=2, max_length=128, processbench_limit=0, eval_rows=4)
    result = train_prm.run(prm_steps=steps, base_model=BaseModelSpec(name=str(tiny)), params=params)
    folder = store.version_dir("prm_model", result.version)
    model = AutoModelForTokenClassification.from_pretrained(folder)
    assert model.config.num_labels == 2 and model.config.id2label == {0: "wrong", 1: "correct"}
    manifest = store.manifest(result["prm_model"])
    assert manifest.kind == "model" and manifest.parents == [str(steps)]
    stats = result.stats
    assert stats["steps"] == 2 and stats["eval_steps"] > 0 and 0 <= stats["step_accuracy"] <= 1
    assert stats["first_error_f1"] is None and "skipped" in stats["processbench_note"]
    assert set(stats["versions"]) == {"trl", "transformers", "torch"}
    assert (folder / "training_log.json").is_file()


@pytest.mark.slow
def test_prm_overfits_and_finds_the_planted_bad_step(evolforge_home, models_dir):
    """SmolLM2-135M, a few labelled solutions: the loss falls and the first wrong step found."""
    from tasks.training.common import read_training_log

    store = DatasetStore(home())
    steps = _prm_steps(store, test_fraction=0.0)
    frame = store.read(steps)
    # Two solutions of one problem: all correct vs wrong from the planted first step.
    subset = frame.filter(pl.col("id").is_in(["s0.r1.a:0", "s0.r1.a:1"]))
    small = store.write("prm_steps", subset, stage="t", code_version="t", params={"n": 2}).ref
    params = PrmTrainParams(
        max_steps=12, batch_size=2, learning_rate=1e-4, max_length=128, processbench_limit=0
    )
    result = train_prm.run(prm_steps=small, base_model=BaseModelSpec(), params=params)
    folder = store.version_dir("prm_model", result.version)
    losses = [h["loss"] for h in read_training_log(folder) if "loss" in h]
    assert losses[-1] < losses[0] * 0.5
    scorer = PrmScorer.load(folder)
    rows = subset.sort("id")
    predicted = scorer.first_errors(rows["prompt"].to_list(), rows["completions"].to_list())
    assert predicted == [None, 0]  # the good solution has no error; the planted step 0 is found
