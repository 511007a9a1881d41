"""The `training` section of a run profile: the base model and one block per trainer."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tasks.training.irm import IrmTrainParams
from tasks.training.launch import LauncherParams
from tasks.training.prm import PrmTrainParams
from tasks.training.rl import RlTrainParams
from tasks.training.sft import SftTrainParams


class TrainingConfig(BaseModel):
    """SFT, IRM, PRM and RL on the training sets (WizardMath RLEIF, MAmmoTH hybrid SFT)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="train the models (the factory skips them when off)")
    base_model: str | None = Field(
        None,
        description="None: the embedded SmolLM2-135M-Instruct; else a local folder or hub id",
    )
    launcher: LauncherParams = Field(
        default_factory=LauncherParams,
        description="processes per trainer: 1 trains in process; N launches N through "
        "accelerate (one per GPU, or CPU processes with gloo); N enters each stage's version",
    )
    sft: SftTrainParams = Field(default_factory=SftTrainParams, description="trl SFTTrainer")
    irm: IrmTrainParams = Field(default_factory=IrmTrainParams, description="trl RewardTrainer")
    prm: PrmTrainParams = Field(
        default_factory=PrmTrainParams, description="token-classification PRM (transformers)"
    )
    rl: RlTrainParams = Field(
        default_factory=RlTrainParams, description="trl GRPOTrainer (or RLOO) on r = rI · rA"
    )
