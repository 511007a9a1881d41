"""What the trainers share: parameters, the base model, device and precision, crash-safe
training that resumes from the last checkpoint, progress, and the checkpoint folder.

**Crash safety.** A training stage writes checkpoints every `checkpoint_steps` optimizer steps
into `ctx.work_dir(<output>)/checkpoints` (model, optimizer, scheduler, RNG and trainer state),
which survives a crash of the process. `train_resumable` resumes from the newest *complete*
checkpoint (transformers writes `trainer_state.json` last; a folder without it was cut off by the
crash and is removed). The final model goes to `ctx.output_dir(<output>)`, and the stage
machinery turns that folder into an immutable version only when the body returns: a killed run
leaves no version, and its rerun (same version id) picks the checkpoints up.

**Device and precision.** Mixed precision, as trl and accelerate run it: the weights are loaded
in float32 everywhere (`WEIGHTS_DTYPE`), so the optimizer updates a float32 master copy and keeps
float32 states, and `bf16=True` autocasts the forward and backward matmuls to bf16. Loading the
weights in bf16 instead loses small updates: bf16 keeps 8 significant bits, so at lr 1e-6 an
update is below half a unit in the last place of most weights and rounds away. `precision="auto"`
is bf16 autocast on a GPU that supports bf16 and float32 on the CPU (`use_cpu`, bf16 off);
`device="cpu"` forces the CPU, `precision="bf16"` forces autocast (on the CPU too). Why not bf16
autocast on a CPU with native bf16: the CPU rule (`infra.engines.cpu.choose_dtype`) picks bf16 for
*decoding* with weights stored in bf16, where halving the bytes read per token is the gain;
autocast keeps float32 weights and casts each one to bf16 at every matmul, forward and backward,
so that gain is not there to take, and on the CPUs without native bf16 the same rule says bf16 is
about three times slower. The cost on a GPU is memory: float32 weights, gradients and two AdamW
states take 16 bytes a parameter (a 7B model: about 112 GB before activations), so a large model
trains sharded over several GPUs, or with `lora`.

**Progress.** `StageProgress` (a TrainerCallback) turns the trainer's steps into the stage's
Prefect progress artifact; the CLI shows transformers' own tqdm bar.

**Several processes.** `training.launcher.processes` > 1 trains in that many processes started
through accelerate (`tasks.training.launch`); the functions here work in either mode: only the
main process writes the checkpoint and the TensorBoard events, and each process takes its share
of the CPUs' threads.

**The checkpoint folder** holds what `save_pretrained` writes (loadable with the matching
`AutoModelFor...from_pretrained(path)`), the tokenizer, `training_log.json` (the trainer's log
history: the loss and reward curves) and `logs/` (the same metrics as TensorBoard event files:
`tensorboard --logdir <folder>/logs`). The last two record how the run went, not what the
model is: they stay out of the folder's identity (`infra.models.RUN_RECORDS`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from infra.models import TENSORBOARD_DIR, TRAINING_LOG
from infra.scoring import load_model, load_tokenizer

__all__ = ["TENSORBOARD_DIR", "TRAINING_LOG", "load_model", "load_tokenizer"]

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"


class LoraParams(BaseModel):
    """LoRA adapters through peft (merged into the weights before the checkpoint is stored)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


class TrainerParams(BaseModel):
    """Settings every trainer has. `checkpoint_steps` and `keep_checkpoints` only decide where
    a crashed run resumes from, so they are not part of the version."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_steps: int = Field(8, ge=1, description="optimizer steps")
    learning_rate: float = Field(1e-5, gt=0)
    batch_size: int = Field(2, ge=1, description="rows per device and step")
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(256, ge=16, description="tokens per training sequence")
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto: fp32 on CPU, bf16 autocast on a GPU that has it (weights and "
        "optimizer states stay float32 either way)",
    )
    device: Literal["auto", "cpu"] = "auto"
    gradient_checkpointing: bool = False
    lora: LoraParams | None = Field(None, description="train LoRA adapters (needs peft)")
    train_top_layers: int | None = Field(
        None,
        ge=1,
        description="train only the top N transformer layers (+ final norm and a new head); "
        "None trains every weight. A CPU knob: the backward pass stops at layer N",
    )
    eval_rows: int = Field(64, ge=0, description="held-out rows scored for the final metrics")
    logging_steps: int = Field(1, ge=1)
    seed: int = 0
    # Crash safety (not part of the version).
    checkpoint_steps: int = Field(50, ge=1, description="save a resumable checkpoint this often")
    keep_checkpoints: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _one_way_to_train_less(self) -> TrainerParams:
        if self.lora is not None and self.train_top_layers is not None:
            raise ValueError("set lora or train_top_layers, not both")
        return self

    def fingerprint(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"checkpoint_steps", "keep_checkpoints"})


class BaseModelSpec(BaseModel):
    """The base model every trainer starts from: None is the embedded SmolLM2-135M-Instruct
    (its converted HF folder), else a local folder or a hub id. Its identity (weights checksum
    or hub revision) goes into the version, not its path."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None

    def resolved(self):
        from infra.models import resolve_model

        return resolve_model(self.name)

    def fingerprint(self) -> dict[str, Any]:
        return {"model": self.resolved().identity}


