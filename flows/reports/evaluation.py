"""The evaluation's comparison: base vs trained checkpoints (and any model named), per benchmark
and mode, as a Prefect table artifact, a markdown artifact with the chart, and the CLI summary,
from the evaluation flow's `EvaluationState`.

Every query the summary prints runs as printed on a run's catalog (a test runs them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from prefect import task

from flows.reports.common import stage_lines
from flows.state import EvaluationState
from storage.datasets import DatasetStore
from storage.settings import home
from tasks.evaluation.scores import PLOT_FILE
from tasks.stage import read

EVAL_QUERIES = [
    "SELECT model, benchmark, mode, n, accuracy, ci_low, ci_high, fallback_rate, contaminated "
    "FROM eval_scores",
    "SELECT model, benchmark, mode, item_id, extracted_answer, reference, correct "
    "FROM eval_results WHERE NOT correct LIMIT 10",
    "SELECT model, benchmark, item_id, training_set, similarity FROM eval_contamination "
    "WHERE contaminated",
]


def chart_path(state: EvaluationState) -> Path | None:
    ref = getattr(state, "eval_chart", None)
    if ref is None:
        return None
    path = DatasetStore(home()).version_dir(ref.name, ref.version) / PLOT_FILE
    return path if path.is_file() else None


def cell(row: dict[str, Any]) -> str:
    """`12.0 [5.1, 25.3]`: accuracy and its 95% interval in percent, `n/a` when unjudged."""
    if row.get("accuracy") is None:
        return "n/a"
    return f"{100 * row['accuracy']:.1f} [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"


def comparison_rows(scores: pl.DataFrame) -> list[dict[str, Any]]:
    """One row per model, one column per benchmark x mode (accuracy [95% interval], n), plus the
    contamination guard's overlap: the comparison table."""
    columns = scores.select("benchmark", "mode").unique(maintain_order=True).rows()
    out = []
    for model in scores["model"].unique(maintain_order=True).to_list():
        part = scores.filter(pl.col("model") == model)
        by_key = {(r["benchmark"], r["mode"]): r for r in part.iter_rows(named=True)}
        first = part.row(0, named=True)
        row: dict[str, Any] = {"model": model, "format": first["prompt_format"]}
        for bench, mode in columns:
            r = by_key.get((bench, mode))
            row[f"{bench} {mode}"] = f"{cell(r)} n={r['judged']}" if r else "-"
        flagged = part.select("benchmark", "contaminated").unique("benchmark")["contaminated"]
        row["overlap"] = "unknown" if flagged.null_count() else str(int(flagged.sum()))
        out.append(row)
    return out


def scores_markdown(scores: pl.DataFrame) -> str:
    rows = comparison_rows(scores)
    if not rows:
        return "(no scores)"
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(r[h]) for h in headers) + " |" for r in rows]
    return "\n".join(lines)


def scores_text(scores: pl.DataFrame) -> str:
    """The comparison as fixed-width text for the terminal."""
    rows = comparison_rows(scores)
    if not rows:
        return "  (no scores)"
    headers = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in headers]
    line = "  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    body = [
        "  " + "  ".join(str(r[h]).ljust(w) for h, w in zip(headers, widths, strict=True))
        for r in rows
    ]
    return "\n".join([line, *body])


def _details(scores: pl.DataFrame) -> list[str]:
    lines = []
    hybrid = scores.filter(pl.col("fallback_rate").is_not_null())
    if hybrid.height:
        parts = [
            f"{r['model']} {r['benchmark']} {100 * r['fallback_rate']:.0f}%"
            for r in hybrid.iter_rows(named=True)
        ]
        lines.append("hybrid fallback to CoT: " + ", ".join(parts))
    for r in scores.iter_rows(named=True):
        if r["errors"] or r["judged"] < r["n"]:
            lines.append(
                f"{r['model']} {r['benchmark']} {r['mode']}: {r['n'] - r['judged']} of {r['n']} "
                f"unjudged ({r['errors']} engine errors)"
            )
    for model in scores["model"].unique(maintain_order=True).to_list():
        part = scores.filter(pl.col("model") == model).unique("benchmark", maintain_order=True)
        if part["contaminated"].null_count():
            lines.append(f"contamination {model}: unknown (no training sets in its lineage)")
            continue
        found = {r["benchmark"]: r["contaminated"] for r in part.iter_rows(named=True)}
        total = sum(found.values())
        what = ", ".join(f"{b} {n}" for b, n in found.items())
        lines.append(
            f"contamination {model}: {total} evaluated items found in its training sets ({what})"
        )
    return lines


def evaluation_markdown(state: EvaluationState) -> str:
    from tasks.evolution.funnel import png_data_uri

    scores = read(state.eval_scores)
    lines = ["# evolforge evaluation", ""]
    if scores is not None:
        lines += [
            "Accuracy % [Wilson 95% interval], n judged items; overlap = evaluated items found in "
            "the model's training sets (unknown without lineage).",
            "",
            scores_markdown(scores),
            "",
        ]
        lines += [f"- {line}" for line in _details(scores)]
    plot = chart_path(state)
    if plot is not None:
        lines += ["", f"![evaluation]({png_data_uri(plot)})", "", f"chart: `{plot}`"]
    lines += ["", "## Datasets", ""] + [f"- `{k}`: `{v}`" for k, v in state.refs().items()]
    return "\n".join(lines)


@task(name="publish_evaluation_report")
def publish_evaluation_report(state: EvaluationState) -> None:
    """The comparison table as a Prefect table artifact; the chart and details as markdown."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    scores = read(state.eval_scores)
    if scores is not None:
        create_table_artifact(
            key="eval-comparison",
            table=comparison_rows(scores),
            description="Accuracy % [95% interval] per model, benchmark and mode",
        )
    create_markdown_artifact(
        key="eval-report",
        markdown=evaluation_markdown(state),
        description="Evaluation scores, chart, contamination and dataset versions",
    )


def render_evaluation_summary(state: EvaluationState) -> str:
    """The text printed by `evolforge eval` (and after a factory run that evaluated)."""
    lines = ["", "== evolforge evaluation =="]
    items = read(state.eval_items)
    if items is not None:
        per = dict(items.group_by("benchmark", maintain_order=True).len().iter_rows())
        lines.append(
            f"items: {state.eval_items} (" + ", ".join(f"{b} {n}" for b, n in per.items()) + ")"
        )
    scores = read(state.eval_scores)
    if scores is not None:
        lines += ["", "accuracy % [95% Wilson interval], n judged:", scores_text(scores), ""]
        lines += _details(scores)
    lines += ["", "stages (computed vs cache hits; engine requests: hits / misses):"]
    lines += stage_lines(state.steps)
    plot = chart_path(state)
    lines += ["", f"results: {state.eval_results}   scores: {state.eval_scores}"]
    if plot:
        lines.append(f"chart:   {plot}")
    lines += [f'query:   evolforge sql "{q}"' for q in EVAL_QUERIES[:1]]
    lines += [f'         evolforge sql "{q}"' for q in EVAL_QUERIES[1:]]
    return "\n".join(lines)
