"""Supervised fine-tuning (WizardMath step 1, MAmmoTH's hybrid rationales) with trl's SFTTrainer.

The train split of `sft_set` is a prompt-completion dataset, so SFTTrainer computes the loss on
the completion tokens only (`completion_only_loss`, the prompt's labels are -100) and appends
the eos token to each completion, which teaches the model to stop after "The answer is: X".

Final metrics: the train loss (first and last logged values), and on the held-out split (test
rows, by root seed) trl's eval loss and mean token accuracy of the completions.
The checkpoint loads with `AutoModelForCausalLM.from_pretrained(path)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from pydantic import Field

from tasks.stage import Artifact, StageContext, StageOutput, stage
from tasks.training import common, launch
from tasks.training.common import BaseModelSpec, TrainerParams
from tasks.training.launch import LauncherParams


class SftTrainParams(TrainerParams):
    """SFTTrainer on the SFT set."""

    learning_rate: float = Field(2e-5, gt=0)
    max_length: int = Field(512, ge=16, description="tokens per prompt + completion")


def prompt_completion_dataset(rows: pl.DataFrame) -> Any:
    """The rows as trl's prompt-completion dataset (only the two columns trl reads)."""
    from datasets import Dataset

    return Dataset.from_list(rows.select("prompt", "completion").to_dicts())


def eval_metrics(trainer: Any, rows: pl.DataFrame) -> dict[str, Any]:
    if rows.height == 0:
        return {"eval_loss": None, "eval_mean_token_accuracy": None, "eval_rows": 0}
    metrics = trainer.evaluate(eval_dataset=prompt_completion_dataset(rows))
    return {
        "eval_loss": metrics.get("eval_loss"),
        "eval_mean_token_accuracy": metrics.get("eval_mean_token_accuracy"),
        "eval_rows": rows.height,
    }


def fit_sft(
    ctx: Any,
    train: pl.DataFrame,
    test: pl.DataFrame,
    base_path: str,
    params: SftTrainParams,
    checkpoints: str,
    out: str,
) -> launch.Fitted:
    """Train (resumably), evaluate on the held-out rows and save the checkpoint into `out`: in
    the stage's process or in each launched process (`tasks.training.launch`)."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = common.load_tokenizer(base_path)
    model = common.load_model(
        AutoModelForCausalLM, base_path, tokenizer, dtype=common.WEIGHTS_DTYPE
    )
    sizes = common.freeze_below(model, params) | {"threads": common.pick_threads()}
    args = common.training_args(
        SFTConfig,
        params,
        Path(checkpoints),
        max_length=params.max_length,
        completion_only_loss=True,
        packing=False,
    )
    board = common.tensorboard(Path(out))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=prompt_completion_dataset(train),
        processing_class=tokenizer,
        peft_config=common.peft_config(params, "CAUSAL_LM"),
        callbacks=[common.stage_progress(ctx), board],
    )
    run = common.train_resumable(trainer, Path(checkpoints))
    stats = {
        **run,
        **common.first_and_last(trainer.state.log_history, "loss"),
        **eval_metrics(trainer, test),
        **sizes,
    }
    common.close_tensorboard(board)
    saved = common.save_checkpoint(trainer, tokenizer, Path(out))
    return launch.Fitted(stats, model=saved, extra={"tokenizer": tokenizer})


@stage(name="train_sft", outputs={"sft_model": Artifact(kind="model")})
def train_sft(
    ctx: StageContext,
    sft_set: pl.DataFrame,
    base_model: BaseModelSpec,
    params: SftTrainParams,
    launcher: LauncherParams = LauncherParams(),
) -> StageOutput:
    """SFTTrainer on the SFT set's train split (loss on completions only)."""
    train = common.split_rows(sft_set, "train")
    if train.height == 0:
        raise ValueError("sft_set has no rows in its train split: nothing to fine-tune on")
    base = base_model.resolved()
    fitted = launch.fit(
        fit_sft,
        ctx,
        "sft_model",
        launcher,
        train=train,
        test=common.split_rows(sft_set, "test", params.eval_rows),
        base_path=base.path,
        params=params,
        checkpoints=str(ctx.work_dir("sft_model") / common.CHECKPOINTS),
        out=str(ctx.output_dir("sft_model")),
    )
    return StageOutput(
        stats={
            **fitted.stats,
            "train_rows": train.height,
            "base_model": base.identity,
            "versions": common.library_versions(),
            "load": "AutoModelForCausalLM.from_pretrained(path)",
        }
    )
