"""The training flow: SFT, the instruction reward model, the process reward model, and RL on
r = rI · rA (WizardMath's RLEIF), each a cached stage whose output is a checkpoint version.

    sft_set    ─► train_sft ─► sft_model ──────────────┐
    irm_set    ─► train_irm ─► irm_model ──────────────┤
    prm_steps  ─► train_prm ─► prm_model ──────────────┤
    rl_prompts ──────────────────────────► train_rl ◄──┘ ─► rl_model
                                           └─► draw_training_curves ─► training_curves

A stage's version is a hash of its training set's version, the base model's identity, its
parameters and its code: rerunning with nothing changed trains nothing. `training.launcher`
(`processes: N`) trains each model in N processes through accelerate (`tasks.training.launch`);
N is part of each version (the ranks split every step's rows). `train_rl` starts from
the SFT checkpoint and scores with the trained IRM and PRM; where one was not trained (its set
is missing or it is disabled), the judge-based reward (the `engine` section) fills in.

The factory passes the training-sets flow's state (`TrainingState.from_states`); run alone
(`evolforge run --flow training`) it reads the newest training sets in the data home.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from flows.reports.training import publish_training_report
from flows.state import TrainingState
from infra.engines import EngineConfig, engine_scope
from storage.locks import run_lock
from storage.settings import home
from tasks.executors import ExecutorSettings, executor_scope
from tasks.training.common import BaseModelSpec
from tasks.training.config import TrainingConfig
from tasks.training.curves import draw_training_curves
from tasks.training.irm import train_irm
from tasks.training.prm import train_prm
from tasks.training.rl import train_rl
from tasks.training.sets import count_train_rows
from tasks.training.sft import train_sft


class TrainingParams(BaseModel):
    """SFT, IRM, PRM and RL checkpoints from the training sets."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        title="LLM engine",
        description="The judge behind RL's fallback reward when an IRM or PRM is not trained.",
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig,
        title="Training",
        description="Base model and the SFT, IRM, PRM and RL trainers (steps, batch, lengths, checkpoints).",
    )


def _trainable(name: str, enabled: bool, ref: Any, consistent_only: bool = False) -> bool:
    """Train only what is enabled and has rows in its train split; say why not otherwise."""
    if not enabled:
        return False
    log = get_run_logger()
    if ref is None:
        log.warning("training.%s: no training set in this run or data home, not trained", name)
        return False
    if count_train_rows(ref, consistent_only) == 0:
        log.warning("training.%s: %s has no rows in its train split, not trained", name, ref)
        return False
    return True


def _judge_for_rl(state: TrainingState, params: TrainingParams) -> EngineConfig | None:
    """The judge engine, when a reward model is missing and the fallback is on."""
    missing = state.irm_model is None or state.prm_model is None
    return params.engine if missing and params.training.rl.judge_fallback else None


def _rewards_for_rl(state: TrainingState, params: TrainingParams) -> bool:
    """RL needs rA from somewhere: the PRM, or the judge."""
    if state.prm_model is None and not params.training.rl.judge_fallback:
        get_run_logger().warning(
            "training.rl: no PRM and judge_fallback is off, so rA has no source: not trained"
        )
        return False
    return True


# log_prints stays off: `datasets` hashes the trainers' map functions with dill, which prints
# bytecode when print is patched into the log.
@flow(name="training", log_prints=False, validate_parameters=True)
def training(
    params: TrainingParams = TrainingParams(),
    inputs: TrainingState | None = None,
    executor: ExecutorSettings = ExecutorSettings(),
) -> TrainingState:
    """SFT → IRM → PRM → RL on r = rI · rA; curves and metrics as artifacts."""
    if not params.training.enabled:
        return inputs if inputs is not None else TrainingState()
    with run_lock(home(), "training"), engine_scope(), executor_scope(executor):
        return _train(params, inputs if inputs is not None else TrainingState.newest())


def _train(params: TrainingParams, state: TrainingState) -> TrainingState:
    cfg = params.training
    base = BaseModelSpec(name=cfg.base_model)
    launcher = cfg.launcher
    if _trainable("sft", cfg.sft.enabled, state.sft_set):
        state = state.updated(
            train_sft(sft_set=state.sft_set, base_model=base, params=cfg.sft, launcher=launcher)
        )
    if _trainable("irm", cfg.irm.enabled, state.irm_set, cfg.irm.consistent_only):
        state = state.updated(
            train_irm(irm_set=state.irm_set, base_model=base, params=cfg.irm, launcher=launcher)
        )
    if _trainable("prm", cfg.prm.enabled, state.prm_steps):
        state = state.updated(
            train_prm(prm_steps=state.prm_steps, base_model=base, params=cfg.prm, launcher=launcher)
        )
    if _trainable("rl", cfg.rl.enabled, state.rl_prompts) and _rewards_for_rl(state, params):
        state = state.updated(
            train_rl(
                rl_prompts=state.rl_prompts,
                sft_model=state.sft_model,
                irm_model=state.irm_model,
                prm_model=state.prm_model,
                base_model=base,
                judge=_judge_for_rl(state, params),
                params=cfg.rl,
                launcher=launcher,
            )
        )
    if any(
        getattr(state, n) is not None for n in ("sft_model", "irm_model", "prm_model", "rl_model")
    ):
        state = state.updated(
            draw_training_curves(
                sft_model=state.sft_model,
                irm_model=state.irm_model,
                prm_model=state.prm_model,
                rl_model=state.rl_model,
            )
        )
    publish_training_report(state=state)
    return state


if __name__ == "__main__":
    training()
