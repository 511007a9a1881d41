"""The process reward model (PRM): a token classifier that says, step by step, whether a solution
is still correct (WizardMath's PRM; Math-Shepherd's placement of the label).

trl 1.16 has no PRM trainer (it was removed in 1.14), so this is a small one on transformers:
`AutoModelForTokenClassification` with two labels (0 wrong, 1 correct) on the base model, and a
collator (`PrmCollator`) that renders prompt + steps (`infra.scoring.join_steps`), puts each
step's label on the token holding the step's last visible character and IGNORE (-100) on every
other token, so the cross-entropy of transformers' token-classification head is the PRM loss.
A step whose label is null (not judged) is ignored, not counted as wrong.

Final metrics (the stage's stats, the `models` view's `metrics`):
- `step_accuracy`: held-out steps (`prm_steps` rows of the test split) predicted right
  (P(correct) >= 0.5 vs the label), with `step_accuracy_wrong`: the same on the wrong steps only;
- `first_error_f1` (+ `acc_erroneous`, `acc_correct`): ProcessBench's harmonic mean on the
  ProcessBench-like items of the reward flow (`tasks.rewards.processbench`): the predicted first
  error (first step under 0.5) must equal the corrupted step, or be "none" on an untouched one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import Field

from infra.scoring import IGNORE, PrmScorer, encode_steps
from tasks.stage import Artifact, StageContext, StageOutput, stage
from tasks.training import common, formats, launch
from tasks.training.common import BaseModelSpec, TrainerParams
from tasks.training.launch import LauncherParams

log = logging.getLogger(__name__)

ID2LABEL = {0: "wrong", 1: "correct"}


class PrmTrainParams(TrainerParams):
    """The PRM trainer (a token classifier on the base model)."""

    learning_rate: float = Field(2e-5, gt=0)
    processbench_limit: int = Field(
        32, ge=0, description="ProcessBench-like items scored for first-error F1 (0: skip)"
    )
    processbench_seed: int = 0
    threshold: float = Field(0.5, gt=0, lt=1, description="a step under it is predicted wrong")


class PrmCollator:
    """Examples {prompt, completions (steps), labels} → a padded token-classification batch."""

    def __init__(self, tokenizer: Any, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def encode(self, example: dict[str, Any]) -> dict[str, Any]:
        return encode_steps(
            self.tokenizer,
            example["prompt"],
            example["completions"],
            example["labels"],
            self.max_length,
        )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        encoded = [self.encode(e) for e in examples]
        width = max(len(e["input_ids"]) for e in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(e["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def step_accuracy(scorer: PrmScorer, rows: pl.DataFrame, threshold: float = 0.5) -> dict[str, Any]:
    """Held-out step accuracy: P(correct) >= threshold against each labelled step."""
    if rows.height == 0:
        return {"step_accuracy": None, "step_accuracy_wrong": None, "eval_steps": 0}
    probs = scorer.step_probabilities(rows["prompt"].to_list(), rows["completions"].to_list())
    right = total = wrong_right = wrong_total = 0
    for labels, ps in zip(rows["labels"].to_list(), probs, strict=True):
        for label, p in zip(labels, ps, strict=True):
            if label is None or p is None:
                continue
            total += 1
            hit = (p >= threshold) == label
            right += hit
            if not label:
                wrong_total += 1
                wrong_right += hit
    return {
        "step_accuracy": right / total if total else None,
        "step_accuracy_wrong": wrong_right / wrong_total if wrong_total else None,
        "eval_steps": total,
    }


def first_error_scores(
    scorer: PrmScorer, items: pl.DataFrame, threshold: float = 0.5, trigger: str | None = None
) -> dict[str, Any]:
    """ProcessBench's figures for the PRM's predicted first errors on `items`
    (id, problem, steps, label)."""
    from tasks.rewards.processbench import processbench_scores

    prompts = [formats.alpaca_prompt(p, trigger or formats.COT_TRIGGER) for p in items["problem"]]
    predictions = scorer.first_errors(prompts, items["steps"].to_list(), threshold)
    return processbench_scores(items["label"].to_list(), predictions)


def processbench_metrics(scorer: PrmScorer, params: PrmTrainParams) -> dict[str, Any]:
    if params.processbench_limit == 0:
        return {"first_error_f1": None, "processbench_note": "skipped (processbench_limit 0)"}
    try:
        from tasks.rewards.processbench import processbench_items
    except ImportError as exc:  # the reward flow's module is not installed with this checkout
        log.warning("no ProcessBench-like items: %s", exc)
        return {"first_error_f1": None, "processbench_note": f"unavailable: {exc}"}
    items = processbench_items(params.processbench_limit, params.processbench_seed)
    scores = first_error_scores(scorer, items, params.threshold)
    return {
        "first_error_f1": scores["f1"],
        "acc_erroneous": scores["acc_erroneous"],
        "acc_correct": scores["acc_correct"],
        "processbench_items": items.height,
    }


def prm_dataset(rows: pl.DataFrame) -> Any:
    from datasets import Dataset

    return Dataset.from_list(rows.select("prompt", "completions", "labels").to_dicts())


def fit_prm(
    ctx: Any,
    train: pl.DataFrame,
    base_path: str,
    params: PrmTrainParams,
    checkpoints: str,
    out: str,
) -> launch.Fitted:
    """Train (resumably) and save the checkpoint into `out`: in the stage's process or in each
    launched process (`tasks.training.launch`)."""
    from transformers import AutoModelForTokenClassification, Trainer, TrainingArguments

    tokenizer = common.load_tokenizer(base_path)
    model = common.load_model(
        AutoModelForTokenClassification,
        base_path,
        tokenizer,
        dtype=common.WEIGHTS_DTYPE,
        num_labels=2,
        id2label=ID2LABEL,
        label2id={v: k for k, v in ID2LABEL.items()},
    )
    sizes = common.freeze_below(model, params) | {"threads": common.pick_threads()}
    lora = common.peft_config(params, "TOKEN_CLS")
    if lora is not None:  # peft trains the new head ("score") in full next to the adapters
        from peft import get_peft_model

        model = get_peft_model(model, lora)
    args = common.training_args(
        TrainingArguments, params, Path(checkpoints), remove_unused_columns=False
    )
    board = common.tensorboard(Path(out))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=prm_dataset(train),
        data_collator=PrmCollator(tokenizer, params.max_length),
        processing_class=tokenizer,
        callbacks=[common.stage_progress(ctx), board],
    )
    run = common.train_resumable(trainer, Path(checkpoints))
    common.close_tensorboard(board)
    saved = common.save_checkpoint(trainer, tokenizer, Path(out))
    stats = {**run, **common.first_and_last(trainer.state.log_history, "loss"), **sizes}
    return launch.Fitted(stats, model=saved, extra={"tokenizer": tokenizer})


@stage(name="train_prm", outputs={"prm_model": Artifact(kind="model")})
def train_prm(
    ctx: StageContext,
    prm_steps: pl.DataFrame,
    base_model: BaseModelSpec,
    params: PrmTrainParams,
    launcher: LauncherParams = LauncherParams(),
) -> StageOutput:
    """A token-classification PRM on the labelled steps; held-out step accuracy and F1."""
    from transformers import AutoModelForTokenClassification

    train = common.split_rows(prm_steps, "train")
    if train.height == 0:
        raise ValueError("prm_steps has no rows in its train split: nothing to train the PRM on")
    base = base_model.resolved()
    out = ctx.output_dir("prm_model")
    fitted = launch.fit(
        fit_prm,
        ctx,
        "prm_model",
        launcher,
        train=train,
        base_path=base.path,
        params=params,
        checkpoints=str(ctx.work_dir("prm_model") / common.CHECKPOINTS),
        out=str(out),
    )
    model, tokenizer = common.trained(fitted, AutoModelForTokenClassification, out, params)
    scorer = PrmScorer(model, tokenizer, params.max_length, params.batch_size)
    return StageOutput(
        stats={
            **fitted.stats,
            **step_accuracy(
                scorer, common.split_rows(prm_steps, "test", params.eval_rows), params.threshold
            ),
            **processbench_metrics(scorer, params),
            "train_rows": train.height,
            "base_model": base.identity,
            "versions": common.library_versions(),
            "load": "AutoModelForTokenClassification.from_pretrained(path)",
        }
    )
