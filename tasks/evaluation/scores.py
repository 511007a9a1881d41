"""Scores: accuracy with a Wilson 95% interval per model x benchmark x mode, and the chart.

`eval_scores` columns: model, model_ref, benchmark, mode, prompt_format; `n` items, `judged`
(items with a verdict: an engine failure or a checker timeout leaves an item unjudged),
`correct`, `accuracy` = correct / judged and its Wilson score interval (`ci_low`, `ci_high`;
null when nothing was judged), `no_answer` (completions with no final answer), `truncated`
(stopped at max_tokens), `errors`, `fallback_rate` (hybrid: share of items answered by the CoT
fallback; null in other modes), `mean_completion_tokens`, and the contamination guard's
`contaminated` (evaluated items found in the model's training sets; null when they are unknown)
with `accuracy_clean` (accuracy on the other items).

The Wilson interval is used rather than the normal approximation because it stays inside [0, 1]
and is sensible at 0 or n correct and at the small n of a demo.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from tasks.evaluation.records import EvalScore
from tasks.frames import require_columns
from tasks.stage import Artifact, StageContext, StageOutput, stage

Z95 = 1.959963984540054
PLOT_FILE = "eval_scores.png"


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """The Wilson score interval of a binomial proportion correct / n; (None, None) for n = 0."""
    if n < 0 or correct < 0 or correct > n:
        raise ValueError(f"wilson_interval needs 0 <= correct <= n, got {correct} of {n}")
    if n == 0:
        return None, None
    p = correct / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    low = 0.0 if correct == 0 else max(0.0, center - half)
    high = 1.0 if correct == n else min(1.0, center + half)
    return low, high


def score_results(results: pl.DataFrame, contamination: pl.DataFrame | None) -> pl.DataFrame:
    """`eval_scores` (`EvalScore`) from `eval_results` and the guard's `eval_contamination`,
    in the order models, benchmarks and modes first appear."""
    require_columns(
        results,
        ["model", "benchmark", "item_id", "mode", "correct", "extracted_answer", "error"],
        "eval_results",
    )
    frame = results
    if contamination is not None and contamination.height:
        flags = contamination.select("model", "benchmark", "item_id", "contaminated")
        frame = frame.join(flags, on=["model", "benchmark", "item_id"], how="left")
    else:
        frame = frame.with_columns(pl.lit(None, pl.Boolean).alias("contaminated"))
    keys = ["model", "benchmark", "mode"]
    grouped = frame.group_by(keys, maintain_order=True).agg(
        pl.col("model_ref").first(),
        pl.col("prompt_format").first(),
        pl.len().alias("n"),
        pl.col("correct").count().alias("judged"),
        pl.col("correct").sum().alias("correct"),
        (pl.col("extracted_answer").is_null() & pl.col("error").is_null()).sum().alias("no_answer"),
        (pl.col("finish_reason") == "length").sum().alias("truncated"),
        pl.col("error").is_not_null().sum().alias("errors"),
        pl.col("fallback").cast(pl.Float64).mean().alias("fallback_rate"),
        pl.col("completion_tokens").mean().alias("mean_completion_tokens"),
        pl.col("contaminated").sum().alias("_flagged"),
        pl.col("contaminated").count().alias("_checked"),
        (pl.col("correct") & ~pl.col("contaminated")).sum().alias("_clean_correct"),
        (pl.col("correct").is_not_null() & ~pl.col("contaminated")).sum().alias("_clean_judged"),
    )
    rows = []
    for r in grouped.iter_rows(named=True):
        low, high = wilson_interval(r["correct"], r["judged"])
        checked = r["_checked"] > 0
        rows.append(
            {
                **{k: r[k] for k in EvalScore.columns() if k in r and not k.startswith("_")},
                "accuracy": r["correct"] / r["judged"] if r["judged"] else None,
                "ci_low": low,
                "ci_high": high,
                "contaminated": r["_flagged"] if checked else None,
                "accuracy_clean": (
                    r["_clean_correct"] / r["_clean_judged"]
                    if checked and r["_clean_judged"]
                    else None
                ),
            }
        )
    return EvalScore.frame(rows)


@stage(name="eval_scores", outputs={"eval_scores": EvalScore})
def score_evaluation(
    eval_results: pl.DataFrame, eval_contamination: pl.DataFrame | None
) -> StageOutput:
    """Accuracy with Wilson 95% intervals per model x benchmark x mode, overlap next to it."""
    scores = score_results(eval_results, eval_contamination)
    return StageOutput({"eval_scores": scores}, {"rows": scores.height})


def plot_scores(scores: pl.DataFrame, path: Path, title: str = "evaluation") -> Path:
    """Grouped bars: one panel per benchmark, one group per mode, one bar per model, with the
    95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = scores["benchmark"].unique(maintain_order=True).to_list() or ["(none)"]
    models = scores["model"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(
        1, len(benchmarks), figsize=(max(5.0, 4.2 * len(benchmarks)), 4.0), squeeze=False
    )
    colors = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(models))
    for ax, bench in zip(axes[0], benchmarks, strict=True):
        part = scores.filter(pl.col("benchmark") == bench)
        modes = part["mode"].unique(maintain_order=True).to_list()
        for m, model in enumerate(models):
            rows = {
                r["mode"]: r for r in part.filter(pl.col("model") == model).iter_rows(named=True)
            }
            xs, ys, lo, hi = [], [], [], []
            for x, mode in enumerate(modes):
                r = rows.get(mode)
                if r is None or r["accuracy"] is None:
                    continue
                xs.append(x - 0.4 + width * (m + 0.5))
                ys.append(100 * r["accuracy"])
                lo.append(max(0.0, 100 * (r["accuracy"] - r["ci_low"])))
                hi.append(max(0.0, 100 * (r["ci_high"] - r["accuracy"])))
            bars = ax.bar(
                xs, ys, width, yerr=[lo, hi], capsize=3, label=model, color=colors(m % 10)
            )
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels(modes)
        n = part["n"].max() if part.height else 0
        ax.set_title(f"{bench} (n={n})")
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy % (95% Wilson interval)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


@stage(name="eval_chart", outputs={"eval_chart": Artifact(kind="plot")})
def draw_evaluation_chart(ctx: StageContext, eval_scores: pl.DataFrame) -> StageOutput:
    """Accuracy per model, benchmark and mode with 95% intervals, as a PNG artifact."""
    plot_scores(eval_scores, ctx.output_dir("eval_chart") / PLOT_FILE)
    return StageOutput(stats={"bars": eval_scores.height})
