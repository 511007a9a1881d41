"""Training in the demo's share of time: the training sets, then SFT + IRM + PRM + RL on the
embedded SmolLM2-135M (fp32, CPU) with the settings proposed for `configs/demo.yaml`
(`DEMO_TRAINING_SETS`, `DEMO_TRAINING` below), and the curves.

    .venv/bin/python bench/training_bench.py                        # the tests' synthetic datasets
    .venv/bin/python bench/training_bench.py --home /path/to/home   # a demo data home (copied)

A data home from `make demo` with the reward flow's datasets (irm_pairs, step_labels, rewards)
gives the demo's real sizes; its datasets are copied into a temporary home, never written to.
Per stage it prints wall seconds, CPU seconds of the process (all threads: on a shared machine
the wall time grows with the load, the CPU time much less) and the trainer's own seconds, then
the total and the load average. The target: training adds at most 3 minutes to `make demo` on
2 cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.engines.cpu import read_cpu_info  # noqa: E402

DEMO_TRAINING_SETS = {
    "split": {"test_fraction": 0.25},
    "sft": {"pot_ratio": 0.25},
    "prm": {"labeller": "consensus"},
}
DEMO_TRAINING = {
    "sft": {"max_steps": 4, "batch_size": 2, "max_length": 256, "learning_rate": 5.0e-5, "eval_rows": 4},
    "irm": {
        "max_steps": 3, "batch_size": 2, "max_length": 192, "learning_rate": 2.0e-5,
        "consistent_only": False, "eval_rows": 4,
    },
    "prm": {
        "max_steps": 3, "batch_size": 2, "max_length": 256, "learning_rate": 2.0e-5,
        "processbench_limit": 8, "eval_rows": 4,
    },
    "rl": {
        "max_steps": 2, "batch_size": 1, "num_generations": 2, "sampling": {"max_tokens": 48},
        "learning_rate": 1.0e-6, "eval_rows": 1, "reward_max_length": 256,
        "judge_fallback": False, "r_i_default": 1.0,
    },
}  # fmt: skip


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def prepare_home(source: Path | None) -> Path:
    home = Path(tempfile.mkdtemp(prefix="evolforge-train-bench-"))
    os.environ["EVOLFORGE_HOME"] = str(home)
    if source is None:
        from storage.datasets import DatasetStore
        from tests.tasks.training.synthetic import write_all

        write_all(DatasetStore(home))
    else:
        shutil.copytree(source / "datasets", home / "datasets")
        os.environ.setdefault("EVOLFORGE_MODELS", str(source / "models"))
    return home


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="a data home with the data and reward datasets")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    home = prepare_home(args.home)

    from flows.training_sets import TrainingSetsState
    from infra.models import resolve_model
    from tasks.training import sets as sets_mod
    from tasks.training.common import BaseModelSpec
    from tasks.training.config import TrainingConfig
    from tasks.training.curves import draw_training_curves
    from tasks.training.irm import train_irm
    from tasks.training.prm import train_prm
    from tasks.training.rl import train_rl
    from tasks.training.sft import train_sft

    try:
        import tasks.rewards.steps  # noqa: F401  (the reward flow's segmenter)
    except ImportError:
        import tasks.training.reward as reward_mod

        reward_mod.default_segmenter = lambda: lambda text: text.splitlines(True)
        print("note: tasks.rewards.steps is not installed: RL splits steps by line here")
    resolve_model(None)  # the GGUF conversion is the data flow's cost, not training's
    inputs = TrainingSetsState.newest()
    set_params = sets_mod.TrainingSetParams.model_validate(DEMO_TRAINING_SETS)
    config = TrainingConfig.model_validate(DEMO_TRAINING)
    base = BaseModelSpec()
    rows: list[tuple[str, float, float, float | None, str]] = []

    def timed(name, fn, **kwargs):
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = fn.run(**kwargs)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        stats = result.stats
        rows.append((name, wall, cpu, stats.get("train_seconds"), _headline(stats)))
        print(f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU  {_headline(stats)}", flush=True)
        return result

    split = set_params.split
    sft_set = timed(
        "sft_set", sets_mod.build_sft_set, seeds=inputs.seeds, instructions=inputs.instructions,
        sft_answers=inputs.sft_answers, solutions=inputs.solutions, answers=inputs.answers,
        split=split, params=set_params.sft,
    )["sft_set"]  # fmt: skip
    irm_set = timed(
        "irm_set", sets_mod.build_irm_set, irm_pairs=inputs.irm_pairs,
        instructions=inputs.instructions, split=split, params=set_params.irm,
    )["irm_set"]  # fmt: skip
    prm_steps = timed(
        "prm_steps", sets_mod.build_prm_steps, step_labels=inputs.step_labels,
        instructions=inputs.instructions, solutions=inputs.solutions, split=split,
        params=set_params.prm,
    )["prm_steps"]  # fmt: skip
    rl_prompts = timed(
        "rl_prompts", sets_mod.build_rl_prompts, seeds=inputs.seeds,
        instructions=inputs.instructions, answers=inputs.answers, rewards=inputs.rewards,
        split=split, params=set_params.rl,
    )["rl_prompts"]  # fmt: skip
    start_wall, start_cpu = time.perf_counter(), cpu_seconds()
    sft = timed("train_sft", train_sft, sft_set=sft_set, base_model=base, params=config.sft)
    irm = timed("train_irm", train_irm, irm_set=irm_set, base_model=base, params=config.irm)
    prm = timed("train_prm", train_prm, prm_steps=prm_steps, base_model=base, params=config.prm)
    rl = timed(
        "train_rl", train_rl, rl_prompts=rl_prompts, sft_model=sft["sft_model"],
        irm_model=irm["irm_model"], prm_model=prm["prm_model"], base_model=base, judge=None,
        params=config.rl,
    )  # fmt: skip
    timed(
        "training_curves", draw_training_curves, sft_model=sft["sft_model"],
        irm_model=irm["irm_model"], prm_model=prm["prm_model"], rl_model=rl["rl_model"],
    )  # fmt: skip
    total_wall, total_cpu = time.perf_counter() - start_wall, cpu_seconds() - start_cpu
    print()
    print(f"cpu: {read_cpu_info().model}, {os.cpu_count()} cores, torch threads {_threads()}")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"data: {'synthetic (tests)' if args.home is None else args.home}")
    print("| stage | wall s | CPU s | trainer s | metrics |")
    print("| --- | --- | --- | --- | --- |")
    for name, wall, cpu, train_s, headline in rows:
        print(
            f"| {name} | {wall:.1f} | {cpu:.1f} | {'' if train_s is None else f'{train_s:.1f}'} | {headline} |"
        )
    print(
        f"| **training total** (4 trainers + curves) | **{total_wall:.1f}** | **{total_cpu:.1f}** | | |"
    )
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    else:
        print(f"home kept: {home}")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _headline(stats: dict) -> str:
    keys = (
        "rows", "train", "test", "steps", "loss_first", "loss_last", "eval_mean_token_accuracy",
        "pairwise_accuracy", "step_accuracy", "first_error_f1", "reward_first", "reward_last",
        "rI_last", "rA_last", "eval_accuracy",
    )  # fmt: skip
    parts = []
    for key in keys:
        value = stats.get(key)
        if value is not None and not isinstance(value, dict):
            parts.append(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts)


if __name__ == "__main__":
    main()
