"""Benchmark: answer extraction + equivalence on 10,000 labelled (prediction, reference) pairs.

References are the final answers of MATH train/test (last `\\boxed{}` of each solution).
Predictions are built from them with a known label: equivalent rewrites (`\\frac{a}{b}` <-> `a/b`,
decimal forms, `\\dfrac`, added `\\text{}` units, `x = ` prefixes, `$...$`, thousands separators,
wrapped in `The answer is: ...` or `\\boxed{}` sentences) and wrong answers (off by one, another
problem's answer, a changed numerator). Each prediction goes through `extract_answer` and then
`check_equivalence`, exactly as solutions are checked in the factory.

Run: `.venv/bin/python bench/answer_check.py [--pairs 10000] [--workers 2] [--seed 0]`
Prints pairs/s, accuracy against the labels, how many pairs needed math-verify, and the errors
per rewrite kind.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

from storage.settings import shared_data_dir
from tasks.solutions.answers import (
    check_equivalence,
    equivalence_pool,
    extract_answer,
    normalize_answer,
    quick_equivalence,
)

FRAC = re.compile(r"^(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}$")
INT = re.compile(r"^-?\d+$")
UNITS = ["cm", "inches", "dollars", "square units", "degrees", "meters"]


def load_answers(data: Path) -> list[str]:
    answers = []
    for name in ("train", "test"):
        with open(data / "math" / f"{name}.jsonl", encoding="utf-8") as f:
            for line in f:
                answer = extract_answer(json.loads(line)["solution"])
                if answer:
                    answers.append(answer)
    return answers


def equivalent_rewrite(answer: str, rng: random.Random) -> tuple[str, str]:
    """(kind, prediction text) equivalent to `answer`."""
    m = FRAC.match(answer)
    options: list[tuple[str, str]] = [
        ("answer_is", f"Step 1: ...\nThe answer is: {answer}"),
        ("boxed_sentence", f"So the final value is $\\boxed{{{answer}}}$."),
        ("dollar_math", f"The answer is ${answer}$."),
    ]
    if m:
        sign, a, b = m.groups()
        options.append(("frac_to_slash", f"The answer is: {sign}{a}/{b}"))
        options.append(("dfrac", f"The answer is: {sign}\\dfrac{{{a}}}{{{b}}}"))
        value = Fraction(int(a), int(b)) * (-1 if sign else 1)
        if 10**6 % value.denominator == 0:
            options.append(("frac_to_decimal", f"The answer is: {float(value)}"))
    if INT.match(answer):
        n = int(answer)
        options.append(("int_to_decimal", f"The answer is: {n}.0"))
        options.append(("units", f"The answer is: {n}\\text{{ {rng.choice(UNITS)}}}"))
        options.append(("x_equals", f"The answer is: x = {n}"))
        if abs(n) >= 1000:
            options.append(("thousands", f"The answer is: {n:,}"))
    slash = re.match(r"^(-?\d+)/(\d+)$", answer)
    if slash:
        options.append(("slash_to_frac", f"The answer is: \\frac{{{slash[1]}}}{{{slash[2]}}}"))
    return rng.choice(options)


def wrong_answer(answer: str, pool: list[str], rng: random.Random) -> tuple[str, str]:
    """(kind, prediction text) not equivalent to `answer`."""
    if INT.match(answer):
        return "off_by_one", f"The answer is: {int(answer) + rng.choice([-1, 1])}"
    m = FRAC.match(answer)
    if m:
        sign, a, b = m.groups()
        a2 = int(a) + 1 if int(a) + 1 != int(b) else int(a) + 2
        return "numerator", f"The answer is: {sign}\\frac{{{a2}}}{{{b}}}"
    key = normalize_answer(answer)
    while True:
        other = rng.choice(pool)
        other_key = normalize_answer(other)
        # Different strings that are still equal numbers would mislabel the pair.
        if other_key != key and quick_equivalence(other, answer) is not True:
            return "other_problem", f"The answer is: {other}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    answers = load_answers(shared_data_dir())
    refs, preds, labels, kinds = [], [], [], []
    for _ in range(args.pairs):
        ref = rng.choice(answers)
        if rng.random() < 0.5:
            kind, pred = equivalent_rewrite(ref, rng)
            label = True
        else:
            kind, pred = wrong_answer(ref, answers, rng)
            label = False
        refs.append(ref)
        preds.append(pred)
        labels.append(label)
        kinds.append(kind)

    with equivalence_pool(workers=args.workers) as pool:
        pool.judge([("1", "2")])  # start the workers outside the timed region
        start = time.perf_counter()
        extracted = [extract_answer(p) for p in preds]
        verdicts = check_equivalence(extracted, refs, pool)
        elapsed = time.perf_counter() - start
        killed = pool.killed

    hard = sum(
        1
        for e, r in zip(extracted, refs, strict=True)
        if e is not None and quick_equivalence(e, r) is None
    )
    correct = sum(v is lab for v, lab in zip(verdicts, labels, strict=True))
    unjudged = sum(v is None for v in verdicts)
    errors = Counter(k for k, v, lab in zip(kinds, verdicts, labels, strict=True) if v is not lab)
    print(
        f"pairs:            {args.pairs} ({sum(labels)} equivalent, {args.pairs - sum(labels)} not)"
    )
    print(f"elapsed:          {elapsed:.2f} s  ({args.pairs / elapsed:,.0f} pairs/s)")
    print(f"accuracy:         {correct / args.pairs:.4f}  ({correct}/{args.pairs})")
    print(f"unjudged (None):  {unjudged}")
    print(f"needed math-verify: {hard} ({hard / args.pairs:.1%}); workers killed: {killed}")
    print(f"errors by kind:   {dict(errors) or 'none'}")
    print(f"kinds:            {dict(Counter(kinds))}")


if __name__ == "__main__":
    main()
