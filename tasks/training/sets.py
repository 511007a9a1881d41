"""Training sets: SFT (prompt → completion), IRM pairs, PRM steps and RL prompts, each a
versioned dataset with a held-out split by root seed.

- `sft_set` (stage `build_sft_set`): WizardMath's Alpaca prompt and a step-by-step answer ending
  "The answer is: X", in trl's prompt-completion format (SFTTrainer then computes the loss on the
  completion only). Rows come from the seeds' SFT answers (`sft_answers`) and from evolved
  instructions whose majority answer is verified (`answers.verified`), with a solution in the
  majority group (`solutions.verdict`). Each instruction gets one rationale: program-of-thought
  with probability `pot_ratio` (MAmmoTH's hybrid; its prompt carries "Let's write a program."),
  chain-of-thought otherwise; when the drawn kind has no usable rationale the other is taken.
- `irm_set` (`build_irm_set`): the reward flow's `irm_pairs` with the IRM prompt rendered
  (`formats.irm_prompt`: the parent instruction), ready for trl's RewardTrainer (`prompt`,
  `chosen`, `rejected`, `margin`), and the root seed of each pair.
- `prm_steps` (`build_prm_steps`): one row per labelled solution in trl's stepwise-supervision
  layout (`prompt`, `completions` = the steps, `labels` = one bool per step, null where the
  labeller could not judge). The labeller is configurable: the reward flow's `consensus` label
  by default, or `judge`, `mc_hard`, `mc_soft` (>= a threshold).
- `rl_prompts` (`build_rl_prompts`): the Alpaca prompt of every seed (label: the reference
  answer) and of every evolved instruction with a verified majority answer (label: that
  pseudo-label), with the instruction, its parent (what the IRM reads) and the judge's rI from
  the `rewards` dataset where there is one.

The split: `formats.held_out_roots` over every root seed of `instructions`, so each set draws the
same line and no seed's lineage is on both sides. `split` is "train" or "test" on every row.

Counts reconcile: each stage's stats say how many candidates it saw and, per reason, how many it
left out, next to the rows per split and kind.
"""

from __future__ import annotations

from typing import Any, Literal

import polars as pl
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.frames import require_columns
from tasks.stage import StageOutput, stage
from tasks.training import formats
from tasks.training.records import IrmExample, PrmExample, RlPrompt, SftExample

TRAIN, TEST = "train", "test"


class SplitParams(BaseModel):
    """The held-out split, by root seed (shared by every training set)."""

    model_config = ConfigDict(extra="forbid")

    test_fraction: float = Field(
        0.1, ge=0, le=1, description="share of root seeds whose whole lineage is held out"
    )
    seed: int = Field(0, description="seed of the hash that places a root seed")


class SftSetParams(BaseModel):
    """The SFT set: which rationales, and the CoT/PoT mix."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    pot_ratio: float = Field(
        0.25, ge=0, le=1, description="share of instructions whose rationale is a program"
    )
    cot_trigger: str = Field(formats.COT_TRIGGER, description="appended to CoT prompts")
    pot_trigger: str = Field(formats.POT_TRIGGER, description="appended to PoT prompts")
    require_stop: bool = Field(
        True, description="leave out CoT solutions cut off by the token limit"
    )
    seed: int = 0


class IrmSetParams(BaseModel):
    """The IRM pairs as a training set."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True


Labeller = Literal["consensus", "judge", "mc_hard", "mc_soft"]


class PrmStepsParams(BaseModel):
    """The PRM steps: which step label the PRM learns."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    labeller: Labeller = Field("consensus", description="which column of step_labels is the label")
    mc_threshold: float = Field(
        0.5, ge=0, le=1, description="mc_soft labeller: a step is correct at this share or more"
    )
    include_pot: bool = Field(
        False, description="also PoT outcome rows (one step: the program); the policy writes CoT"
    )
    cot_trigger: str = formats.COT_TRIGGER
    pot_trigger: str = formats.POT_TRIGGER


class RlPromptsParams(BaseModel):
    """The RL prompts: which instructions, with which label."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    include_seeds: bool = Field(True, description="seeds, labelled by their reference answer")
    include_evolved: bool = Field(
        True, description="evolved instructions, labelled by their verified majority answer"
    )
    cot_trigger: str = formats.COT_TRIGGER


