"""The instruction reward model (IRM, WizardMath step 3) with trl's RewardTrainer.

Each `irm_set` row pairs two evolutions of one parent, the better one `chosen`; `prompt` is the
rendered parent (`formats.irm_prompt`), which RewardTrainer puts before both sides. The margin
column goes into the loss (`-log σ(r_chosen - r_rejected - margin)`) when `use_margin` is on;
by default only pairs whose ranking was consistent across the judge's two orders are used.

Final metrics: held-out pairwise accuracy (test pairs where the chosen side scores higher,
`pairwise_accuracy`), the same on the train pairs, and the loss curve's ends.
The checkpoint loads with `AutoModelForSequenceClassification.from_pretrained(path)` (one logit);
`tasks.evolution.instruction_reward.InstructionReward` scores instructions with it (the model
runs in `infra.scoring.IrmScorer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from pydantic import Field

from infra.scoring import IrmScorer
from tasks.evolution.instruction_reward import InstructionReward
from tasks.stage import Artifact, StageContext, StageOutput, stage
from tasks.training import common, launch
from tasks.training.common import BaseModelSpec, TrainerParams
from tasks.training.launch import LauncherParams


class IrmTrainParams(TrainerParams):
    """RewardTrainer on the IRM pairs."""

    consistent_only: bool = Field(True, description="train on consistently ranked pairs only")
    use_margin: bool = Field(True, description="the margin column enters the loss")
    margin_scale: float = Field(1.0, ge=0, description="margins are multiplied by this")


# Tokens kept free under max_length: special tokens, and re-tokenising decoded text may differ.
FIT_SLACK = 8


def fit_pairs(rows: pl.DataFrame, tokenizer: Any, max_length: int) -> pl.DataFrame:
    """Shorten pairs to fit `max_length` tokens instead of losing them: trl's RewardTrainer drops
    every pair longer than that. Each evolution keeps its beginning (up to half the budget
    when both do not fit) and the prompt keeps its end, where the evolution follows."""
    budget = max(16, max_length - FIT_SLACK)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = []
    for row in rows.to_dicts():
        prompt, chosen, rejected = ids(row["prompt"]), ids(row["chosen"]), ids(row["rejected"])
        if len(prompt) + max(len(chosen), len(rejected)) > budget:
            room = max(budget - len(prompt), budget // 2)
            chosen, rejected = chosen[:room], rejected[:room]
            keep = budget - max(len(chosen), len(rejected))
            prompt = prompt[-keep:] if keep > 0 else []
            row |= {
                "prompt": tokenizer.decode(prompt),
                "chosen": tokenizer.decode(chosen),
                "rejected": tokenizer.decode(rejected),
            }
        out.append(row)
    return pl.DataFrame(out, schema=rows.schema) if out else rows


def preference_dataset(
    rows: pl.DataFrame, params: IrmTrainParams, tokenizer: Any | None = None
) -> Any:
    """trl's preference format with an explicit prompt (and a margin column when used); with a
    tokenizer, pairs are shortened to fit `max_length` (see `fit_pairs`)."""
    from datasets import Dataset

    if tokenizer is not None and params.max_length:
        rows = fit_pairs(rows, tokenizer, params.max_length)
    columns = [pl.col("prompt"), pl.col("chosen"), pl.col("rejected")]
    if params.use_margin:
        columns.append((pl.col("margin").fill_null(0.0) * params.margin_scale).alias("margin"))
    return Dataset.from_list(rows.select(columns).to_dicts())


def pairwise_accuracy(scorer: InstructionReward, pairs: pl.DataFrame) -> float | None:
    """The share of pairs whose chosen evolution scores above the rejected one."""
    if pairs.height == 0:
        return None
    parents = pairs["parent"].to_list()
    chosen = scorer.logits(pairs["chosen"].to_list(), parents)
    rejected = scorer.logits(pairs["rejected"].to_list(), parents)
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / pairs.height


def training_pairs(irm_set: pl.DataFrame, params: IrmTrainParams, side: str) -> pl.DataFrame:
    rows = common.split_rows(irm_set, side)
    if params.consistent_only:
        rows = rows.filter(pl.col("consistent").fill_null(False))
    return rows


def fit_irm(
    ctx: Any,
    train: pl.DataFrame,
    base_path: str,
    params: IrmTrainParams,
    checkpoints: str,
    out: str,
) -> launch.Fitted:
    """Train (resumably) and save the checkpoint into `out`: in the stage's process or in each
    launched process (`tasks.training.launch`)."""
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tokenizer = common.load_tokenizer(base_path)
    model = common.load_model(
        AutoModelForSequenceClassification,
        base_path,
        tokenizer,
        dtype=common.WEIGHTS_DTYPE,
        num_labels=1,
    )
    sizes = common.freeze_below(model, params) | {"threads": common.pick_threads()}
    args = common.training_args(
        RewardConfig, params, Path(checkpoints), max_length=params.max_length, disable_dropout=True
    )
    board = common.tensorboard(Path(out))
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=preference_dataset(train, params, tokenizer),
        processing_class=tokenizer,
        peft_config=common.peft_config(params, "SEQ_CLS"),
        callbacks=[common.stage_progress(ctx), board],
    )
    run = common.train_resumable(trainer, Path(checkpoints))
    common.close_tensorboard(board)
    saved = common.save_checkpoint(trainer, tokenizer, Path(out))
    history = trainer.state.log_history
    stats = {
        **run,
        **common.first_and_last(history, "loss"),
        **common.first_and_last(history, "accuracy"),
        **sizes,
    }
    return launch.Fitted(stats, model=saved, extra={"tokenizer": tokenizer})


@stage(name="train_irm", outputs={"irm_model": Artifact(kind="model")})
def train_irm(
    ctx: StageContext,
    irm_set: pl.DataFrame,
    base_model: BaseModelSpec,
    params: IrmTrainParams,
    launcher: LauncherParams = LauncherParams(),
) -> StageOutput:
    """RewardTrainer on the IRM pairs (margin in the loss); held-out pairwise accuracy."""
    from transformers import AutoModelForSequenceClassification

    train = training_pairs(irm_set, params, "train")
    if train.height == 0:
        raise ValueError(
            "irm_set has no train pairs"
            + (" that were ranked consistently" if params.consistent_only else "")
            + ": nothing to train the IRM on"
        )
    base = base_model.resolved()
    out = ctx.output_dir("irm_model")
    fitted = launch.fit(
        fit_irm,
        ctx,
        "irm_model",
        launcher,
        train=train,
        base_path=base.path,
        params=params,
        checkpoints=str(ctx.work_dir("irm_model") / common.CHECKPOINTS),
        out=str(out),
    )
    model, tokenizer = common.trained(fitted, AutoModelForSequenceClassification, out, params)
    scorer = InstructionReward(IrmScorer(model, tokenizer, params.max_length, params.batch_size))
    test = training_pairs(irm_set, params, "test").head(params.eval_rows)
    return StageOutput(
        stats={
            **fitted.stats,
            "pairwise_accuracy": pairwise_accuracy(scorer, test),
            "train_pairwise_accuracy": pairwise_accuracy(scorer, train.head(params.eval_rows)),
            "eval_pairs": test.height,
            "train_rows": train.height,
            "base_model": base.identity,
            "versions": common.library_versions(),
            "load": "AutoModelForSequenceClassification.from_pretrained(path)",
        }
    )
