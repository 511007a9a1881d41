"""Scores: the Wilson interval, accuracy per model x benchmark x mode, the hybrid's fallback
rate, unjudged items, the contamination guard's overlap next to the score, and the chart."""

from __future__ import annotations

import polars as pl
import pytest

from tasks.evaluation.records import Contamination, EvalResult
from tasks.evaluation.scores import PLOT_FILE, plot_scores, score_results, wilson_interval


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    [
        (0, 10, 0.0, 0.27753),
        (5, 10, 0.23659, 0.76341),
        (10, 10, 0.72247, 1.0),
        (81, 263, 0.25529, 0.36621),
        (1, 1, 0.20655, 1.0),
    ],
)
def test_wilson_interval(correct, n, low, high):
    got = wilson_interval(correct, n)
    assert got == pytest.approx((low, high), abs=1e-5)


def test_wilson_interval_matches_scipy_and_stays_in_bounds():
    binomtest = pytest.importorskip("scipy.stats").binomtest  # scipy comes with the dev extras

    for n in (1, 2, 7, 50, 200):
        for correct in range(0, n + 1, max(1, n // 7)):
            ours = wilson_interval(correct, n)
            theirs = binomtest(correct, n).proportion_ci(method="wilson")
            assert ours == pytest.approx((theirs.low, theirs.high), abs=1e-9)
            assert 0.0 <= ours[0] <= correct / n <= ours[1] <= 1.0


def test_wilson_interval_edge_cases():
    assert wilson_interval(0, 0) == (None, None)
    with pytest.raises(ValueError, match="0 <= correct <= n"):
        wilson_interval(3, 2)


def result(model, bench, item, mode, correct, answer="1", **extra) -> dict:
    row = dict.fromkeys(EvalResult.columns())
    row.update(
        model=model,
        model_ref=None,
        benchmark=bench,
        item_id=item,
        mode=mode,
        prompt_format="chat",
        correct=correct,
        extracted_answer=answer,
        finish_reason="stop",
        completion_tokens=10,
        fallback=False if mode == "hybrid" else None,
    )
    row.update(extra)
    return row


def frame(rows, record) -> pl.DataFrame:
    return record.frame(rows)


def test_scores_count_judged_items_fallbacks_and_overlap():
    results = frame(
        [
            result("base", "gsm8k", "1", "cot", True),
            result("base", "gsm8k", "2", "cot", False, answer=None, finish_reason="length"),
            result("base", "gsm8k", "3", "cot", None, answer=None, error="timeout"),
            result("base", "gsm8k", "1", "hybrid", True, fallback=True),
            result("base", "gsm8k", "2", "hybrid", True),
            result("base", "gsm8k", "3", "hybrid", False),
            result("sft", "gsm8k", "1", "cot", True),
            result("sft", "gsm8k", "2", "cot", True),
            result("sft", "gsm8k", "3", "cot", False),
        ],
        EvalResult,
    )
    guard = frame(
        [{"model": "base", "benchmark": "gsm8k", "item_id": i, "contaminated": None} for i in "123"]
        + [
            {"model": "sft", "benchmark": "gsm8k", "item_id": i, "contaminated": i == "2"}
            for i in "123"
        ],
        Contamination,
    )
    scores = score_results(results, guard)
    rows = {(r["model"], r["mode"]): r for r in scores.to_dicts()}
    base_cot = rows[("base", "cot")]
    assert (base_cot["n"], base_cot["judged"], base_cot["correct"]) == (3, 2, 1)
    assert base_cot["accuracy"] == 0.5  # the unjudged item is not counted as wrong
    assert (base_cot["ci_low"], base_cot["ci_high"]) == pytest.approx(wilson_interval(1, 2))
    assert (base_cot["no_answer"], base_cot["truncated"], base_cot["errors"]) == (1, 1, 1)
    assert base_cot["fallback_rate"] is None
    assert rows[("base", "hybrid")]["fallback_rate"] == pytest.approx(1 / 3)
    # Overlap: unknown for the base (no lineage), a count for the checkpoint.
    assert base_cot["contaminated"] is None and base_cot["accuracy_clean"] is None
    sft = rows[("sft", "cot")]
    assert sft["contaminated"] == 1
    assert sft["accuracy"] == pytest.approx(2 / 3)
    assert sft["accuracy_clean"] == 0.5  # items 1 (right) and 3 (wrong)
    assert scores["model"].to_list() == ["base", "base", "sft"]


def test_scores_without_a_guard_have_unknown_overlap():
    results = frame([result("m", "b", "1", "cot", True)], EvalResult)
    scores = score_results(results, None)
    assert scores.row(0, named=True)["contaminated"] is None
    assert scores.row(0, named=True)["accuracy"] == 1.0


def test_nothing_judged_has_no_accuracy_and_the_chart_still_draws(tmp_path):
    results = frame(
        [
            result("m", "b", "1", "cot", None, error="x"),
            result("n", "b", "1", "cot", True),
            result("n", "c", "1", "hybrid", False),
        ],
        EvalResult,
    )
    scores = score_results(results, None)
    first = scores.row(0, named=True)
    assert first["accuracy"] is None and first["ci_low"] is None and first["judged"] == 0
    path = plot_scores(scores, tmp_path / PLOT_FILE)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
