"""The demo's evaluation budget: the `evaluation` flow on the base model and K checkpoints.

Sizes the evaluation section of `configs/demo.yaml`. In a fresh EVOLFORGE_HOME it writes K
stand-in checkpoints (copies of the converted SmolLM2 folder stored as `kind="model"` artifacts
whose lineage leads to a small `sft_set`, as the training stages will write them: each loads as
its own engine with its own request-cache identity, so each costs what a trained checkpoint
would), then runs the flow through Prefect (ephemeral server, started before the clock) with
the demo's settings, and a rerun (all cache hits).

    .venv/bin/python bench/eval_demo.py [--checkpoints 4] [--limit 5] [--max-tokens 128]
        [--modes cot,hybrid] [--home bench/out/eval-demo]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (sandbox, verifier workers): what the
    run costs whatever else the shared machine is doing."""
    import resource

    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--limit", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--modes", default="cot,hybrid")
    parser.add_argument("--benchmarks", default="gsm8k,math500")
    parser.add_argument("--home", default="bench/out/eval-demo")
    args = parser.parse_args()

    os.environ.setdefault(
        "EVOLFORGE_MODELS",
        str(Path(os.environ.get("EVOLFORGE_HOME", "~/.evolforge")).expanduser() / "models"),
    )
    data_home = Path(args.home).resolve()
    shutil.rmtree(data_home, ignore_errors=True)
    os.environ["EVOLFORGE_HOME"] = str(data_home)
    from flows.cli import _prepare_env

    _prepare_env()

    import polars as pl
    from prefect import flow

    from flows.evaluation import EvaluationParams, evaluation
    from flows.reports.evaluation import render_evaluation_summary
    from infra.models import resolve_model
    from storage.datasets import DatasetStore

    store = DatasetStore(data_home)
    sft_set = store.write(
        "sft_set",
        pl.DataFrame({"prompt": ["What is 2 + 3?"], "completion": ["The answer is: 5"]}),
        stage="bench",
        code_version="bench",
        params={},
    )
    base = Path(resolve_model(None).path)
    names = ["sft_model", "rl_model", "ckpt_c", "ckpt_d", "ckpt_e", "ckpt_f"][: args.checkpoints]
    for name in names:
        with tempfile.TemporaryDirectory(dir=data_home) as tmp:
            copy = Path(tmp) / "ckpt"
            shutil.copytree(base, copy)
            (copy / "stand_in.txt").write_text(name)  # a distinct checksum per checkpoint
            store.write_folder(
                name,
                copy,
                kind="model",
                stage="bench",
                code_version="bench",
                params={"name": name},
                parents=[str(sft_set.ref)],
            )

    params = EvaluationParams.model_validate(
        {
            "models": ["base", *names],
            "benchmarks": args.benchmarks.split(","),
            "modes": args.modes.split(","),
            "limit": args.limit,
            "engine": {"kind": "embedded", "batch_size": 32, "dtype": "bfloat16"},
            "decoding": {"cot_max_tokens": args.max_tokens, "pot_max_tokens": args.max_tokens},
            "sandbox": {"workers": 1},
            "skip_missing_models": True,
        }
    )

    @flow(name="warm-up")
    def warm_up() -> None:
        """Starts Prefect's ephemeral server (make demo pays it once, before evaluation)."""

    t0 = time.perf_counter()
    warm_up()
    started = time.perf_counter() - t0
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), cpu_seconds()
    state = evaluation(params=params)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    t0 = time.perf_counter()
    evaluation(params=params)
    rerun = time.perf_counter() - t0
    print(render_evaluation_summary(state))
    evaluate = next(s for s in state.steps if s.stage == "evaluate")
    engine = evaluate.stats.get("engine", {})
    print(
        f"\nmodels: base + {len(names)} checkpoints; {args.benchmarks} x {args.limit} items; "
        f"modes {args.modes}; max {args.max_tokens} new tokens; bf16, batch 32"
    )
    print(f"Prefect server start (not counted): {started:.1f} s; load average at start {load:.2f}")
    print(
        f"evaluation flow wall: {wall:.1f} s (engine {engine.get('engine_seconds', 0):.1f} s, "
        f"{engine.get('completion_tokens', 0)} output tokens, {engine.get('misses', 0)} engine "
        f"requests, {engine.get('hits', 0)} cache hits); load average after "
        f"{os.getloadavg()[0]:.2f}"
    )
    print(f"evaluation flow CPU time (process + children): {cpu:.1f} s")
    print(f"rerun (all cache hits): {rerun:.1f} s")


if __name__ == "__main__":
    main()
