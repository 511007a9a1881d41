"""The device check (driver of `bench/gpu_check.sh`): the project's SFT, IRM, PRM and GRPO
training stages for a few steps each, then IRM and PRM scoring through `infra.scoring`, on CUDA
in mixed precision (or on the CPU with `--device cpu`, to check the script end to end anywhere).

    python bench/gpu_check.py                  # CUDA: fails when torch sees no GPU
    python bench/gpu_check.py --device cpu     # the same checks on the CPU, tiny sizes

The model is a random Llama built here with transformers (`--layers`, `--hidden`; the tokenizer is
the tests' byte-level BPE): the packaged SmolLM2-135M is a 270 MB GGUF, too large to travel to a
lent machine. So the figures measure the trainers' plumbing on the device (placement, autocast,
memory, steps/s of a small model), not SmolLM2's learning. The rows are small synthetic training
sets with the columns `tasks/training/records.py` declares (no `tasks.training.sets`, which
imports Prefect); the stages run in process (`InProcessExecutor`), so Prefect is never imported.

Per trainer it prints steps, steps/s, peak memory (CUDA: `torch.cuda.max_memory_allocated`;
CPU: the process's peak RSS), the dtype of the trained weights and whether the forward passes
ran under bf16 autocast; then where and in which dtype each reward model scored. Any failure
exits non-zero with one line `gpu_check FAILED: <reason>`.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The modules the check imports beyond the image's torch and transformers: what
# `bench/gpu_wheels.txt` must provide where the image lacks them (tests check the two agree).
REQUIRED_MODULES = {
    "trl": "trl",
    "accelerate": "accelerate",
    "datasets": "datasets",
    "pyarrow": "pyarrow",
    "pandas": "pandas",
    "polars": "polars",
    "pydantic": "pydantic",
    "dill": "dill",
    "multiprocess": "multiprocess",
    "xxhash": "xxhash",
    "psutil": "psutil",
    "duckdb": "duckdb",
}

# What the check runs without even where the image has it: the wheels leave it out (Prefect and
# its dependencies are larger than what a device run may carry; the stages never need it).
HIDDEN_MODULES = ("prefect",)

N_ROWS = 8


class CheckFailed(RuntimeError):
    """A check that ran and gave the wrong answer (wrong device, dtype, precision)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default=os.environ.get("GPU_CHECK_DEVICE", "cuda"),
        help="cuda (the device check) or cpu (the same checks here); env GPU_CHECK_DEVICE",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "bf16"],
        default="auto",
        help="the trainers' precision: auto (bf16 autocast on CUDA, fp32 on the CPU) or bf16 "
        "(autocast on the CPU too: checks the autocast probe without a GPU)",
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per trainer")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the model")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size of the model")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per sequence")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    # CUDA: a model big enough for the GPU to show in steps/s and memory; CPU: seconds per stage.
    defaults = {"steps": (20, 2), "layers": (8, 2), "hidden": (1024, 32), "max_length": (256, 128)}
    for name, (on_cuda, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
        elif getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.hidden % 4:
        parser.error("--hidden must be a multiple of 4 (4 attention heads)")
    return args


class Hide:
    """A meta path finder that makes `modules` unimportable, as on an image without them."""

    def __init__(self, modules: tuple[str, ...]):
        self.modules = modules

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in self.modules:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by gpu_check)", name=name)
        return None


def missing_modules() -> list[str]:
    import importlib.util

    return [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]


