"""The training side's report: the curves (a PNG stored as the `training_curves` artifact), the
Prefect markdown artifacts, and the lines of the CLI run summary.

- `draw_training_curves` (a stage) reads each checkpoint's `training_log.json` and draws the loss
  of SFT, IRM and PRM and the RL reward with its two factors rI and rA, one panel per model;
- `publish_training_sets_report` / `publish_training_report` (tasks) publish the sets' sizes and
  mix, and the models' metrics with the plot embedded;
- `training_summary_lines` / `render_training_summary` are what `evolforge run` prints: set sizes
  per split and kind, each model's version, parents and final metrics, and how to load it.

Every query printed in the summary runs as printed on a fresh run's catalog (a test runs them).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect import task

from storage.datasets import DatasetStore
from storage.settings import home
from tasks.stage import Artifact, ArtifactDir, StageContext, StageOutput, stage
from tasks.training import common

CURVES_FILE = "curves.png"
SETS = ("sft_set", "irm_set", "prm_steps", "rl_prompts")
MODELS = ("sft_model", "irm_model", "prm_model", "rl_model")
LOADERS = {
    "sft_model": "AutoModelForCausalLM",
    "rl_model": "AutoModelForCausalLM",
    "irm_model": "AutoModelForSequenceClassification",
    "prm_model": "AutoModelForTokenClassification",
}
# The metrics the summary shows per model, in order (all are in the models view's `metrics`).
HEADLINE = {
    "sft_model": ("loss_first", "loss_last", "eval_loss", "eval_mean_token_accuracy"),
    "irm_model": ("loss_first", "loss_last", "pairwise_accuracy", "train_pairwise_accuracy"),
    "prm_model": ("loss_first", "loss_last", "step_accuracy", "first_error_f1"),
    "rl_model": (
        "reward_first",
        "reward_last",
        "rI_last",
        "rA_last",
        "eval_reward",
        "eval_accuracy",
    ),
}
# Curves per model: (logged key, label).
CURVES = {
    "sft_model": [("loss", "loss")],
    "irm_model": [("loss", "loss"), ("accuracy", "pairwise accuracy (train batch)")],
    "prm_model": [("loss", "loss")],
    "rl_model": [("reward", "r = rI·rA"), ("rI", "rI"), ("rA", "rA")],
}

TRAINING_QUERIES = [
    "SELECT name, version, parents, metrics FROM models ORDER BY created_at",
    "SELECT split, kind, count(*) AS n FROM sft_set GROUP BY ALL ORDER BY ALL",
    (
        "WITH RECURSIVE lineage(name, version, depth) AS ("
        "SELECT name, version, 0 FROM models WHERE name = 'rl_model' UNION "
        "SELECT split_part(p, '@', 1), split_part(p, '@', 2), l.depth + 1 FROM lineage l "
        "JOIN versions v ON v.name = l.name AND v.version = l.version, unnest(v.parents) AS t(p)) "
        "SELECT min(depth) AS depth, name, version FROM lineage GROUP BY ALL ORDER BY depth, name"
    ),
]


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


# -- reading the state back ---------------------------------------------------------------------


def _manifest(ref: Any):
    return DatasetStore(home()).manifest(str(ref)) if ref is not None else None


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def set_line(name: str, ref: Any) -> str | None:
    manifest = _manifest(ref)
    if manifest is None:
        return None
    s = manifest.stats
    line = (
        f"  {name:<10} {manifest.ref}  rows {s.get('rows', manifest.rows)}: train {s.get('train', '?')} "
        f"({s.get('train_roots', '?')} seeds) / test {s.get('test', '?')} ({s.get('test_roots', '?')} seeds)"
    )
    mix = next((v for k, v in s.items() if k.startswith("by_") and isinstance(v, dict) and v), None)
    if mix:
        line += "; " + ", ".join(f"{k} {v}" for k, v in mix.items())
    if s.get("left_out"):
        line += "; left out " + ", ".join(f"{k} {v}" for k, v in s["left_out"].items())
    return line


def model_lines(name: str, ref: Any) -> list[str]:
    manifest = _manifest(ref)
    if manifest is None:
        return []
    stats = manifest.stats
    folder = DatasetStore(home()).version_dir(manifest.name, manifest.version)
    metrics = ", ".join(f"{k} {_fmt(stats.get(k))}" for k in HEADLINE[name])
    resumed = stats.get("resumed_from_step")
    return [
        f"  {name:<10} {manifest.ref}  parents {', '.join(manifest.parents)}",
        f"             {stats.get('steps', '?')} steps"
        + (f" (resumed at {resumed})" if resumed else "")
        + f"; {metrics}",
        f"             load: {LOADERS[name]}.from_pretrained({str(folder)!r})",
    ]


def training_summary_lines(state: Any) -> list[str]:
    """Training sets (sizes, split, mix) and models (metrics, how to load) of a state."""
    lines: list[str] = []
    sets = [line for n in SETS if (line := set_line(n, getattr(state, n, None)))]
    if sets:
        lines += ["", "training sets (split by root seed):", *sets]
    models = [line for n in MODELS for line in model_lines(n, getattr(state, n, None))]
    if models:
        lines += ["", "models (metrics are in the catalog's models view):", *models]
    curves = getattr(state, "training_curves", None)
    if curves is not None:
        folder = DatasetStore(home()).version_dir(curves.name, curves.version)
        lines.append(f"curves:  {folder / CURVES_FILE}")
    if sets or models:
        lines += [f'query:   evolforge sql "{TRAINING_QUERIES[0]}"']
        lines += [f'         evolforge sql "{q}"' for q in TRAINING_QUERIES[1:]]
    return lines


def render_training_summary(state: Any) -> str:
    """What `evolforge run --flow training_sets|training` prints."""
    return "\n".join(["", "== evolforge training summary ==", *training_summary_lines(state)])


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def training_report_markdown(state: Any) -> str:
    lines = ["# evolforge training run", ""]
    rows = []
    for name in SETS:
        manifest = _manifest(getattr(state, name, None))
        if manifest is not None:
            s = manifest.stats
            mix = next((v for k, v in s.items() if k.startswith("by_") and isinstance(v, dict)), {})
            rows.append(
                f"| {name} | `{manifest.ref}` | {s.get('train', '')} | {s.get('test', '')} | "
                + ", ".join(f"{k} {v}" for k, v in mix.items())
                + " |"
            )
    if rows:
        lines += [
            "## Training sets",
            "",
            "| set | version | train | test | mix |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    rows = []
    for name in MODELS:
        manifest = _manifest(getattr(state, name, None))
        if manifest is not None:
            metrics = ", ".join(f"{k} {_fmt(manifest.stats.get(k))}" for k in HEADLINE[name])
            rows.append(
                f"| {name} | `{manifest.ref}` | {manifest.stats.get('steps', '')} | {metrics} | "
                f"`{LOADERS[name]}` |"
            )
    if rows:
        lines += [
            "## Models",
            "",
            "| model | version | steps | metrics | load with |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    curves = getattr(state, "training_curves", None)
    if curves is not None:
        path = DatasetStore(home()).version_dir(curves.name, curves.version) / CURVES_FILE
        if path.is_file():
            lines += ["## Curves", "", f"![curves]({_png_uri(path)})", "", f"plot: `{path}`"]
    return "\n".join(lines)


@task(name="publish_training_sets_report")
def publish_training_sets_report(state: Any) -> None:
    """The training sets' sizes, splits and mix as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key="training-sets-report",
        markdown=training_report_markdown(state),
        description="Training sets: sizes, held-out split by seed, CoT/PoT mix",
    )


@task(name="publish_training_report")
def publish_training_report(state: Any) -> None:
    """The models' metrics and curves as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key="training-report",
        markdown=training_report_markdown(state),
        description="SFT, IRM, PRM and RL checkpoints: metrics, curves, how to load them",
    )
