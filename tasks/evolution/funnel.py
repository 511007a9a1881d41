"""The evolution funnel: per round, generated → eliminated (per rule) → duplicate → contaminated
→ kept, per direction and operation; and the difficulty check of the evolution directions.

`round_funnel` counts one round from its frames and checks that the counts reconcile
(generated = eliminated + duplicate + contaminated + kept). `plot_funnel` draws the stacked
counts per round (a PNG stored as the `funnel_plot` artifact), `funnel_markdown` renders the table for a
Prefect artifact and the CLI run summary.
"""

from __future__ import annotations

import base64
from pathlib import Path

import polars as pl

from tasks.evolution.records import FunnelCounts
from tasks.stage import Artifact, StageContext, StageOutput, stage

PLOT_FILE = "funnel.png"
FUNNEL_KEYS = ["round", "direction", "op"]
OUTCOMES = ["eliminated", "duplicate", "contaminated", "kept"]
DUPLICATE_RULES = {"exact_duplicate", "near_duplicate"}
CONTAMINATION_RULES = {"contaminated_ngram", "contaminated_embedding"}


class FunnelMismatchError(AssertionError):
    """Counts that do not reconcile: a row was lost or counted twice."""


def _outcome() -> pl.Expr:
    rule = pl.col("rule")
    return (
        pl.when(rule.is_in(list(DUPLICATE_RULES)))
        .then(pl.lit("duplicate"))
        .when(rule.is_in(list(CONTAMINATION_RULES)))
        .then(pl.lit("contaminated"))
        .otherwise(pl.lit("eliminated"))
    )


def round_funnel(
    generated: pl.DataFrame, removed: pl.DataFrame, kept: pl.DataFrame
) -> pl.DataFrame:
    """Counts per (round, direction, op). `removed` has a `rule` column per removed row."""
    base = generated.group_by(FUNNEL_KEYS).agg(pl.len().alias("generated"))
    removed = removed.with_columns(_outcome().alias("outcome"))
    counts = base
    for outcome in ["eliminated", "duplicate", "contaminated"]:
        part = (
            removed.filter(pl.col("outcome") == outcome)
            .group_by(FUNNEL_KEYS)
            .agg(pl.len().alias(outcome))
        )
        counts = counts.join(part, on=FUNNEL_KEYS, how="left")
    counts = counts.join(
        kept.group_by(FUNNEL_KEYS).agg(pl.len().alias("kept")), on=FUNNEL_KEYS, how="left"
    )
    by_rule = (
        removed.filter(pl.col("outcome") == "eliminated")
        .group_by([*FUNNEL_KEYS, "rule"])
        .agg(pl.len().alias("n"))
        .sort("rule")
        .group_by(FUNNEL_KEYS)
        .agg(
            pl.concat_str([pl.col("rule"), pl.col("n").cast(pl.String)], separator="=")
            .str.join(", ")
            .alias("eliminated_by_rule")
        )
    )
    counts = (
        counts.join(by_rule, on=FUNNEL_KEYS, how="left")
        .with_columns([pl.col(c).fill_null(0) for c in OUTCOMES])
        .with_columns(pl.col("eliminated_by_rule").fill_null(""))
        .select(FunnelCounts.columns())
        .cast(FunnelCounts.schema())
        .sort(FUNNEL_KEYS)
    )
    total = counts.select(sum(pl.col(c) for c in OUTCOMES).alias("s"), "generated")
    if not total["s"].equals(total["generated"]):
        raise FunnelMismatchError(f"funnel does not reconcile:\n{counts}")
    if removed.height + kept.height != generated.height:
        raise FunnelMismatchError(
            f"generated {generated.height} != removed {removed.height} + kept {kept.height}"
        )
    return counts


def funnel_by_round(funnel: pl.DataFrame) -> pl.DataFrame:
    return (
        funnel.group_by("round")
        .agg([pl.col(c).sum() for c in ["generated", *OUTCOMES]])
        .sort("round")
    )


