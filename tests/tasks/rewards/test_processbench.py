"""The ProcessBench-like items from GSM8K test and ProcessBench's figures."""

from __future__ import annotations

import json
import math
import random

import pytest

from tasks.rewards.processbench import (
    corrupt_step,
    perturb_number,
    processbench_items,
    processbench_scores,
    reference_steps,
)


def test_reference_steps_drop_calculator_annotations_and_the_answer_line():
    steps, answer = reference_steps(
        "He sells 16 - 3 = <<16-3=13>>13 eggs.\nHe makes 13 * 2 = $<<13*2=26>>26.\n#### 26"
    )
    assert steps == ["He sells 16 - 3 = 13 eggs.", "He makes 13 * 2 = $26."]
    assert answer == "26"
    with pytest.raises(ValueError, match="without a '#### answer' line"):
        reference_steps("no answer here")


def test_perturbed_numbers_differ_and_keep_their_format():
    rng = random.Random(0)
    for text in ["7", "0", "130,000", "2.5", "99", "1,234.50"]:
        for _ in range(20):
            new = perturb_number(text, rng)
            assert new != text
            assert ("," in new) == ("," in text) or float(new.replace(",", "")) < 1000
            assert len(new.split(".")[1] if "." in new else "") == len(
                text.split(".")[1] if "." in text else ""
            )
            assert float(new.replace(",", "")) >= 0
    assert corrupt_step("So 3 + 4 = 7 apples", random.Random(1)).endswith(" apples")


def test_items_half_corrupted_at_the_label(shared_data):
    items = processbench_items(limit=40, seed=3)
    assert items.columns == ["id", "problem", "steps", "answer", "label"]
    assert items.height == 40 and items["id"].n_unique() == 40
    assert items["label"].is_not_null().sum() == 20
    originals = {}
    for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines():
        record = json.loads(line)
        originals[record["question"]] = reference_steps(record["answer"])
    for row in items.iter_rows(named=True):
        steps, answer = originals[row["problem"]]
        assert row["answer"] == answer and len(row["steps"]) == len(steps)
        diff = [k for k, (a, b) in enumerate(zip(row["steps"], steps, strict=True)) if a != b]
        assert diff == ([] if row["label"] is None else [row["label"]])
    assert processbench_items(limit=40, seed=3).equals(items)
    assert not processbench_items(limit=40, seed=4).equals(items)


def test_scores_accuracy_on_both_halves_and_f1():
    labels = [2, 0, None, None]
    s = processbench_scores(labels, [2, None, None, 1])
    assert (s["acc_erroneous"], s["acc_correct"]) == (0.5, 0.5) and s["f1"] == 0.5
    s = processbench_scores(labels, [math.nan, 0, None, None])
    assert s["unjudged"] == 1 and s["acc_erroneous"] == 0.5 and s["acc_correct"] == 1.0
    assert s["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert processbench_scores([None], [None])["f1"] is None
    assert processbench_scores([1], [0])["f1"] is None
