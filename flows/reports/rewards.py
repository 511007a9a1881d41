"""The rewards flow's report: a text summary for the CLI and a Prefect markdown artifact, from its
`RewardState`.

Figures: sibling groups ranked, mean Kendall tau between the two presentation orders and the
share of consistent IRM pairs; step labels with their judge / Monte Carlo agreement per round;
PoT outcomes; rewards with their nulls counted by reason; per stage the engine's requests,
tokens and seconds (`flows.reports.common.stage_lines`). Every query printed runs on the datasets a run
wrote (a test runs them).
"""

from __future__ import annotations

from typing import Any

import polars as pl
from prefect import task

from flows.reports.common import stage_lines
from flows.state import RewardState
from storage.settings import home
from tasks.stage import read

REWARD_QUERIES = [
    "SELECT parent_id, round, sibling_ids, tau FROM instruction_rankings LIMIT 5",
    "SELECT prompt, chosen, rejected, margin, consistent FROM irm_pairs LIMIT 5",
    "SELECT round, count(*) AS steps, count(consensus) AS kept, "
    "count(*) FILTER (judge <> mc_hard) AS disagree FROM step_labels "
    "WHERE label_source = 'steps' GROUP BY round ORDER BY round",
    "SELECT count(*) FROM rewards WHERE abs(r - r_i * r_a) > 1e-9",
    "SELECT instruction_id, solution_id, r_i, r_a, r, r_i_note, r_a_note FROM rewards LIMIT 5",
]


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ranking_figures(rankings: pl.DataFrame, pairs: pl.DataFrame) -> dict[str, Any]:
    """Groups, ranked groups, mean tau, pairs and the share of consistent ones."""
    taus = rankings["tau"].drop_nulls()
    judged_pairs = pairs.filter(pl.col("consistent").is_not_null())
    return {
        "groups": rankings.height,
        "ranked": rankings.filter(pl.col("sibling_ids").is_not_null()).height,
        "tau_groups": taus.len(),
        "mean_tau": float(taus.mean()) if taus.len() else None,
        "pairs": pairs.height,
        "consistent_share": (
            float(judged_pairs["consistent"].mean()) if judged_pairs.height else None
        ),
    }


def rewards_summary(state: RewardState) -> str:
    """The text printed after the rewards flow."""
    lines = ["", "== rewards =="]
    siblings = read(state.siblings)
    rankings = read(state.instruction_rankings)
    pairs = read(state.irm_pairs)
    labels = read(state.step_labels)
    rewards = read(state.rewards)
    if siblings is not None:
        generated = siblings.filter(pl.col("source") == "evolver").height
        lines.append(
            f"siblings: {siblings['group_id'].n_unique()} parent groups, {siblings.height} "
            f"siblings ({generated} new, {siblings.height - generated} from the data flow)"
        )
    if rankings is not None and pairs is not None:
        f = ranking_figures(rankings, pairs)
        lines.append(
            f"instruction rankings: {f['ranked']} of {f['groups']} groups ranked; mean tau between "
            f"the two orders {_f(f['mean_tau'])} over {f['tau_groups']} groups; IRM pairs "
            f"{f['pairs']}, consistent {_f(f['consistent_share'])}"
        )
    if labels is not None:
        steps = labels.filter(pl.col("label_source") == "steps")
        pot = labels.filter(pl.col("label_source") == "execution")
        lines.append(
            f"step labels: {steps.height} steps of {steps['solution_id'].n_unique()} CoT "
            f"solutions: judge {steps['judge'].is_not_null().sum()}, monte carlo "
            f"{steps['mc_hard'].is_not_null().sum()}, consensus kept "
            f"{steps['consensus'].is_not_null().sum()}; PoT outcomes {pot.height} "
            f"(correct {pot['consensus'].fill_null(False).sum()}, unknown "
            f"{pot['consensus'].is_null().sum()})"
        )
        both = steps.filter(pl.col("judge").is_not_null() & pl.col("mc_hard").is_not_null())
        by_round = both.group_by("round").agg(
            pl.len().alias("both"), (pl.col("judge") != pl.col("mc_hard")).sum().alias("disagree")
        )
        for r in by_round.sort("round").iter_rows(named=True):
            lines.append(
                f"  round {r['round']}: judge and monte carlo disagree on {r['disagree']} of "
                f"{r['both']} steps labelled by both"
            )
    if rewards is not None:
        nulls = rewards["r_i_note"].drop_nulls().value_counts(sort=True).iter_rows()
        nulls_a = rewards["r_a_note"].drop_nulls().value_counts(sort=True).iter_rows()
        lines.append(
            f"rewards: {rewards.height} solutions, r known for {rewards['r'].is_not_null().sum()} "
            f"(mean {_f(rewards['r'].mean())}); r_i null: "
            + (", ".join(f"{n} {why}" for why, n in nulls) or "none")
            + "; r_a null: "
            + (", ".join(f"{n} {why}" for why, n in nulls_a) or "none")
        )
    lines += ["", "reward stages (computed vs cache hits; engine requests: hits / misses):"]
    lines += stage_lines(state.steps)
    lines += ["", f"catalog: {home() / 'catalog.duckdb'}"]
    lines += [f'query:   evolforge sql "{q}"' for q in REWARD_QUERIES[:1]]
    lines += [f'         evolforge sql "{q}"' for q in REWARD_QUERIES[1:]]
    return "\n".join(lines)


@task(name="publish_rewards_report")
def publish_rewards_report(state: RewardState) -> None:
    """The rewards summary as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    text = rewards_summary(state)
    create_markdown_artifact(
        key="rewards-report",
        markdown="# evolforge rewards\n\n```\n" + text.strip() + "\n```\n",
        description="IRM rankings, PRM step labels and r = rI · rA",
    )
