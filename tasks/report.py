"""The run's report: Prefect artifacts (the funnel per round, the report with the plot embedded,
the output versions) and the CLI's run summary, rendered from a flow's typed state.

Every query the summary prints runs as printed on the datasets the run wrote (a test runs them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from prefect import task

from storage.datasets import DatasetStore
from storage.settings import home
from tasks.evolution import funnel as funnel_mod

# The queries printed after a run; each must run on a fresh run's catalog (tested).
DATA_QUERIES = [
    "SELECT round, direction, op, text FROM instructions LIMIT 5",
    "SELECT round, stage, rule, count(*) AS n FROM eliminated GROUP BY ALL ORDER BY ALL",
    "SELECT instruction_id, answer, agreement, difficulty, verified FROM answers LIMIT 5",
    "SELECT name, version, rows, parents FROM versions ORDER BY created_at DESC LIMIT 10",
]


def _read(ref: Any) -> pl.DataFrame | None:
    return DatasetStore(home()).read(str(ref)) if ref is not None else None


def _plot_path(state: Any) -> Path | None:
    ref = getattr(state, "funnel_plot", None)
    if ref is None:
        return None
    path = DatasetStore(home()).version_dir(ref.name, ref.version) / funnel_mod.PLOT_FILE
    return path if path.is_file() else None


def round_line(round: int, stats: dict[str, Any]) -> str:
    return (
        f"round {round}: generated {stats.get('generated', 0)} → eliminated "
        f"{stats.get('eliminated', 0)}, duplicate {stats.get('duplicate', 0)}, contaminated "
        f"{stats.get('contaminated', 0)} → kept {stats.get('kept', 0)} (pool {stats.get('pool')})"
    )


@task(name="publish_round_funnel")
def publish_round_funnel(round: int, stats: dict[str, Any]) -> None:
    """The round's funnel as a Prefect table artifact and a log line."""
    from prefect.artifacts import create_table_artifact
    from prefect.logging import get_run_logger

    keys = ("round", "generated", "eliminated", "duplicate", "contaminated", "kept", "pool")
    create_table_artifact(
        key=f"funnel-round-{round}",
        table=[{k: stats.get(k, round if k == "round" else None) for k in keys}],
        description=f"Evolution funnel of round {round}",
    )
    get_run_logger().info(round_line(round, stats))


def data_report_markdown(state: Any) -> str:
    lines = ["# evolforge data run", ""]
    funnel = _read(state.funnel)
    difficulty = _read(state.difficulty)
    if funnel is not None and funnel.height:
        lines += ["## Evolution funnel", "", funnel_mod.funnel_markdown(funnel), ""]
    if difficulty is not None and difficulty.height:
        lines += [
            "## Difficulty (1 - agreement) of evolutions vs their parents",
            "",
            funnel_mod.difficulty_markdown(difficulty),
            "",
        ]
    plot = _plot_path(state)
    if plot is not None:
        lines += [f"![funnel]({funnel_mod.png_data_uri(plot)})", "", f"plot: `{plot}`"]
    lines += ["", "## Stages", "", "| stage | round | outcome | outputs |", "|---|---|---|---|"]
    for step in state.steps:
        outcome = "cache hit" if step.cached else "computed"
        shards = step.stats.get("shards")
        if shards and not step.cached:
            outcome += f" ({shards.get('new', 0)} of {shards.get('total', 0)} shards new)"
        outputs = ", ".join(f"`{v}`" for v in step.outputs.values())
        lines.append(f"| {step.stage} | {_dash(step.round)} | {outcome} | {outputs} |")
    lines += ["", "## Datasets", ""] + [
        f"- `{name}`: `{ref}`" for name, ref in state.refs().items()
    ]
    return "\n".join(lines)