# -- device, precision, arguments ---------------------------------------------------------------


# The weights, and so the optimizer's master copy and states, are float32 on every device: bf16
# is autocast (`device_settings`), never the storage type of what the optimizer updates.
WEIGHTS_DTYPE = "float32"


def device_settings(params: TrainerParams) -> dict[str, Any]:
    """`use_cpu`/`bf16`/`fp16` for transformers' TrainingArguments: `bf16=True` is mixed
    precision (autocast over float32 weights), on a GPU that supports bf16 under `auto`."""
    import torch

    cuda = params.device != "cpu" and torch.cuda.is_available()
    if params.precision == "bf16":
        bf16 = True
    elif params.precision == "fp32":
        bf16 = False
    else:
        bf16 = cuda and torch.cuda.is_bf16_supported()
    return {"use_cpu": not cuda, "bf16": bf16, "fp16": False}


def training_args(config_cls: type, params: TrainerParams, output_dir: Path, **extra: Any) -> Any:
    """A trl/transformers config for `params`, checkpointing into `output_dir`."""
    values: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": params.max_steps,
        "per_device_train_batch_size": params.batch_size,
        "per_device_eval_batch_size": params.batch_size,
        "gradient_accumulation_steps": params.grad_accum,
        "learning_rate": params.learning_rate,
        "lr_scheduler_type": params.lr_scheduler,
        "warmup_steps": params.warmup_steps,
        "weight_decay": params.weight_decay,
        "logging_steps": params.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": params.checkpoint_steps,
        "save_total_limit": params.keep_checkpoints,
        "eval_strategy": "no",
        "report_to": "none",
        "seed": params.seed,
        "data_seed": params.seed,
        "activation_checkpointing": params.gradient_checkpointing,
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        **device_settings(params),
    }
    values.update(extra)
    return config_cls(**values)


def peft_config(params: TrainerParams, task_type: str) -> Any:
    """A peft LoraConfig, or None; a clear error when peft is missing."""
    if params.lora is None:
        return None
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise RuntimeError("training.*.lora needs the peft package: pip install peft") from exc
    return LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=list(params.lora.target_modules),
        task_type=task_type,
    )


def world_size() -> int:
    """The processes training one model (`WORLD_SIZE`, set by the launcher; 1 in process)."""
    import os

    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def is_main_process() -> bool:
    """Rank 0 of a launched training, or the one process of an in-process one."""
    import os

    return int(os.environ.get("RANK", "0") or 0) == 0


