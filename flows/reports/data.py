"""The data flow's report: Prefect artifacts (the funnel per round, the report with the plot
embedded, the output versions) and the CLI's run summary, rendered from the flow's `DataState`.

Every query the summary prints runs as printed on the datasets the run wrote (a test runs them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from flows.reports.common import stage_lines
from flows.state import DataState
from storage.datasets import DatasetStore
from storage.settings import home, home_url
from tasks.evolution import funnel as funnel_mod
from tasks.stage import read

# The queries printed after a run; each must run on a fresh run's catalog (tested).
DATA_QUERIES = [
    "SELECT round, direction, op, text FROM instructions LIMIT 5",
    "SELECT round, stage, rule, count(*) AS n FROM eliminated GROUP BY ALL ORDER BY ALL",
    "SELECT instruction_id, answer, agreement, difficulty, verified FROM answers LIMIT 5",
    "SELECT name, version, rows, parents FROM versions ORDER BY created_at DESC LIMIT 10",
]


def _plot_path(state: DataState) -> Path | None:
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


def data_report_markdown(state: DataState) -> str:
    lines = ["# evolforge data run", ""]
    funnel = read(state.funnel)
    difficulty = read(state.difficulty)
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
def publish_data_report(state: DataState) -> None:
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


def render_summary(state: DataState) -> str:
    """The text printed by `evolforge run` after the data flow."""
    lines = ["", "== evolforge run summary =="]
    seeds = next((s for s in state.steps if s.stage == "ingest"), None)
    if seeds is not None:
        stats = seeds.stats
        lines.append(
            f"seeds: {state.seeds} ({'cache hit' if seeds.cached else 'new'}) read "
            f"{stats.get('read')} = accepted {stats.get('accepted')} + rejected {stats.get('rejected')}"
        )
    sft = read(state.sft_answers)
    if sft is not None:
        lines.append(
            f"sft answers: {state.sft_answers}  correct {int(sft['correct'].sum())} of {sft.height} seeds"
        )
    answers = read(state.answers)
    if answers is not None and answers.height:
        lines.append(
            f"answers: {answers.height} instructions, {int(answers['verified'].sum())} verified, "
            f"mean agreement {answers['agreement'].mean():.3f}"
        )
    funnel = read(state.funnel)
    if funnel is not None and funnel.height:
        lines += ["", "evolution funnel (per round):", funnel_mod.funnel_text(funnel)]
    difficulty = read(state.difficulty)
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
        f"results: {home_url().rstrip('/')}/datasets",
        f"catalog: {home() / 'catalog.duckdb'}" + (f"\nplot:    {plot}" if plot else ""),
    ]
    lines += [f'query:   evolforge sql "{q}"' for q in DATA_QUERIES[:1]]
    lines += [f'         evolforge sql "{q}"' for q in DATA_QUERIES[1:]]
    lines.append("         evolforge datasets ls")
    return "\n".join(lines)
