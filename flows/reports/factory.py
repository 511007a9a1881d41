"""The factory's report: each flow's summary in order (the CLI), and the data report with every
flow's outputs (a Prefect markdown artifact on the factory's own flow run)."""

from __future__ import annotations

from prefect import task

from flows.reports.data import data_report_markdown, render_summary
from flows.reports.evaluation import render_evaluation_summary
from flows.reports.rewards import rewards_summary
from flows.reports.training import render_training_summary
from flows.state import FactoryState


def factory_summary(state: FactoryState) -> str:
    """The text printed after a factory run: each flow's summary in order."""
    parts = [render_summary(state.data)]
    if state.rewards is not None and state.rewards.steps:
        parts.append(rewards_summary(state.rewards))
    if state.training is not None and state.training.steps:
        parts.append(render_training_summary(state.training))
    if state.evaluation is not None and state.evaluation.steps:
        parts.append(render_evaluation_summary(state.evaluation))
    return "\n".join(parts)


def factory_report_markdown(state: FactoryState) -> str:
    lines = [data_report_markdown(state.data)]
    for name in ("rewards", "training_sets", "training", "evaluation"):
        sub = getattr(state, name, None)
        if sub is not None and sub.steps:
            lines += ["", f"## {name}", ""] + [f"- `{k}`: `{v}`" for k, v in sub.refs().items()]
    return "\n".join(lines)


@task(name="publish_factory_report")
def publish_factory_report(state: FactoryState) -> None:
    """The whole run on the factory's own flow run: the data report and every flow's outputs."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key="factory-report",
        markdown=factory_report_markdown(state),
        description="Funnel, difficulty, and the dataset and model versions of every flow",
    )