def pick_threads() -> int:
    """torch's threads for a training stage, decided as the embedded engine decides them: one
    when other processes keep half a core busy (every small op would otherwise wait for the
    descheduled second thread), every usable CPU otherwise; each of several launched processes
    takes its share."""
    import torch

    from infra.engines.cpu import contended_threads

    torch.set_num_threads(max(1, contended_threads() // world_size()))
    return torch.get_num_threads()


def freeze_below(model: Any, params: TrainerParams) -> dict[str, int]:
    """With `train_top_layers`, freeze everything but the top N decoder layers, the final norm
    and a classification head (`score`); the counts of trainable and all parameters."""
    if params.train_top_layers is not None:
        base = model.base_model
        layers = getattr(base, "layers", None)
        if layers is None:
            raise ValueError(
                f"train_top_layers: {type(model).__name__} has no decoder layer list to freeze"
            )
        for parameter in model.parameters():
            parameter.requires_grad = False
        keep = [*layers[-params.train_top_layers :], getattr(base, "norm", None)]
        keep.append(getattr(model, "score", None))
        for module in keep:
            if module is not None:
                for parameter in module.parameters():
                    parameter.requires_grad = True
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "params": sum(p.numel() for p in model.parameters())}


# -- crash-safe training --------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint with its trainer state written (transformers writes it last);
    folders cut off by a crash are removed so that the trainer never rotates onto them."""
    if not folder.is_dir():
        return None
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[11:].isdigit()
    ]
    complete = []
    for path in found:
        if (path / TRAINER_STATE).is_file():
            complete.append(path)
        else:
            log.warning("removing checkpoint %s cut off by a crash", path)
            shutil.rmtree(path, ignore_errors=True)
    return max(complete, key=checkpoint_step) if complete else None


def train_resumable(trainer: Any, checkpoints: Path) -> dict[str, Any]:
    """Train, resuming from the newest complete checkpoint in `checkpoints` when there is one."""
    last = last_complete_checkpoint(checkpoints)
    if last is not None:
        log.info("resuming %s from %s", type(trainer).__name__, last)
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    return {
        "steps": int(trainer.state.global_step),
        "processes": int(trainer.args.world_size),  # the processes that trained, as torch saw them
        "resumed_from_step": checkpoint_step(last) if last else None,
        "train_loss": _finite(result.training_loss),
        "train_seconds": _finite(result.metrics.get("train_runtime")),
    }


def stage_progress(ctx: Any) -> Any:
    """A TrainerCallback reporting steps as the stage's Prefect progress artifact."""
    from transformers import TrainerCallback

    class StageProgress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ctx.progress(
                state.global_step,
                state.max_steps,
                f"{ctx.name}: step {state.global_step} of {state.max_steps}",
            )

    return StageProgress()


def tensorboard(folder: Path) -> Any:
    """A TrainerCallback writing the trainer's logs (loss, learning rate, rewards, eval) as
    TensorBoard event files into `folder / logs` (the main process only)."""
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(Path(folder) / TENSORBOARD_DIR)
    return callback


def close_tensorboard(callback: Any) -> None:
    """Flush and close the event files (a log after training, e.g. SFT's eval loss, reopens
    them): nothing may write into the folder once it becomes a version."""
    if callback.tb_writer is not None:
        callback.tb_writer.close()
        callback.tb_writer = None


def save_checkpoint(trainer: Any, tokenizer: Any, folder: Path) -> Any:
    """The trained model (LoRA adapters merged) + tokenizer + log history into `folder` (by the
    main process: launched ranks other than 0 write nothing); the model is returned for the
    final metrics."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if not trainer.is_world_process_zero():
        return model
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / TRAINING_LOG).write_text(
        json.dumps(trainer.state.log_history, indent=1, default=str), encoding="utf-8"
    )
    return model


def trained(fitted: Any, auto_cls: Any, folder: Path, params: TrainerParams, **tokens: Any) -> Any:
    """(model, tokenizer) for the final metrics: the model trained in this process, or the
    checkpoint launched processes saved into `folder`, loaded as they trained it (float32 on
    the trainer's device)."""
    if fitted.model is not None:
        return fitted.model, fitted.extra["tokenizer"]
    tokenizer = load_tokenizer(str(folder), **tokens)
    device = "cpu" if device_settings(params)["use_cpu"] else "cuda"
    model = load_model(auto_cls, str(folder), tokenizer, dtype=WEIGHTS_DTYPE, device=device)
    return model, tokenizer


def read_training_log(folder: Path) -> list[dict[str, Any]]:
    path = Path(folder) / TRAINING_LOG
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def curve(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of a logged quantity, in step order."""
    points = [
        (int(h.get("step", 0)), h[key]) for h in history if isinstance(h.get(key), int | float)
    ]
    return [(s, float(v)) for s, v in points if math.isfinite(v)]


def first_and_last(history: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    points = curve(history, key)
    return {
        f"{key}_first": points[0][1] if points else None,
        f"{key}_last": points[-1][1] if points else None,
    }


def library_versions() -> dict[str, str]:
    import torch
    import transformers
    import trl

    return {
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def split_rows(frame: Any, side: str, limit: int | None = None) -> Any:
    """The rows of one split (`train`/`test`), at most `limit`."""
    import polars as pl

    part = frame.filter(pl.col("split") == side)
    return part.head(limit) if limit is not None else part


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
