"""Grader checks of the evaluation: reference solutions, and agreement with math-verify.

1. Reference solutions (`tasks.evaluation.grader_check`): every item of the seven benchmarks,
   its own reference solution graded against its own reference answer by the evaluation's code
   (SVAMP's equations run in the sandbox). Prints the pass rate per benchmark and every
   exception with its explanation; an unexplained exception is a grader bug.
2. Agreement with math-verify on real model completions: the embedded model answers GSM8K test
   and MATH500 items (seeded subsets, greedy CoT through the evaluation stages; the request cache
   of --home is reused, so after `bench/eval_throughput.py` the GSM8K completions are free).
   Each completion is judged twice:
   - ours: the evaluation's verdict (`extract_answer` + `check_equivalence`);
   - math-verify's own: `verify(parse("$<reference>$"), parse(<completion>))`, its default
     extraction over the whole completion.
   and, to separate extraction from equivalence, math-verify on our extracted answer
   (`verify(parse("$<reference>$"), parse("$<extracted>$"))`). Every disagreement is listed.
3. The same comparison on the reference solutions of GSM8K test and MATH500 as completions,
   each graded against its own answer (should be correct) and against the next item's answer
   (should be wrong): the small model is rarely right, these cover the "correct" side.

    .venv/bin/python bench/eval_grader_check.py [--gsm8k 200] [--math500 100]
        [--max-tokens 512] [--dtype bfloat16] [--home bench/out/eval-throughput]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import polars as pl


def reference_check() -> None:
    from infra.sandbox import Sandbox
    from tasks.benchmarks import REGISTRY, benchmark_source, read_items
    from tasks.evaluation.grader_check import check_references
    from tasks.solutions.answers import equivalence_pool

    items = pl.concat([read_items(benchmark_source(name)) for name in REGISTRY])
    t0 = time.perf_counter()
    with Sandbox(workers=2) as sandbox, equivalence_pool(workers=2) as pool:
        checked = check_references(items, sandbox, pool)
    print(f"\n== 1. reference solutions vs reference answers ({time.perf_counter() - t0:.1f} s)")
    per = checked.group_by("benchmark", maintain_order=True).agg(
        pl.len().alias("items"),
        pl.col("correct").sum().alias("pass"),
        pl.col("explanation").is_not_null().sum().alias("explained"),
        (pl.col("correct").fill_null(False).not_() & pl.col("explanation").is_null())
        .sum()
        .alias("unexplained"),
    )
    print(f"{'benchmark':<10} {'style':<9} {'items':>6} {'pass':>6} {'%':>7} {'explained':>9}")
    for r in per.iter_rows(named=True):
        style = REGISTRY[r["benchmark"]].solution_style or "answer"
        print(
            f"{r['benchmark']:<10} {style:<9} {r['items']:>6} {r['pass']:>6} "
            f"{100 * r['pass'] / r['items']:>6.2f}% {r['explained']:>9}"
            + (f"  UNEXPLAINED {r['unexplained']}" if r["unexplained"] else "")
        )
    failed = checked.filter(pl.col("correct").is_null() | ~pl.col("correct"))
    print(f"\nexceptions ({failed.height}), grouped by explanation:")
    for (why,), group in failed.group_by(["explanation"], maintain_order=True):
        print(f"- {why or 'UNEXPLAINED'}: {group.height} items")
        for r in group.head(200).iter_rows(named=True):
            print(
                f"    {r['benchmark']}:{r['id']} ({r['subject']}) {r['derived']!r} vs {r['answer']!r}"
            )


def _math_verify(gold: str, target: str) -> bool | None:
    from math_verify import parse, verify

    try:
        parsed_gold = parse(f"${gold}$", parsing_timeout=5)
        if not parsed_gold:
            return None
        return bool(verify(parsed_gold, parse(target, parsing_timeout=5), timeout_seconds=5))
    except Exception:
        return None


def agreement(args: argparse.Namespace) -> None:
    from infra.engines import EngineConfig
    from infra.sandbox import SandboxSettings
    from storage.datasets import DatasetStore
    from tasks.benchmarks import benchmark_source
    from tasks.evaluation.evaluate import DecodingParams, evaluate_batch, plan_evaluation
    from tasks.evaluation.items import load_eval_items
    from tasks.evaluation.models import resolve_specs

    engine = EngineConfig(kind="embedded", dtype=args.dtype, batch_size=args.batch_size)
    decoding = DecodingParams(cot_max_tokens=args.max_tokens, pot_max_tokens=args.max_tokens)
    targets = resolve_specs(["base"], engine)
    frames = []
    t0 = time.perf_counter()
    for name, limit in (("gsm8k", args.gsm8k), ("math500", args.math500)):
        items = load_eval_items.run(benchmarks=[benchmark_source(name)], limit=limit, seed=0)
        plan = plan_evaluation.run(
            eval_items=items["eval_items"], models=targets, modes=["cot"], k=8
        )
        result = evaluate_batch.run(
            eval_requests=plan["eval_requests"],
            engine=engine,
            decoding=decoding,
            sandbox=SandboxSettings(workers=1),
        )
        frames.append(DatasetStore(Path(os.environ["EVOLFORGE_HOME"])).read(result["eval_results"]))
        print(f"{name}: {limit} completions ({'cached' if result.cached else 'generated'})")
    results = pl.concat(frames)
    generated = time.perf_counter() - t0
    rows = []
    for r in results.iter_rows(named=True):
        whole = _math_verify(r["reference"], r["completion"] or "")
        same = (
            _math_verify(r["reference"], f"${r['extracted_answer']}$")
            if r["extracted_answer"] is not None
            else False
        )
        rows.append({**r, "mv_completion": whole, "mv_answer": same})
    judged = pl.DataFrame(rows, infer_schema_length=None)
    n = judged.height
    print(
        f"\n== 2. agreement with math-verify on {n} real completions ({generated:.0f} s to get them)"
    )
    print(
        f"ours correct {int(judged['correct'].fill_null(False).sum())}, "
        f"math-verify (whole completion) correct {int(judged['mv_completion'].fill_null(False).sum())}, "
        f"math-verify (our extracted answer) correct {int(judged['mv_answer'].fill_null(False).sum())}"
    )
    for column, what in (
        ("mv_completion", "math-verify's own extraction and verify on the completion"),
        ("mv_answer", "math-verify's verify on our extracted answer (equivalence only)"),
    ):
        agree = judged.filter(pl.col("correct") == pl.col(column)).height
        wider = judged.filter(pl.col("correct") & ~pl.col(column).fill_null(False))
        narrower = judged.filter(~pl.col("correct").fill_null(False) & pl.col(column))
        print(f"\nvs {what}: agree on {agree} of {n} ({100 * agree / n:.1f}%)")
        print(f"  ours wider (we say correct, math-verify not): {wider.height}")
        for r in wider.iter_rows(named=True):
            tail = (r["completion"] or "")[-160:].replace("\n", " ⏎ ")
            print(
                f"    {r['benchmark']}:{r['item_id']} ours {r['extracted_answer']!r} = ref "
                f"{r['reference']!r}; completion …{tail}"
            )
        print(f"  ours stricter (math-verify says correct, we do not): {narrower.height}")
        for r in narrower.iter_rows(named=True):
            tail = (r["completion"] or "")[-160:].replace("\n", " ⏎ ")
            print(
                f"    {r['benchmark']}:{r['item_id']} ours {r['extracted_answer']!r} vs ref "
                f"{r['reference']!r}; completion …{tail}"
            )
    print(
        "\nanswered (a final answer extracted): "
        f"{judged['extracted_answer'].is_not_null().sum()} of {n}; "
        f"stopped at max tokens: {(judged['finish_reason'] == 'length').sum()}"
    )


def _compare(judged: pl.DataFrame, ours: str, theirs: str, what: str, show: int = 40) -> None:
    n = judged.height
    agree = judged.filter(pl.col(ours) == pl.col(theirs)).height
    wider = judged.filter(pl.col(ours) & ~pl.col(theirs).fill_null(False))
    stricter = judged.filter(~pl.col(ours).fill_null(False) & pl.col(theirs))
    print(f"\nvs {what}: agree on {agree} of {n} ({100 * agree / n:.2f}%)")
    for label, part in (
        ("ours wider (we: correct, math-verify: not)", wider),
        ("ours stricter (math-verify: correct, we: not)", stricter),
    ):
        print(f"  {label}: {part.height}")
        for r in part.head(show).iter_rows(named=True):
            tail = (r["text"] or "")[-120:].replace("\n", " ⏎ ")
            print(f"    {r['where']} ours {r['extracted']!r} vs ref {r['reference']!r}: …{tail}")


def reference_agreement() -> None:
    """Reference solutions as completions: graded against their own answers (correct ones) and
    against the next item's answer (wrong ones), by us and by math-verify."""
    from tasks.benchmarks import benchmark_source, read_items
    from tasks.solutions.answers import check_equivalence, equivalence_pool, extract_answer

    items = pl.concat([read_items(benchmark_source(b)) for b in ("gsm8k", "math500")])
    rows = []
    for bench in ("gsm8k", "math500"):
        part = items.filter(pl.col("benchmark") == bench).to_dicts()
        for i, item in enumerate(part):
            other = part[(i + 1) % len(part)]["answer"]
            for kind, reference in (("own", item["answer"]), ("next", other)):
                rows.append(
                    {
                        "where": f"{bench}:{item['id']} ({kind} answer)",
                        "text": item["solution"],
                        "extracted": extract_answer(item["solution"]),
                        "reference": reference,
                    }
                )
    t0 = time.perf_counter()
    with equivalence_pool(workers=2) as pool:
        ours = check_equivalence(
            [r["extracted"] for r in rows], [r["reference"] for r in rows], pool
        )
    for r, verdict in zip(rows, ours, strict=True):
        r["ours"] = verdict
        r["mv"] = _math_verify(r["reference"], r["text"])
    judged = pl.DataFrame(rows)
    print(
        f"\n== 3. agreement with math-verify on {judged.height} reference solutions of GSM8K test "
        f"and MATH500, each graded against its own answer and the next item's "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    print(
        f"ours correct {int(judged['ours'].fill_null(False).sum())}, math-verify correct "
        f"{int(judged['mv'].fill_null(False).sum())}, math-verify could not parse the reference "
        f"{judged['mv'].null_count()}"
    )
    _compare(judged, "ours", "mv", "math-verify's own extraction and verify on the solution")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gsm8k", type=int, default=200)
    parser.add_argument("--math500", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--home", default="bench/out/eval-throughput")
    parser.add_argument("--skip-references", action="store_true")
    parser.add_argument("--skip-agreement", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault(
        "EVOLFORGE_MODELS",
        str(Path(os.environ.get("EVOLFORGE_HOME", "~/.evolforge")).expanduser() / "models"),
    )
    os.environ["EVOLFORGE_HOME"] = str(Path(args.home).resolve())
    if not args.skip_references:
        reference_check()
    if not args.skip_agreement:
        agreement(args)
        reference_agreement()


if __name__ == "__main__":
    main()