@task(name="publish_data_report")
def publish_data_report(state: Any) -> None:
    """The funnel, the difficulty check, the plot and the output versions as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key="data-report",
        markdown=data_report_markdown(state),
        description="Evolution funnel, difficulty and dataset versions",
    )


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _f(value: Any, signed: bool = False) -> str:
    if value is None:
        return "  n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def stage_lines(steps: list[Any]) -> list[str]:
    """Per stage (summed over rounds): runs computed vs cache hits, new shards, engine work."""
    totals: dict[str, dict[str, float]] = {}
    for step in steps:
        acc = totals.setdefault(step.stage, {})
        acc["runs"] = acc.get("runs", 0) + 1
        acc["cached"] = acc.get("cached", 0) + (1 if step.cached else 0)
        shards = step.stats.get("shards") or {}
        if not step.cached:
            acc["shards"] = acc.get("shards", 0) + shards.get("total", 0)
            acc["new_shards"] = acc.get("new_shards", 0) + shards.get("new", 0)
            for k, v in (step.stats.get("engine") or {}).items():
                acc[k] = acc.get(k, 0) + v
    lines = []
    for name, acc in totals.items():
        line = f"  {name:<12} {int(acc['runs'] - acc['cached'])} computed / {int(acc['cached'])} cached"
        if acc.get("shards"):
            line += f"; shards {int(acc['new_shards'])} new of {int(acc['shards'])}"
        if acc.get("requests"):
            line += (
                f"; requests {int(acc['requests'])}: hits {int(acc.get('hits', 0))} / misses "
                f"{int(acc.get('misses', 0))} / failures {int(acc.get('failures', 0))}; tokens in "
                f"{int(acc.get('prompt_tokens', 0))}, out {int(acc.get('completion_tokens', 0))}; "
                f"engine {acc.get('engine_seconds', 0):.1f} s"
            )
        lines.append(line)
    return lines


def render_summary(state: Any) -> str:
    """The text printed by `evolforge run` after the data flow."""
    lines = ["", "== evolforge run summary =="]
    seeds = next((s for s in state.steps if s.stage == "ingest"), None)
    if seeds is not None:
        stats = seeds.stats
        lines.append(
            f"seeds: {state.seeds} ({'cache hit' if seeds.cached else 'new'}) read "
            f"{stats.get('read')} = accepted {stats.get('accepted')} + rejected {stats.get('rejected')}"
        )
    sft = _read(state.sft_answers)
    if sft is not None:
        lines.append(
            f"sft answers: {state.sft_answers}  correct {int(sft['correct'].sum())} of {sft.height} seeds"
        )
    answers = _read(state.answers)
    if answers is not None and answers.height:
        lines.append(
            f"answers: {answers.height} instructions, {int(answers['verified'].sum())} verified, "
            f"mean agreement {answers['agreement'].mean():.3f}"
        )
    funnel = _read(state.funnel)
    if funnel is not None and funnel.height:
        lines += ["", "evolution funnel (per round):", funnel_mod.funnel_text(funnel)]
    difficulty = _read(state.difficulty)
    if difficulty is not None and difficulty.height:
        lines += ["", "difficulty of evolutions vs parents (1 - agreement; upward should be > 0):"]
        for r in difficulty.sort("round", "direction").iter_rows(named=True):
            lines.append(
                f"  round {r['round']} {r['direction']:<9} n={r.get('n_pairs', 0):<4} "
                f"difficulty {_f(r.get('mean_difficulty'))} vs parents "
                f"{_f(r.get('mean_parent_difficulty'))} (delta {_f(r.get('mean_delta'), signed=True)})"
            )
    lines += ["", "stages (computed vs cache hits; engine requests: hits / misses):"]
    lines += stage_lines(state.steps)
    plot = _plot_path(state)
    lines += [
        "",
        f"results: {home() / 'datasets'}",
        f"catalog: {home() / 'catalog.duckdb'}" + (f"\nplot:    {plot}" if plot else ""),
    ]
    lines += [f'query:   evolforge sql "{q}"' for q in DATA_QUERIES[:1]]
    lines += [f'         evolforge sql "{q}"' for q in DATA_QUERIES[1:]]
    lines.append("         evolforge datasets ls")
    return "\n".join(lines)


def factory_summary(state: Any) -> str:
    """The text printed after a factory run: each flow's summary in order."""
    from tasks.rewards.report import rewards_summary
    from tasks.training.report import render_training_summary

    parts = [render_summary(state.data)]
    if state.rewards is not None and state.rewards.steps:
        parts.append(rewards_summary(state.rewards))
    if state.training is not None and state.training.steps:
        parts.append(render_training_summary(state.training))
    if state.evaluation is not None and state.evaluation.steps:
        from tasks.evaluation.report import render_evaluation_summary

        parts.append(render_evaluation_summary(state.evaluation))
    return "\n".join(parts)


def factory_report_markdown(state: Any) -> str:
    lines = [data_report_markdown(state.data)]
    for name in ("rewards", "training_sets", "training", "evaluation"):
        sub = getattr(state, name, None)
        if sub is not None and sub.steps:
            lines += ["", f"## {name}", ""] + [f"- `{k}`: `{v}`" for k, v in sub.refs().items()]
    return "\n".join(lines)


@task(name="publish_factory_report")
def publish_factory_report(state: Any) -> None:
    """The whole run on the factory's own flow run: the data report and every flow's outputs."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key="factory-report",
        markdown=factory_report_markdown(state),
        description="Funnel, difficulty, and the dataset and model versions of every flow",
    )
