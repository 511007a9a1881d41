"""The run's report: the funnel and difficulty tables as Prefect artifacts and as the CLI's
run summary, with the funnel plot, and where to find and how to query the results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from prefect import task

from infra.settings import home
from storage.datasets import DatasetStore
from tasks import funnel as funnel_mod
from tasks.common import ref


def _read(spec: str | None) -> pl.DataFrame | None:
    return DatasetStore(home()).read(ref(spec)) if spec else None


def report_markdown(summary: dict[str, Any]) -> str:
    state = summary.get("state", {})
    lines = ["# evolforge run", ""]
    funnel = _read(state.get("funnel"))
    difficulty = _read(summary.get("report", {}).get("refs", {}).get("difficulty"))
    if funnel is not None and funnel.height:
        lines += ["## Evolution funnel", "", funnel_mod.funnel_markdown(funnel), ""]
    if difficulty is not None and difficulty.height:
        lines += [
            "## Difficulty (1 - agreement) of evolutions vs their parents",
            "",
            funnel_mod.difficulty_markdown(difficulty),
            "",
        ]
    plot = summary.get("report", {}).get("plot")
    if plot and Path(plot).is_file():
        lines += [f"![funnel]({funnel_mod.png_data_uri(Path(plot))})", "", f"plot: `{plot}`"]
    lines += ["", "## Datasets", ""] + [
        f"- `{name}`: `{value}`" for name, value in sorted(state.items()) if value
    ]
    return "\n".join(lines)


@task(name="publish_report")
def publish_report(summary: dict[str, Any]) -> None:
    """Attach the funnel, the difficulty check and the plot to the flow run as an artifact."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        key="factory-report",
        markdown=report_markdown(summary),
        description="Evolution funnel and difficulty",
    )


def render_summary(summary: dict[str, Any]) -> str:
    """The text printed by `evolforge run`."""
    lines = ["", "== evolforge run summary =="]
    seeds = summary.get("seeds")
    if seeds:
        stats = seeds["stats"]
        state = "cache hit" if seeds["cached"] else "new"
        lines.append(
            f"seeds: {seeds['refs']['seeds']} ({state}) read {stats['read']} = accepted {stats['accepted']}"
            f" + rejected {stats['rejected']}"
        )
    sft = summary.get("sft")
    if sft:
        lines.append(
            f"sft answers: {sft['refs']['sft_answers']}  correct {sft['stats'].get('correct')} of {sft['stats'].get('seeds')} seeds"
        )
    state = summary.get("state", {})
    funnel = _read(state.get("funnel"))
    if funnel is not None and funnel.height:
        lines += ["", "evolution funnel (per round):", funnel_mod.funnel_text(funnel)]
    difficulty = _read(summary.get("report", {}).get("refs", {}).get("difficulty"))
    if difficulty is not None and difficulty.height:
        lines += ["", "difficulty of evolutions vs parents (1 - agreement; upward should be > 0):"]
        for r in difficulty.sort("round", "direction").iter_rows(named=True):
            delta = r.get("mean_delta")
            lines.append(
                f"  round {r['round']} {r['direction']:<9} n={r.get('n_pairs', 0):<4} "
                f"difficulty {_f(r.get('mean_difficulty'))} vs parents {_f(r.get('mean_parent_difficulty'))} "
                f"(delta {_f(delta, signed=True)})"
            )
    engine_lines = _engine_lines(summary)
    if engine_lines:
        lines += ["", "engine (requests: cache hits / misses, tokens):", *engine_lines]
    plot = summary.get("report", {}).get("plot")
    lines += [
        "",
        f"results: {home() / 'datasets'}",
        f"catalog: {home() / 'catalog.duckdb'}" + (f"\nplot:    {plot}" if plot else ""),
        'query:   evolforge sql "SELECT round, direction, op, text FROM instructions LIMIT 5"',
        '         evolforge sql "SELECT round, stage, rule, count(*) FROM eliminated GROUP BY ALL ORDER BY ALL"',
        '         evolforge sql "SELECT a.instruction_id, a.majority_answer, a.agreement, a.difficulty FROM answers a LIMIT 5"',
        "         evolforge datasets ls",
    ]
    return "\n".join(lines)


def _f(value: Any, signed: bool = False) -> str:
    if value is None:
        return "  n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _engine_lines(summary: dict[str, Any]) -> list[str]:
    """Engine counters summed per step over the run (cache hits are requests not sent)."""
    steps: list[tuple[str, dict[str, Any] | None]] = [
        ("sft", summary.get("sft")),
        ("solve", summary.get("seed_solutions")),
    ]
    for round_steps in summary.get("rounds", []):
        steps += list(round_steps.items())
    totals: dict[str, dict[str, float]] = {}
    for name, step in steps:
        stats = (step or {}).get("stats", {}).get("engine")
        if not stats or (step or {}).get("cached"):
            continue
        acc = totals.setdefault(name, {})
        for k, v in stats.items():
            if isinstance(v, int | float):
                acc[k] = acc.get(k, 0) + v
    return [
        f"  {name:<9} requests {int(acc.get('requests', 0))}: hits {int(acc.get('hits', 0))} / misses {int(acc.get('misses', 0))}"
        f" / failures {int(acc.get('failures', 0))}; tokens in {int(acc.get('prompt_tokens', 0))}, out {int(acc.get('completion_tokens', 0))};"
        f" engine {acc.get('engine_seconds', 0):.1f} s"
        for name, acc in totals.items()
    ]