class TrainingSetParams(BaseModel):
    """The training sets built from the data and reward datasets."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="build the training sets (the factory skips them when off)"
    )
    split: SplitParams = Field(
        default_factory=SplitParams, description="held-out share, drawn by root seed"
    )
    sft: SftSetParams = Field(default_factory=SftSetParams, description="the SFT set (CoT/PoT mix)")
    irm: IrmSetParams = Field(default_factory=IrmSetParams, description="IRM preference pairs")
    prm: PrmStepsParams = Field(default_factory=PrmStepsParams, description="PRM steps and labels")
    rl: RlPromptsParams = Field(default_factory=RlPromptsParams, description="RL prompts")


# -- shared ------------------------------------------------------------------------------------


def _instruction_table(instructions: pl.DataFrame) -> pl.DataFrame:
    require_columns(instructions, ["id", "parent_id", "root_id", "round", "text"], "instructions")
    return instructions.unique("id", keep="first", maintain_order=True).select(
        pl.col("id").alias("instruction_id"), "parent_id", "root_id", "round", "text"
    )


def held_out_for(instructions: pl.DataFrame, split: SplitParams) -> frozenset[str]:
    """The held-out root seeds: drawn over every root of the instructions (see formats)."""
    require_columns(instructions, ["root_id"], "instructions")
    return formats.held_out_roots(
        instructions["root_id"].drop_nulls().to_list(), split.test_fraction, split.seed
    )


def _split_column(roots: frozenset[str]) -> pl.Expr:
    return (
        pl.when(pl.col("root_id").is_in(list(roots)))
        .then(pl.lit(TEST))
        .otherwise(pl.lit(TRAIN))
        .alias("split")
    )


def split_stats(frame: pl.DataFrame, by: str | None = None) -> dict[str, Any]:
    """Rows and root seeds per split (and per `by` value): what the run summary shows."""
    stats: dict[str, Any] = {"rows": frame.height}
    for side in (TRAIN, TEST):
        part = frame.filter(pl.col("split") == side)
        stats[side] = part.height
        stats[f"{side}_roots"] = part["root_id"].n_unique() if part.height else 0
    if by is not None and frame.height:
        stats[f"by_{by}"] = {
            str(k): int(v) for k, v in frame.group_by(by).len().sort(by).iter_rows()
        }
    return stats


def _draw(key: str, seed: int) -> float:
    return formats._unit_hash(key, seed)


# -- sft_set -----------------------------------------------------------------------------------


def sft_set_frame(
    instructions: pl.DataFrame,
    answers: pl.DataFrame | None,
    solutions: pl.DataFrame | None,
    seeds: pl.DataFrame,
    sft_answers: pl.DataFrame | None,
    params: SftSetParams,
    held_out: frozenset[str],
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The SFT rows (`SftExample`) and the counts of what was left out, by reason."""
    require_columns(seeds, ["id", "question", "answer"], "seeds")
    table = _instruction_table(instructions)
    references = {
        r["id"]: r["answer"]
        for r in seeds.select("id", "answer").to_dicts()
        if r["answer"] and r["answer"].strip()
    }
    labels: dict[str, tuple[str, bool, bool | None]] = {}  # answer, verified, reference_match
    if answers is not None:
        require_columns(answers, ["instruction_id", "answer", "verified"], "answers")
        cols = ["instruction_id", "answer", "verified"]
        has_match = "reference_match" in answers.columns
        for r in answers.select(cols + (["reference_match"] if has_match else [])).to_dicts():
            labels[r["instruction_id"]] = (
                r["answer"],
                bool(r["verified"]),
                r.get("reference_match"),
            )
    cot: dict[str, tuple[str, str]] = {}  # instruction -> (solution id, text)
    pot: dict[str, tuple[str, str]] = {}  # instruction -> (solution id, program)
    if solutions is not None and solutions.height:
        require_columns(
            solutions,
            ["id", "instruction_id", "kind", "sample", "text", "program", "program_error"],
            "solutions",
        )
        require_columns(solutions, ["verdict", "extracted_answer", "finish_reason"], "solutions")
        ordered = solutions.sort("instruction_id", "sample")
        good_cot = (
            (pl.col("kind") != "pot")
            & pl.col("verdict").fill_null(False)
            & pl.col("text").is_not_null()
            & pl.col("extracted_answer").is_not_null()
        )
        if params.require_stop:
            good_cot = good_cot & (pl.col("finish_reason") == "stop")
        for r in ordered.filter(good_cot).unique("instruction_id", keep="first").to_dicts():
            cot[r["instruction_id"]] = (r["id"], r["text"])
        good_pot = (
            (pl.col("kind") == "pot")
            & pl.col("verdict").fill_null(False)
            & pl.col("program").is_not_null()
            & pl.col("program_error").is_null()
        )
        for r in ordered.filter(good_pot).unique("instruction_id", keep="first").to_dicts():
            pot[r["instruction_id"]] = (r["id"], r["program"])
    seed_answers: dict[str, str] = {}
    if sft_answers is not None:
        require_columns(sft_answers, ["seed_id", "solution"], "sft_answers")
        for r in sft_answers.filter(pl.col("solution").is_not_null()).to_dicts():
            seed_answers[r["seed_id"]] = r["solution"]

    rows: list[dict[str, Any]] = []
    left_out: dict[str, int] = {}

    def skip(reason: str) -> None:
        left_out[reason] = left_out.get(reason, 0) + 1

    for inst in table.to_dicts():
        iid, is_seed = inst["instruction_id"], inst["round"] == 0
        options: dict[str, dict[str, Any]] = {}
        if is_seed:
            label = references.get(iid)
            if label is None:
                skip("seed_without_reference")
                continue
            matched = labels.get(iid, (None, False, None))[2] is True
            if iid in seed_answers:
                options["cot"] = {
                    "source": "sft_answer",
                    "solution_id": None,
                    "text": seed_answers[iid],
                }
            elif matched and iid in cot:
                options["cot"] = {
                    "source": "solution",
                    "solution_id": cot[iid][0],
                    "text": cot[iid][1],
                }
            if matched and iid in pot:
                options["pot"] = {
                    "source": "solution",
                    "solution_id": pot[iid][0],
                    "text": pot[iid][1],
                }
        else:
            answer, verified, _ = labels.get(iid, (None, False, None))
            if not verified or answer is None:
                skip("unverified")
                continue
            label = answer
            if iid in cot:
                options["cot"] = {
                    "source": "solution",
                    "solution_id": cot[iid][0],
                    "text": cot[iid][1],
                }
            if iid in pot:
                options["pot"] = {
                    "source": "solution",
                    "solution_id": pot[iid][0],
                    "text": pot[iid][1],
                }
        if not options:
            skip("no_rationale")
            continue
        wanted = "pot" if _draw(iid, params.seed) < params.pot_ratio else "cot"
        kind = wanted if wanted in options else next(iter(options))
        chosen = options[kind]
        if kind == "pot":
            prompt = formats.alpaca_prompt(inst["text"], params.pot_trigger)
            completion = formats.pot_completion(chosen["text"])
        else:
            prompt = formats.alpaca_prompt(inst["text"], params.cot_trigger)
            completion = formats.with_answer_line(chosen["text"], label)
        rows.append(
            {
                "id": f"{iid}:{kind}",
                "instruction_id": iid,
                "root_id": inst["root_id"],
                "round": inst["round"],
                "source": chosen["source"],
                "kind": kind,
                "solution_id": chosen["solution_id"],
                "prompt": prompt,
                "completion": "\n" + completion,
                "answer": label,
                "split": TEST if inst["root_id"] in held_out else TRAIN,
            }
        )
    frame = SftExample.frame(rows)
    stats = split_stats(frame, "kind") | {
        "candidates": table.height,
        "left_out": left_out,
        "by_source": {
            str(k): int(v) for k, v in frame.group_by("source").len().sort("source").iter_rows()
        }
        if frame.height
        else {},
    }
    assert frame.height + sum(left_out.values()) == table.height, "sft_set lost instructions"
    return frame, stats


