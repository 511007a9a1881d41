"""The training curves: a stage that reads each checkpoint's `training_log.json` and draws the
loss of SFT, IRM and PRM and the RL reward with its two factors rI and rA, one panel per model,
into a PNG stored as the `training_curves` artifact. The reports that show it (the CLI summary,
the Prefect artifacts) are in `flows/reports/training.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.stage import Artifact, ArtifactDir, StageContext, StageOutput, stage
from tasks.training import common

CURVES_FILE = "curves.png"
MODELS = ("sft_model", "irm_model", "prm_model", "rl_model")
# Curves per model: (logged key, label).
CURVES = {
    "sft_model": [("loss", "loss")],
    "irm_model": [("loss", "loss"), ("accuracy", "pairwise accuracy (train batch)")],
    "prm_model": [("loss", "loss")],
    "rl_model": [("reward", "r = rI·rA"), ("rI", "rI"), ("rA", "rA")],
}


def plot_curves(logs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """One panel per model with its curves against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in MODELS if n in logs]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.6))
    axes = list(axes) if hasattr(axes, "__iter__") else [axes]
    for ax, name in zip(axes, names, strict=False):
        drawn = False
        for key, label in CURVES[name]:
            points = common.curve(logs[name], key)
            if points:
                ax.plot(
                    [s for s, _ in points], [v for _, v in points], marker="o", ms=3, label=label
                )
                drawn = True
        ax.set_title(name)
        ax.set_xlabel("step")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


@stage(name="training_curves", outputs={"training_curves": Artifact(kind="plot")})
def draw_training_curves(
    ctx: StageContext,
    sft_model: ArtifactDir | None,
    irm_model: ArtifactDir | None,
    prm_model: ArtifactDir | None,
    rl_model: ArtifactDir | None,
) -> StageOutput:
    """Loss curves of SFT, IRM and PRM and the RL reward with rI and rA, as a PNG artifact."""
    folders = {
        "sft_model": sft_model,
        "irm_model": irm_model,
        "prm_model": prm_model,
        "rl_model": rl_model,
    }
    logs = {n: common.read_training_log(f) for n, f in folders.items() if f is not None}
    plot_curves(logs, ctx.output_dir("training_curves") / CURVES_FILE)
    return StageOutput(
        stats={"models": sorted(logs), "points": {n: len(v) for n, v in logs.items()}}
    )