def make_model(folder: Path, layers: int, hidden: int) -> Path:
    """A random Llama (`layers` x `hidden`) with the tests' tiny tokenizer, saved in `folder`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.tasks.training.tiny import make_tiny_model

    make_tiny_model(folder)  # writes the tokenizer (and a 2x32 model, replaced below)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def training_sets() -> dict[str, Any]:
    """Small sft_set / irm_set / prm_steps / rl_prompts frames (their records' columns)."""
    from tasks.training import formats
    from tasks.training.records import IrmExample, PrmExample, RlPrompt, SftExample
    from tests.tasks.training.synthetic import cot_text

    sft, irm, prm, rl = [], [], [], []
    for k in range(N_ROWS):
        a, b, c = 3 + k, 5 + 2 * k, 2 + k
        split = "test" if k == N_ROWS - 1 else "train"
        question = f"What is {a} + {b} + {c}?"
        parent = f"What is {a} + {b}?"
        prompt = formats.alpaca_prompt(question)
        common = {"root_id": f"s{k}", "round": 1, "split": split}
        sft.append(
            {"id": f"s{k}.r1:cot", "instruction_id": f"s{k}.r1", "source": "solution",
             "kind": "cot", "solution_id": f"s{k}.r1:0", "prompt": prompt,
             "completion": cot_text(a, b, c), "answer": str(a + b + c), **common}
        )  # fmt: skip
        irm.append(
            {"id": f"s{k}:pair", "parent_id": f"s{k}", "parent": parent,
             "prompt": formats.irm_prompt(parent), "chosen": question,
             "rejected": f"What is {a} plus?", "chosen_id": f"s{k}.r1.a",
             "rejected_id": f"s{k}.r1.b", "margin": 1.0, "consistent": True, **common}
        )  # fmt: skip
        wrong = k % 2 == 1
        steps = cot_text(a, b, c, wrong=wrong).split("\n")
        prm.append(
            {"id": f"s{k}.r1:{int(wrong)}", "instruction_id": f"s{k}.r1", "kind": "cot",
             "prompt": prompt, "completions": steps, "labels": [not wrong] * len(steps),
             "first_error": 0 if wrong else None, "n_steps": len(steps),
             "labeller": "consensus", **common}
        )  # fmt: skip
        rl.append(
            {"id": f"s{k}.r1", "prompt": prompt, "instruction": question, "parent": parent,
             "label": str(a + b + c), "label_source": "majority", "r_i": 0.8, **common}
        )  # fmt: skip
    return {
        "sft_set": SftExample.frame(sft),
        "irm_set": IrmExample.frame(irm),
        "prm_steps": PrmExample.frame(prm),
        "rl_prompts": RlPrompt.frame(rl),
    }


class Watch:
    """Wraps `common.train_resumable` (the one call every training stage makes) to record what
    the trainer trained: its weights' dtypes, its arguments' bf16, and whether its forward
    passes ran under autocast and in which dtype."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.seen: dict[str, Any] = {}

    def __call__(self, original):
        import torch

        def train_resumable(trainer: Any, checkpoints: Path) -> dict[str, Any]:
            model = trainer.model
            forwards = {"n": 0, "autocast": 0, "dtypes": set(), "matmul": set()}

            # Hooks on inner modules: they run inside the forward that accelerate wraps in
            # autocast (a hook on the outer module runs after that context has closed).
            def embedding_hook(module, inputs, output):
                if not (module.training and torch.is_grad_enabled()):
                    return  # generation and reference passes are not training forwards
                forwards["n"] += 1
                if torch.is_autocast_enabled(self.device_type):
                    forwards["autocast"] += 1
                    forwards["dtypes"].add(str(torch.get_autocast_dtype(self.device_type)))

            def linear_hook(module, inputs, output):
                if module.training and torch.is_grad_enabled():
                    forwards["matmul"].add(str(output.dtype))

            linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
            handles = [
                model.get_input_embeddings().register_forward_hook(embedding_hook),
                linear.register_forward_hook(linear_hook),
            ]
            try:
                result = original(trainer, checkpoints)
            finally:
                for handle in handles:
                    handle.remove()
            params = [p for p in model.parameters() if p.requires_grad]
            self.seen = {
                "weights": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
                "weights_device": str(params[0].device.type),
                "args_bf16": bool(trainer.args.bf16),
                "forwards": forwards["n"],
                "autocast_forwards": forwards["autocast"],
                "autocast_dtypes": sorted(d.removeprefix("torch.") for d in forwards["dtypes"]),
                "matmul_dtypes": sorted(d.removeprefix("torch.") for d in forwards["matmul"]),
            }
            return result

        return train_resumable


def peak_memory(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS (process)"


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def expect_precision(name: str, seen: dict[str, Any], device: str, bf16: bool) -> None:
    """Mixed precision where `bf16` (CUDA, or `--precision bf16`): float32 weights, every training
    forward under bf16 autocast, the matmuls' outputs bf16. Else float32 throughout, no autocast
    (the trainers' `auto` on the CPU)."""
    if seen.get("weights") != ["float32"]:
        raise CheckFailed(f"{name}: trained weights are {seen.get('weights')}, not float32")
    if seen["weights_device"] != device:
        raise CheckFailed(f"{name}: weights on {seen['weights_device']}, expected {device}")
    if seen["forwards"] == 0:
        raise CheckFailed(f"{name}: no training forward pass was seen")
    if seen["args_bf16"] != bf16:
        raise CheckFailed(f"{name}: the trainer's bf16 is {seen['args_bf16']}, expected {bf16}")
    want = ["bfloat16"] if bf16 else []
    autocast = seen["autocast_forwards"] == (seen["forwards"] if bf16 else 0)
    if not autocast or seen["autocast_dtypes"] != want:
        raise CheckFailed(
            f"{name}: {seen['autocast_forwards']} of {seen['forwards']} training forwards under "
            f"autocast {seen['autocast_dtypes']}, expected {'all in bfloat16' if bf16 else 'none'}"
        )
    if seen["matmul_dtypes"] != (want or ["float32"]):
        raise CheckFailed(f"{name}: matmul outputs {seen['matmul_dtypes']}, expected {want}")


def run_checks(args: argparse.Namespace, workdir: Path) -> list[str]:
    import torch

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckFailed("torch sees no CUDA device (run with --device cpu to check on the CPU)")
    os.environ["EVOLFORGE_HOME"] = str(workdir / "home")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from infra.scoring import IrmScorer, PrmScorer
    from storage.datasets import DatasetStore
    from tasks.evolution.instruction_reward import InstructionReward
    from tasks.training import common
    from tasks.training.common import BaseModelSpec
    from tasks.training.irm import IrmTrainParams, train_irm
    from tasks.training.prm import PrmTrainParams, train_prm
    from tasks.training.rl import RlTrainParams, train_rl
    from tasks.training.sft import SftTrainParams, train_sft

    lines = [
        f"device: {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}; torch "
        f"{torch.__version__}, versions {common.library_versions()}",
        f"model: random Llama, {args.layers} layers x {args.hidden} wide; {args.steps} steps "
        f"per trainer, max_length {args.max_length}, precision {args.precision}",
    ]
    print("\n".join(lines), flush=True)
    base = BaseModelSpec(name=str(make_model(workdir / "model", args.layers, args.hidden)))
    store = DatasetStore(workdir / "home")
    refs = {
        name: store.write(name, frame, stage="gpu_check", code_version="g", params={}).ref
        for name, frame in training_sets().items()
    }
    place = {"device": "cpu"} if device == "cpu" else {}
    # `auto` is what the stages run with: bf16 autocast on a GPU with bf16, fp32 on the CPU.
    bf16 = args.precision == "bf16" or (device == "cuda" and torch.cuda.is_bf16_supported())
    shared = {
        "max_steps": args.steps, "max_length": args.max_length, "eval_rows": 2,
        "precision": args.precision, **place,
    }  # fmt: skip
    reward_place = {"reward_device": device}
    watch = Watch(device)
    common.train_resumable = watch(common.train_resumable)
    results: dict[str, Any] = {}

    def trained(name: str, fn, output: str, **kwargs) -> tuple[Any, Path]:
        reset_peak(device)
        result = fn.run(**kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        stats = result.stats
        steps, seconds = stats.get("steps"), stats.get("train_seconds")
        if steps != args.steps:
            raise CheckFailed(f"{name}: trained {steps} steps, expected {args.steps}")
        expect_precision(name, watch.seen, device, bf16)
        seen = watch.seen
        line = (
            f"{name}: {steps} steps, {steps / seconds:.2f} steps/s, peak {peak_memory(device)}, "
            f"weights {'/'.join(seen['weights'])} on {seen['weights_device']}, autocast "
            f"{'bf16' if seen['autocast_dtypes'] == ['bfloat16'] else 'off'} "
            f"({seen['autocast_forwards']}/{seen['forwards']} forwards, matmuls "
            f"{'/'.join(seen['matmul_dtypes'])}), "
            f"loss/reward last {stats.get('loss_last', stats.get('reward_last'))}"
        )
        print(line, flush=True)
        lines.append(line)
        results[name] = stats
        return result[output], Path(store.version_dir(output, result.version))

    # `Stage.run` runs in process (never through Prefect).
    sft, _ = trained(
        "sft", train_sft, "sft_model", sft_set=refs["sft_set"], base_model=base,
        params=SftTrainParams(**shared),
    )  # fmt: skip
    irm, irm_folder = trained(
        "irm", train_irm, "irm_model", irm_set=refs["irm_set"], base_model=base,
        params=IrmTrainParams(**shared),
    )  # fmt: skip
    prm, prm_folder = trained(
        "prm", train_prm, "prm_model", prm_steps=refs["prm_steps"], base_model=base,
        params=PrmTrainParams(**shared, processbench_limit=0),
    )  # fmt: skip
    rl_params = RlTrainParams(
        **{**shared, "max_length": max(args.max_length, 64), "eval_rows": 1},
        batch_size=2, num_generations=2, sampling={"max_tokens": 16},
        judge_fallback=False, r_i_default=1.0, **reward_place,
    )  # fmt: skip
    trained(
        "grpo", train_rl, "rl_model", rl_prompts=refs["rl_prompts"], sft_model=sft,
        irm_model=irm, prm_model=prm, base_model=base, judge=None, params=rl_params,
    )  # fmt: skip
    if results["grpo"].get("reward_last") is None:
        raise CheckFailed("grpo: no reward was logged (the IRM x PRM reward scored nothing)")

    # Scoring through infra.scoring, where the RL reward and the reward flow load the models.
    expected_dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else None
    frames = training_sets()
    irm_rows, prm_rows = frames["irm_set"], frames["prm_steps"]
    for name, load, score in (
        (
            "irm scoring",
            lambda: IrmScorer.load(irm_folder, device="auto" if device == "cuda" else "cpu"),
            lambda s: InstructionReward(s).scores(
                irm_rows["chosen"].to_list() * 8, irm_rows["parent"].to_list() * 8
            ),
        ),
        (
            "prm scoring",
            lambda: PrmScorer.load(prm_folder, device="auto" if device == "cuda" else "cpu"),
            lambda s: s.step_probabilities(
                prm_rows["prompt"].to_list() * 8, prm_rows["completions"].to_list() * 8
            ),
        ),
    ):
        reset_peak(device)
        scorer = load()
        parameter = next(scorer.model.parameters())
        if parameter.device.type != device:
            raise CheckFailed(f"{name}: the model is on {parameter.device.type}, not {device}")
        dtype = str(parameter.dtype).removeprefix("torch.")
        if expected_dtype is not None and dtype != expected_dtype:
            raise CheckFailed(f"{name}: the model is {dtype}, expected {expected_dtype}")
        start = time.perf_counter()
        scores = score(scorer)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        flat = [v for row in scores for v in (row if isinstance(row, list) else [row])]
        if not flat or any(v is None or not 0.0 <= v <= 1.0 for v in flat):
            raise CheckFailed(f"{name}: scores outside [0, 1] or missing: {flat[:4]}")
        line = (
            f"{name}: {len(scores)} texts in {seconds:.2f} s on {parameter.device.type} in "
            f"{dtype}, peak {peak_memory(device)}"
        )
        print(line, flush=True)
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.meta_path.insert(0, Hide(HIDDEN_MODULES))
    missing = missing_modules()
    if missing:
        print(f"gpu_check FAILED: modules missing: {' '.join(missing)}", flush=True)
        return 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        try:
            run_checks(args, Path(tmp))
        except Exception as exc:  # one line for the caller, the traceback above it
            if not isinstance(exc, CheckFailed):
                traceback.print_exc()
            reason = " ".join(str(exc).split())[:300]
            print(f"gpu_check FAILED: {type(exc).__name__}: {reason}", flush=True)
            return 1
    print(f"gpu_check OK ({args.device}) in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