@stage(name="sft_set", outputs={"sft_set": SftExample})
def build_sft_set(
    seeds: pl.DataFrame,
    instructions: pl.DataFrame,
    sft_answers: pl.DataFrame | None,
    solutions: pl.DataFrame | None,
    answers: pl.DataFrame | None,
    split: SplitParams,
    params: SftSetParams,
) -> StageOutput:
    """Alpaca prompts with verified CoT/PoT rationales (prompt → completion), split by seed."""
    frame, stats = sft_set_frame(
        instructions,
        answers,
        solutions,
        seeds,
        sft_answers,
        params,
        held_out_for(instructions, split),
    )
    return StageOutput({"sft_set": frame}, stats)


# -- irm_set -----------------------------------------------------------------------------------


def irm_set_frame(
    irm_pairs: pl.DataFrame, instructions: pl.DataFrame, held_out: frozenset[str]
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The IRM pairs with their IRM prompt and root seed (`IrmExample`)."""
    require_columns(
        irm_pairs,
        ["id", "parent_id", "round", "prompt", "chosen", "rejected", "chosen_id", "rejected_id"],
        "irm_pairs",
    )
    require_columns(irm_pairs, ["margin", "consistent"], "irm_pairs")
    roots = _instruction_table(instructions).select(
        pl.col("instruction_id").alias("parent_id"), "root_id"
    )
    joined = irm_pairs.join(roots, on="parent_id", how="left")
    orphans = joined.filter(pl.col("root_id").is_null())
    if orphans.height:
        first = orphans.row(0, named=True)
        raise ValueError(
            f"irm_pairs row {first['id']!r}: parent {first['parent_id']!r} is not in instructions"
        )
    bad_margin = joined.filter(pl.col("margin").is_not_null() & (pl.col("margin") < 0))
    if bad_margin.height:
        first = bad_margin.row(0, named=True)
        raise ValueError(f"irm_pairs row {first['id']!r}: margin {first['margin']} is negative")
    frame = joined.with_columns(
        pl.col("prompt").alias("parent"),
        pl.col("prompt").map_elements(formats.irm_prompt, return_dtype=pl.String),
        pl.col("chosen").str.strip_chars(),
        pl.col("rejected").str.strip_chars(),
        pl.col("margin").fill_null(0.0).cast(pl.Float64),
        _split_column(held_out),
    ).select(IrmExample.columns())
    frame = frame.cast(IrmExample.schema())
    stats = split_stats(frame, "consistent") | {"candidates": irm_pairs.height}
    return frame, stats


@stage(name="irm_set", outputs={"irm_set": IrmExample})
def build_irm_set(
    irm_pairs: pl.DataFrame, instructions: pl.DataFrame, split: SplitParams, params: IrmSetParams
) -> StageOutput:
    """The reward flow's IRM pairs with the IRM prompt rendered, split by seed."""
    frame, stats = irm_set_frame(irm_pairs, instructions, held_out_for(instructions, split))
    return StageOutput({"irm_set": frame}, stats)


# -- prm_steps ---------------------------------------------------------------------------------


def step_label_expr(labeller: Labeller, mc_threshold: float) -> pl.Expr:
    """The chosen labeller's verdict per step row (null stays null: not judged)."""
    if labeller == "mc_soft":
        return (pl.col("mc_soft") >= mc_threshold).alias("label")
    return pl.col(labeller).cast(pl.Boolean).alias("label")


def prm_steps_frame(
    step_labels: pl.DataFrame,
    instructions: pl.DataFrame,
    solutions: pl.DataFrame | None,
    params: PrmStepsParams,
    held_out: frozenset[str],
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """One row per labelled solution (`PrmExample`), steps in `step_index` order."""
    require_columns(
        step_labels, ["solution_id", "instruction_id", "step_index", "step_text"], "step_labels"
    )
    label_column = "mc_soft" if params.labeller == "mc_soft" else params.labeller
    require_columns(step_labels, [label_column], "step_labels")
    table = _instruction_table(instructions)
    kinds = None
    if solutions is not None:
        require_columns(solutions, ["id", "kind"], "solutions")
        kinds = solutions.select(pl.col("id").alias("solution_id"), "kind").unique("solution_id")
    steps = step_labels.select(
        "solution_id",
        "instruction_id",
        pl.col("step_index").cast(pl.Int64),
        "step_text",
        step_label_expr(params.labeller, params.mc_threshold),
    )
    if kinds is not None:
        steps = steps.join(kinds, on="solution_id", how="left")
    else:
        steps = steps.with_columns(pl.lit(None, pl.String).alias("kind"))
    grouped = (
        steps.sort("solution_id", "step_index")
        .group_by("solution_id", maintain_order=True)
        .agg(
            pl.col("instruction_id").first(),
            pl.col("kind").first(),
            pl.col("step_index"),
            pl.col("step_text"),
            pl.col("label"),
        )
    )
    left_out: dict[str, int] = {}
    rows = []
    texts = {r["instruction_id"]: r for r in table.to_dicts()}
    for r in grouped.to_dicts():
        if r["step_index"] != list(range(len(r["step_index"]))):
            raise ValueError(
                f"step_labels solution {r['solution_id']!r}: step_index is "
                f"{r['step_index']}, not 0..{len(r['step_index']) - 1}"
            )
        inst = texts.get(r["instruction_id"])
        if inst is None:
            raise ValueError(
                f"step_labels solution {r['solution_id']!r}: instruction "
                f"{r['instruction_id']!r} is not in instructions"
            )
        if r["kind"] == "pot" and not params.include_pot:
            left_out["pot"] = left_out.get("pot", 0) + 1
            continue
        labels = r["label"]
        if all(v is None for v in labels):
            left_out["unlabelled"] = left_out.get("unlabelled", 0) + 1
            continue
        first_error = next((i for i, v in enumerate(labels) if v is False), None)
        trigger = params.pot_trigger if r["kind"] == "pot" else params.cot_trigger
        rows.append(
            {
                "id": r["solution_id"],
                "instruction_id": r["instruction_id"],
                "root_id": inst["root_id"],
                "round": inst["round"],
                "kind": r["kind"],
                "prompt": formats.alpaca_prompt(inst["text"], trigger),
                "completions": r["step_text"],
                "labels": labels,
                "first_error": first_error,
                "n_steps": len(labels),
                "labeller": params.labeller,
                "split": TEST if inst["root_id"] in held_out else TRAIN,
            }
        )
    frame = PrmExample.frame(rows)
    all_labels = (
        frame["labels"].explode().drop_nulls() if frame.height else pl.Series([], dtype=pl.Boolean)
    )
    stats = split_stats(frame) | {
        "candidates": grouped.height,
        "left_out": left_out,
        "steps": int(frame["n_steps"].sum()) if frame.height else 0,
        "steps_correct": int(all_labels.sum()),
        "steps_wrong": int((~all_labels).sum()),
        "solutions_with_error": int(frame["first_error"].is_not_null().sum()),
        "labeller": params.labeller,
    }
    assert frame.height + sum(left_out.values()) == grouped.height
    return frame, stats


@stage(name="prm_steps", outputs={"prm_steps": PrmExample})
def build_prm_steps(
    step_labels: pl.DataFrame,
    instructions: pl.DataFrame,
    solutions: pl.DataFrame | None,
    split: SplitParams,
    params: PrmStepsParams,
) -> StageOutput:
    """Solutions as step lists with one label per step (the configured labeller), split by seed."""
    frame, stats = prm_steps_frame(
        step_labels, instructions, solutions, params, held_out_for(instructions, split)
    )
    return StageOutput({"prm_steps": frame}, stats)


# -- rl_prompts --------------------------------------------------------------------------------


def rl_prompts_frame(
    seeds: pl.DataFrame,
    instructions: pl.DataFrame,
    answers: pl.DataFrame | None,
    rewards: pl.DataFrame | None,
    params: RlPromptsParams,
    held_out: frozenset[str],
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The RL prompts (`RlPrompt`) with their labels and the judge's rI."""
    require_columns(seeds, ["id", "answer"], "seeds")
    table = _instruction_table(instructions)
    parents = table.select(
        pl.col("instruction_id").alias("parent_id"), pl.col("text").alias("parent")
    )
    table = table.join(parents, on="parent_id", how="left")
    references = {
        r["id"]: r["answer"]
        for r in seeds.select("id", "answer").to_dicts()
        if r["answer"] and r["answer"].strip()
    }
    verified: dict[str, str] = {}
    if answers is not None:
        require_columns(answers, ["instruction_id", "answer", "verified"], "answers")
        for r in answers.filter(pl.col("verified") & pl.col("answer").is_not_null()).to_dicts():
            verified[r["instruction_id"]] = r["answer"]
    r_i: dict[str, float] = {}
    if rewards is not None:
        require_columns(rewards, ["instruction_id", "r_i"], "rewards")
        for iid, value in (
            rewards.filter(pl.col("r_i").is_not_null())
            .group_by("instruction_id")
            .agg(pl.col("r_i").first())
            .iter_rows()
        ):
            r_i[iid] = float(value)
    rows, left_out = [], {}
    for inst in table.to_dicts():
        iid = inst["instruction_id"]
        if inst["round"] == 0:
            if not params.include_seeds:
                reason = "seeds_off"
            elif iid in references:
                label, source, reason = references[iid], "reference", None
            else:
                reason = "seed_without_reference"
        elif not params.include_evolved:
            reason = "evolved_off"
        elif iid in verified:
            label, source, reason = verified[iid], "majority", None
        else:
            reason = "unverified"
        if reason is not None:
            left_out[reason] = left_out.get(reason, 0) + 1
            continue
        rows.append(
            {
                "id": iid,
                "root_id": inst["root_id"],
                "round": inst["round"],
                "prompt": formats.alpaca_prompt(inst["text"], params.cot_trigger),
                "instruction": inst["text"],
                "parent": inst["parent"],
                "label": label,
                "label_source": source,
                "r_i": r_i.get(iid),
                "split": TEST if inst["root_id"] in held_out else TRAIN,
            }
        )
    frame = RlPrompt.frame(rows)
    stats = split_stats(frame, "label_source") | {
        "candidates": table.height,
        "left_out": left_out,
        "with_r_i": int(frame["r_i"].is_not_null().sum()) if frame.height else 0,
    }
    assert frame.height + sum(left_out.values()) == table.height
    return frame, stats


@stage(name="rl_prompts", outputs={"rl_prompts": RlPrompt})
def build_rl_prompts(
    seeds: pl.DataFrame,
    instructions: pl.DataFrame,
    answers: pl.DataFrame | None,
    rewards: pl.DataFrame | None,
    split: SplitParams,
    params: RlPromptsParams,
) -> StageOutput:
    """Alpaca prompts with a reference or verified pseudo-label and the judge's rI, split by seed."""
    frame, stats = rl_prompts_frame(
        seeds, instructions, answers, rewards, params, held_out_for(instructions, split)
    )
    return StageOutput({"rl_prompts": frame}, stats)


@task(name="count_train_rows")
def count_train_rows(ref: Any, consistent_only: bool = False) -> int:
    """Rows in a training set's train split (only consistently ranked pairs when asked): the
    training flow trains a model only when its set has some."""
    from storage.datasets import DatasetStore
    from storage.settings import home

    frame = DatasetStore(home()).read(str(ref))
    rows = frame.filter(pl.col("split") == TRAIN)
    if consistent_only and "consistent" in rows.columns:
        rows = rows.filter(pl.col("consistent").fill_null(False))
    return rows.height
