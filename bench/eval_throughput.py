"""Evaluation throughput on CPU: the embedded model on GSM8K test, a seeded subset, cot mode.

Runs the evaluation stages in process (no Prefect server) in a fresh EVOLFORGE_HOME, so the
request cache is cold: `eval_items` (limit N, seed 0) → base model → `eval_requests` →
`evaluate` (greedy CoT, the model's chat template, max --max-tokens new tokens) → `eval_scores`.
Prints the wall time of the whole run and of the `evaluate` stage, the engine's output tokens,
tokens/s (engine time and wall), the accuracy with its 95% interval, the load average before and
after (the machine is shared) and the CPU model. A second pass shows the rerun is free.

    .venv/bin/python bench/eval_throughput.py [--limit 200] [--max-tokens 512]
        [--dtype bfloat16] [--batch-size 64] [--home bench/out/eval-throughput]

Converted models are reused from EVOLFORGE_MODELS (default: the usual home's models folder).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from infra.engines.cpu import read_cpu_info


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (sandbox, verifier workers): what the
    run costs whatever else the shared machine is doing."""
    import resource

    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--benchmark", default="gsm8k")
    parser.add_argument("--mode", default="cot")
    parser.add_argument("--home", default="bench/out/eval-throughput")
    args = parser.parse_args()

    models = os.environ.get("EVOLFORGE_MODELS") or str(
        Path(os.environ.get("EVOLFORGE_HOME", "~/.evolforge")).expanduser() / "models"
    )
    os.environ["EVOLFORGE_MODELS"] = models
    data_home = Path(args.home).resolve()
    shutil.rmtree(data_home, ignore_errors=True)
    os.environ["EVOLFORGE_HOME"] = str(data_home)

    from infra.engines import EngineConfig
    from infra.sandbox import SandboxSettings
    from storage.datasets import DatasetStore
    from tasks.benchmarks import benchmark_source
    from tasks.evaluation.evaluate import DecodingParams, evaluate_batch, plan_evaluation
    from tasks.evaluation.items import load_eval_items
    from tasks.evaluation.models import resolve_specs
    from tasks.evaluation.scores import score_evaluation

    engine = EngineConfig(kind="embedded", dtype=args.dtype, batch_size=args.batch_size)
    decoding = DecodingParams(cot_max_tokens=args.max_tokens, pot_max_tokens=args.max_tokens)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    items = load_eval_items.run(
        benchmarks=[benchmark_source(args.benchmark)], limit=args.limit, seed=0
    )
    targets = resolve_specs(["base"], engine)
    plan = plan_evaluation.run(
        eval_items=items["eval_items"], models=targets, modes=[args.mode], k=8
    )
    t1, c1 = time.perf_counter(), cpu_seconds()
    result = evaluate_batch.run(
        eval_requests=plan["eval_requests"],
        engine=engine,
        decoding=decoding,
        sandbox=SandboxSettings(workers=2),
    )
    t2, c2 = time.perf_counter(), cpu_seconds()
    scores = score_evaluation.run(eval_results=result["eval_results"], eval_contamination=None)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()[0]

    store = DatasetStore(data_home)
    row = store.read(scores["eval_scores"]).row(0, named=True)
    results = store.read(result["eval_results"])
    stats = result.stats["engine"]
    tokens = stats["completion_tokens"]
    print(f"cpu: {read_cpu_info().model} ({os.cpu_count()} cores)")
    print(
        f"evaluation: {args.benchmark} limit {args.limit}, mode {args.mode}, base "
        f"({targets[0].prompt_format} format), {args.dtype}, batch {args.batch_size}, "
        f"max {args.max_tokens} new tokens"
    )
    print(f"load average: {load_before:.2f} before, {load_after:.2f} after")
    print(f"wall, whole run (model load included): {wall:.1f} s")
    print(
        f"wall, evaluate stage: {t2 - t1:.1f} s; engine time {stats['engine_seconds']:.1f} s; "
        f"CPU time {c2 - c1:.1f} s (torch threads: {torch_threads()})"
    )
    print(f"requests: {stats['requests']} ({stats['misses']} to the engine)")
    print(
        f"output tokens: {tokens} ({tokens / max(1, results.height):.0f} per item; "
        f"{int((results['finish_reason'] == 'length').sum())} stopped at max tokens)"
    )
    print(
        f"tokens/s: {tokens / stats['engine_seconds']:.1f} (engine time), "
        f"{tokens / (t2 - t1):.1f} (evaluate stage wall)"
    )
    print(
        f"accuracy: {row['correct']}/{row['judged']} = {100 * row['accuracy']:.1f}% "
        f"[{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]; no answer {row['no_answer']}"
    )
    t3 = time.perf_counter()
    again = evaluate_batch.run(
        eval_requests=plan["eval_requests"],
        engine=engine,
        decoding=decoding,
        sandbox=SandboxSettings(workers=2),
    )
    print(f"rerun: cached={again.cached} in {time.perf_counter() - t3:.2f} s")


if __name__ == "__main__":
    main()
