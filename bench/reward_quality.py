"""Quality of the reward labellers: a ProcessBench-like check and ranking consistency.

1. ProcessBench-like (`tasks.rewards.processbench`): --items GSM8K *test* reference solutions,
   one line per step, a seeded half with one step's computed result changed. For the judge
   labeller (first incorrect step, `tasks.rewards.step_judge`) and the Monte Carlo labeller
   (`tasks.rewards.monte_carlo`, --n rollouts per prefix; its first error is the first step
   from which no rollout reaches the reference answer), it prints the accuracy of the predicted
   first-error step on the erroneous half, the accuracy of "no error" on the correct half, and
   their harmonic mean F1, as ProcessBench does. A solution the labeller could not judge counts
   as wrong (and is counted).
2. Ranking consistency (`tasks.rewards.rankings`): --parents GSM8K *train* problems, --k sibling
   evolutions each (`tasks.rewards.siblings`), ranked by the judge in two seeded orders: mean
   Kendall tau between the orders and the share of consistent IRM pairs.

Engine time, requests and tokens are printed per part. The embedded SmolLM2-135M scores near
chance; the same script on a GPU profile (--kind vllm --model ...) is where the figures mean
something.

    .venv/bin/python bench/reward_quality.py [--items 20] [--n 4] [--parents 6] [--k 4]
        [--kind embedded] [--model NAME] [--dtype bfloat16] [--json FILE]

It uses a temporary EVOLFORGE_HOME (a cold request cache); converted models are reused from
EVOLFORGE_MODELS (default: the usual home's models folder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from typing import Any

import polars as pl

from infra.engines.cpu import read_cpu_info
from storage.settings import home


def mc_first_error(labels: list[bool | None]) -> float | int | None:
    """The first step no rollout recovers from; NaN when an earlier step is unknown."""
    for k, hard in enumerate(labels):
        if hard is None:
            return math.nan
        if not hard:
            return k
    return None


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def processbench_part(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    from tasks.rewards.monte_carlo import MonteCarloParams, monte_carlo_labels
    from tasks.rewards.processbench import processbench_items, processbench_scores
    from tasks.rewards.step_judge import StepJudgeParams, judge_first_errors

    items = processbench_items(limit=args.items, seed=args.seed)
    labels = items["label"].to_list()
    out: dict[str, Any] = {"items": items.height}

    start, before = time.perf_counter(), dict(engine.stats)
    judgments = judge_first_errors(
        items["problem"].to_list(),
        items["steps"].to_list(),
        engine,
        StepJudgeParams(
            reason_max_chars=args.reason_chars, sampling={"max_tokens": args.judge_tokens}
        ),
    )
    predictions = [j["first_error"] if j["judged"] else math.nan for j in judgments]
    out["judge"] = processbench_scores(labels, predictions) | _cost(engine, before, start)

    start, before = time.perf_counter(), dict(engine.stats)
    segmented = items.select(
        pl.col("id").alias("solution_id"),
        pl.lit("cot").alias("kind"),
        "problem",
        "steps",
        pl.lit(None, dtype=pl.String).alias("extracted_answer"),
        pl.col("answer").alias("target"),
    )
    rollouts = monte_carlo_labels(
        segmented,
        engine,
        MonteCarloParams(
            n=args.n, sampling={"max_tokens": args.rollout_tokens, "temperature": 0.7}
        ),
    )
    hard = rollouts.group_by("solution_id", maintain_order=True).agg(
        pl.col("mc_hard").sort_by("step_index")
    )
    by_id = dict(zip(hard["solution_id"], hard["mc_hard"].to_list(), strict=True))
    mc_predictions = [mc_first_error(by_id[i]) for i in items["id"]]
    out["monte_carlo"] = processbench_scores(labels, mc_predictions) | _cost(engine, before, start)
    return out


def ranking_part(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    from flows.reports.rewards import ranking_figures
    from tasks.rewards.rankings import RankingParams, rank_groups
    from tasks.rewards.siblings import SiblingParams, sibling_evolutions

    path = _gsm8k_train()
    records = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[: args.parents]
    ]
    instructions = pl.DataFrame(
        {
            "id": [f"gsm8k-train-{i}" for i in range(len(records))],
            "parent_id": [None] * len(records),
            "root_id": [f"gsm8k-train-{i}" for i in range(len(records))],
            "round": [0] * len(records),
            "text": [r["question"] for r in records],
        },
        schema_overrides={"parent_id": pl.String},
    )
    groups = instructions.select(pl.col("id").alias("parent_id"), pl.lit(1).alias("round"))
    start, before = time.perf_counter(), dict(engine.stats)
    siblings = sibling_evolutions(
        instructions,
        groups,
        [engine],
        SiblingParams(
            k=args.k,
            share=1.0,
            include_data_evolutions=False,
            sampling={"max_tokens": args.evolve_tokens},
        ),
    )
    evolve_cost = _cost(engine, before, start)
    start, before = time.perf_counter(), dict(engine.stats)
    rankings, pairs = rank_groups(
        siblings,
        dict(zip(instructions["id"], instructions["text"], strict=True)),
        engine,
        RankingParams(
            reason_max_chars=args.reason_chars, sampling={"max_tokens": args.rank_tokens}
        ),
    )
    figures = ranking_figures(rankings, pairs)
    failed = int(rankings["error_a"].is_not_null().sum() + rankings["error_b"].is_not_null().sum())
    return {
        **figures,
        "siblings": siblings.height,
        "unparsed_siblings": int(siblings["text"].is_null().sum()),
        "failed_orders": failed,
        "evolve": evolve_cost,
        "rank": _cost(engine, before, start),
    }


def _gsm8k_train():
    from storage.settings import shared_data_dir

    return shared_data_dir() / "gsm8k" / "train.jsonl"


def _cost(engine: Any, before: dict[str, float], start: float) -> dict[str, float]:
    after = engine.stats
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "requests": int(after.get("requests", 0) - before.get("requests", 0)),
        "completion_tokens": int(
            after.get("completion_tokens", 0) - before.get("completion_tokens", 0)
        ),
        "engine_s": round(after.get("engine_seconds", 0) - before.get("engine_seconds", 0), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20, help="ProcessBench-like items")
    parser.add_argument("--n", type=int, default=4, help="Monte Carlo rollouts per step prefix")
    parser.add_argument("--parents", type=int, default=6, help="parents for the ranking check")
    parser.add_argument("--k", type=int, default=4, help="sibling evolutions per parent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", default="embedded", choices=["embedded", "vllm", "openai"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reason-chars", type=int, default=32)
    parser.add_argument("--judge-tokens", type=int, default=96)
    parser.add_argument("--rank-tokens", type=int, default=400)
    parser.add_argument("--rollout-tokens", type=int, default=96)
    parser.add_argument("--evolve-tokens", type=int, default=128)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    from infra.engines import EngineConfig, open_engine

    os.environ.setdefault("EVOLFORGE_MODELS", str(home() / "models"))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EVOLFORGE_HOME"] = tmp
        config = EngineConfig(
            kind=args.kind, model=args.model, dtype=args.dtype, batch_size=args.batch_size
        )
        engine = open_engine(config, "reward_quality")
        started = time.perf_counter()
        figures = {
            "engine": engine.identity,
            "cpu": read_cpu_info().model,
            "cores": os.cpu_count(),
            "load_at_start": round(os.getloadavg()[0], 2),
            "processbench": processbench_part(engine, args),
            "ranking": ranking_part(engine, args),
        }
        figures["wall_s"] = round(time.perf_counter() - started, 1)
        figures["load_at_end"] = round(os.getloadavg()[0], 2)

    pb = figures["processbench"]
    print(f"engine: {figures['engine']} ({args.kind}, {args.dtype}); CPU: {figures['cpu']}")
    print(
        f"load average {figures['load_at_start']} → {figures['load_at_end']}; wall {figures['wall_s']} s"
    )
    print()
    print(f"ProcessBench-like, {pb['items']} GSM8K test solutions (seed {args.seed}):")
    print(
        "| labeller | erroneous | acc. erroneous | correct | acc. correct | F1 | unjudged | requests | engine s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in ("judge", "monte_carlo"):
        s = pb[name]
        label = "judge" if name == "judge" else f"monte carlo (n={args.n})"
        print(
            f"| {label} | {s['erroneous']} | {fmt(s['acc_erroneous'])} | {s['correct']} | "
            f"{fmt(s['acc_correct'])} | {fmt(s['f1'])} | {s['unjudged']} | {s['requests']} | "
            f"{s['engine_s']} |"
        )
    r = figures["ranking"]
    print()
    print(
        f"Ranking consistency, {r['groups']} GSM8K train parents x {args.k} siblings "
        f"({r['unparsed_siblings']} unparsed): mean tau {fmt(r['mean_tau'])} over "
        f"{r['tau_groups']} groups, consistent pairs {fmt(r['consistent_share'])} of {r['pairs']}, "
        f"failed judge calls {r['failed_orders']} of {2 * r['groups']}; evolve "
        f"{r['evolve']['engine_s']} s, rank {r['rank']['engine_s']} s engine time"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
