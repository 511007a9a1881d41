"""A ProcessBench-like check built from GSM8K *test* reference solutions.

`processbench_items(limit, seed)` draws `limit` GSM8K test problems (seeded) and turns each
reference solution into steps, one line per step, GSM8K's calculator annotations (`<<4*3=12>>`)
removed and the `#### X` line dropped (X is `answer`). For a seeded half, one step that states a
computed result (`... = 12 ...`) gets that result changed, and every later line is left as it
was, so the solution goes wrong at that step and the label is its index; the other half is
untouched and the label is null ("no error"). ProcessBench's figures follow: accuracy of the
predicted first-error step on the erroneous half, accuracy of "no error" on the correct half,
and their harmonic mean (`processbench_scores`).

The changed result is the last `= number` of the line, moved by a non-zero amount scaled to its
size (1-9 for numbers under 100, tens for hundreds, and so on), kept non-negative, with the
original's thousands separators and decimals.

GSM8K test is what generated data is decontaminated against; these items only evaluate the
labellers and are never training data.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from storage.settings import shared_data_dir
from tasks.rewards.records import ProcessBenchItem

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_RESULT = re.compile(r"=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


def gsm8k_test_path() -> Path:
    return shared_data_dir() / "gsm8k" / "test.jsonl"


def reference_steps(solution: str) -> tuple[list[str], str]:
    """(steps, final answer) of a GSM8K reference solution: one line per step."""
    lines = [_CALCULATOR.sub("", line).strip() for line in solution.splitlines()]
    answer = None
    steps = []
    for line in lines:
        if line.startswith("####"):
            answer = line[4:].strip().replace(",", "")
        elif line:
            steps.append(line)
    if answer is None:
        raise ValueError(f"GSM8K solution without a '#### answer' line: {solution[:80]!r}")
    return steps, answer


def result_span(step: str) -> tuple[int, int] | None:
    """(start, end) of the last computed result (`= number`) in a step, or None."""
    last = None
    for last in _RESULT.finditer(step):  # noqa: B007 - only the last match is wanted
        continue
    return last.span(1) if last else None


def perturb_number(text: str, rng: random.Random) -> str:
    """A different number in the same format (separators, decimals), non-negative if it was."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    value = float(text.replace(",", ""))
    scale = 10 ** max(0, int(math.log10(abs(value))) - 1) if abs(value) >= 100 else 1
    delta = rng.choice([-1, 1]) * rng.randint(1, 9) * scale
    if value >= 0 and value + delta < 0:
        delta = -delta
    new = value + delta
    out = f"{new:,.{decimals}f}" if "," in text else f"{new:.{decimals}f}"
    return out


def corrupt_step(step: str, rng: random.Random) -> str:
    span = result_span(step)
    if span is None:
        raise ValueError(f"step has no computed result to change: {step!r}")
    start, end = span
    return step[:start] + perturb_number(step[start:end], rng) + step[end:]


def processbench_items(limit: int | None = None, seed: int = 0) -> pl.DataFrame:
    """`limit` GSM8K test items (all when None), a seeded half with one corrupted step."""
    path = gsm8k_test_path()
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K test set not found at {path} (set EVOLFORGE_SHARED_DATA)")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        order = order[:limit]
    parsed = {i: reference_steps(records[i]["answer"]) for i in order}
    modifiable = [i for i in order if any(result_span(s) for s in parsed[i][0])]
    erroneous = set(modifiable[: len(order) // 2])
    rows = []
    for i in order:
        steps, answer = parsed[i]
        label = None
        if i in erroneous:
            candidates = [k for k, s in enumerate(steps) if result_span(s)]
            label = rng.choice(candidates)
            steps = [*steps[:label], corrupt_step(steps[label], rng), *steps[label + 1 :]]
        rows.append(
            {
                "id": f"gsm8k-test-{i}",
                "problem": records[i]["question"],
                "steps": steps,
                "answer": answer,
                "label": label,
            }
        )
    return ProcessBenchItem.frame(rows)


def processbench_scores(
    labels: Sequence[int | None], predictions: Sequence[int | float | None]
) -> dict[str, float | int | None]:
    """ProcessBench's figures: accuracy on erroneous items (predicted first error == label),
    on correct items (predicted "no error"), and their harmonic mean F1.

    A prediction is a step index, None for "no error", or NaN for "could not judge" (counted
    as wrong, and counted separately in `unjudged`).
    """
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels vs {len(predictions)} predictions")

    def unjudged(p: Any) -> bool:
        return isinstance(p, float) and math.isnan(p)

    err = [(lab, p) for lab, p in zip(labels, predictions, strict=True) if lab is not None]
    ok = [(lab, p) for lab, p in zip(labels, predictions, strict=True) if lab is None]
    acc_err = sum(1 for lab, p in err if not unjudged(p) and p == lab) / len(err) if err else None
    acc_ok = sum(1 for _, p in ok if p is None) / len(ok) if ok else None
    f1 = None
    if acc_err is not None and acc_ok is not None:
        f1 = 0.0 if acc_err + acc_ok == 0 else 2 * acc_err * acc_ok / (acc_err + acc_ok)
    return {
        "erroneous": len(err),
        "correct": len(ok),
        "unjudged": sum(1 for p in predictions if unjudged(p)),
        "acc_erroneous": acc_err,
        "acc_correct": acc_ok,
        "f1": f1,
    }