def funnel_markdown(funnel: pl.DataFrame, difficulty: pl.DataFrame | None = None) -> str:
    lines = [
        "| round | direction | op | generated | eliminated | duplicate | contaminated | kept | eliminated by rule |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in funnel.sort(FUNNEL_KEYS).iter_rows(named=True):
        lines.append(
            f"| {r['round']} | {r['direction']} | {r['op']} | {r['generated']} | {r['eliminated']} | "
            f"{r['duplicate']} | {r['contaminated']} | {r['kept']} | {r['eliminated_by_rule']} |"
        )
    totals = funnel_by_round(funnel)
    lines += [
        "",
        "| round | generated | eliminated | duplicate | contaminated | kept |",
        "|---|---|---|---|---|---|",
    ]
    for r in totals.iter_rows(named=True):
        lines.append(
            f"| {r['round']} | {r['generated']} | {r['eliminated']} | {r['duplicate']} | {r['contaminated']} | {r['kept']} |"
        )
    if difficulty is not None and difficulty.height:
        lines += ["", difficulty_markdown(difficulty)]
    return "\n".join(lines)


def difficulty_markdown(difficulty: pl.DataFrame) -> str:
    cols = difficulty.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in difficulty.iter_rows():
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def funnel_text(funnel: pl.DataFrame) -> str:
    """A plain-text table of the per-round totals for the terminal."""
    totals = funnel_by_round(funnel)
    header = f"{'round':>5} {'generated':>9} {'eliminated':>10} {'duplicate':>9} {'contaminated':>12} {'kept':>6}"
    rows = [
        f"{r['round']:>5} {r['generated']:>9} {r['eliminated']:>10} {r['duplicate']:>9} {r['contaminated']:>12} {r['kept']:>6}"
        for r in totals.iter_rows(named=True)
    ]
    return "\n".join([header, *rows])


def plot_funnel(funnel: pl.DataFrame, path: Path, title: str = "evolution funnel") -> Path:
    """Stacked bars per round: kept, eliminated, duplicate, contaminated (they sum to generated);
    and a second panel with kept evolutions per direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    totals = funnel_by_round(funnel)
    rounds = totals["round"].to_list()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    bottom = [0] * len(rounds)
    colors = {
        "kept": "#2a9d8f",
        "eliminated": "#e76f51",
        "duplicate": "#f4a261",
        "contaminated": "#6d597a",
    }
    for outcome in ["kept", "eliminated", "duplicate", "contaminated"]:
        values = totals[outcome].to_list()
        ax1.bar(rounds, values, bottom=bottom, label=outcome, color=colors[outcome])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax1.set_xlabel("round")
    ax1.set_ylabel("evolutions")
    ax1.set_title(title)
    ax1.set_xticks(rounds)
    ax1.legend()
    per_dir = (
        funnel.group_by(["round", "direction"])
        .agg(pl.col("kept").sum())
        .sort(["round", "direction"])
    )
    bottom = [0] * len(rounds)
    for direction, color in [("upward", "#264653"), ("downward", "#e9c46a")]:
        sub = dict(per_dir.filter(pl.col("direction") == direction).select("round", "kept").rows())
        values = [sub.get(r, 0) for r in rounds]
        ax2.bar(rounds, values, bottom=bottom, label=direction, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax2.set_xlabel("round")
    ax2.set_ylabel("kept evolutions")
    ax2.set_title("kept by direction")
    ax2.set_xticks(rounds)
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@stage(name="funnel_plot", outputs={"funnel_plot": Artifact(kind="plot")})
def draw_funnel_plot(ctx: StageContext, funnel: pl.DataFrame) -> StageOutput:
    """The funnel per round and the kept evolutions per direction, as a PNG artifact."""
    plot_funnel(funnel, ctx.output_dir("funnel_plot") / PLOT_FILE)
    return StageOutput(stats={"rounds": funnel["round"].n_unique() if funnel.height else 0})
