"""Listwise ranking of sibling evolutions by a judge: IRM data (the `rank_siblings` stage).

For each sibling group (a parent and its evolutions of one round, `tasks.rewards.siblings`) the
judge reads the parent and all siblings, labelled A, B, ..., and scores every sibling from 1 to
10 on WizardMath's three criteria (definition, precision, integrity) with a short reason, as
one JSON object under a schema (template `rank_siblings.txt`).

Position bias is controlled by asking twice: the siblings are shown in a seeded order (a)
and, by default, in its reverse (b), so every sibling sits at mirrored positions in the two
calls and a judge whose scores rise or fall with the position gives every sibling the same
combined score (no pair: the bias cancels). `second_order: shuffled` draws order b as a second
seeded permutation instead: such a judge then yields pairs, marked inconsistent where the two
orders flip them (the demo's 135M judge scores by position alone). Per order
a sibling's score is the mean of its three criteria; the two orders' scores are compared by
Kendall's tau-b (per group; null with fewer than two siblings, when one order's judgment failed,
or when one order scored everything equal). The group's scores are the mean of the orders that
were judged, and the ranking (`sibling_ids`, best first) sorts by them.

Derived values, per sibling, kept in the `scores` column:

- `score`: the mean of the three criteria over the judged orders, 1..10;
- `r_i = (score - 1) / 9`: the instruction reward normalised overall (one scale for all groups);
- `r_i_sibling`: the share of its siblings it beats (ties count half), i.e. normalised within
  the group; null with fewer than two scored siblings.

IRM pairs (`irm_pairs`, trl's preference format: `prompt`, `chosen`, `rejected`): every pair of
scored siblings whose scores differ; `margin` is the score gap (>= 0); `consistent` is true when
both orders put the two strictly in the same order, false when they flip or one order ties them,
null when only one order was judged.

Siblings whose text is null (the evolver's reply could not be parsed) are not shown to the judge
and are listed in `unrankable`. A judgment that is not the requested JSON, or misses a letter or
a criterion, is discarded as a whole for that order (`error_a` / `error_b`); a group with no
judged order has null rankings and scores and yields no pairs.
"""

from __future__ import annotations

import string
from itertools import combinations
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from infra.engines import EngineConfig
from infra.engines.base import ChatRequest, Engine
from tasks.frames import require_columns
from tasks.rewards.judging import JudgeError, json_object, kendall_tau_b, reply_text, stable_int
from tasks.rewards.records import InstructionRanking, IrmPair
from tasks.sampling import Sampling
from tasks.stage import StageContext, StageOutput, stage
from tasks.templates import Template, load_template

TEMPLATE = "rank_siblings"
CRITERIA = ("definition", "precision", "integrity")
LABELS = string.ascii_uppercase
MAX_SIBLINGS = len(LABELS)


RankingSampling = Sampling.defaults(
    "RankingSampling", "Sampling of the listwise judge (greedy).", max_tokens=1024
)


class RankingParams(BaseModel):
    """The listwise judge of sibling evolutions."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="seeds the presentation order of each group")
    second_order: Literal["reversed", "shuffled"] = Field(
        "reversed",
        description="order b: order a reversed (a positional bias cancels), or a second seeded "
        "permutation",
    )
    reason_max_chars: int = Field(
        160, ge=8, le=2000, description="length cap of each reason (it is decoded, so it costs)"
    )
    sampling: RankingSampling = Field(
        default_factory=RankingSampling, description="sampling of the judge's JSON reply"
    )


def ranking_schema(labels: list[str], reason_max_chars: int) -> dict[str, Any]:
    """JSON schema of the judge's reply: one entry per label, three 1-10 scores and a reason."""
    entry = {
        "type": "object",
        "properties": {
            **{c: {"type": "integer", "minimum": 1, "maximum": 10} for c in CRITERIA},
            "reason": {"type": "string", "maxLength": reason_max_chars},
        },
        "required": [*CRITERIA, "reason"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": dict.fromkeys(labels, entry),
        "required": list(labels),
        "additionalProperties": False,
    }


def presentation_orders(
    group_id: str, ids: list[str], seed: int, second: str = "reversed"
) -> tuple[list[str], list[str]]:
    """A seeded permutation of the siblings (order a) and its reverse or a second seeded
    permutation (order b)."""
    rng = np.random.default_rng(stable_int("rank-order", seed, group_id))
    order = [ids[i] for i in rng.permutation(len(ids))]
    if second == "reversed":
        return order, order[::-1]
    return order, [ids[i] for i in rng.permutation(len(ids))]


def ranking_request(
    template: Template, parent: str, texts: list[str], params: RankingParams
) -> ChatRequest:
    labels = list(LABELS[: len(texts)])
    listing = "\n\n".join(
        f"[{label}] {text.strip()}" for label, text in zip(labels, texts, strict=True)
    )
    return ChatRequest(
        messages=tuple(
            template.messages(parent=parent.strip(), siblings=listing, labels=", ".join(labels))
        ),
        sampling=params.sampling.engine_params(),
        json_schema=ranking_schema(labels, params.reason_max_chars),
        template_version=template.version,
    )


def criterion_score(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10:
        raise JudgeError(f"{where} must be an integer from 1 to 10, got {value!r}")
    return value


def parse_ranking(reply: str, labels: list[str]) -> dict[str, dict[str, Any]]:
    """label -> {definition, precision, integrity, reason} from the judge's JSON reply."""
    obj = {str(k).strip().strip("[]").upper(): v for k, v in json_object(reply).items()}
    out = {}
    for label in labels:
        entry = obj.get(label)
        if not isinstance(entry, dict):
            raise JudgeError(f"no entry for sibling {label}")
        entry = {str(k).strip().lower(): v for k, v in entry.items()}
        scores = {c: criterion_score(entry.get(c), f"{label}.{c}") for c in CRITERIA}
        reason = entry.get("reason")
        out[label] = {**scores, "reason": str(reason).strip() if reason is not None else None}
    return out


def _mean_score(entry: dict[str, Any]) -> float:
    return sum(entry[c] for c in CRITERIA) / len(CRITERIA)


def _ranking(scores: dict[str, float]) -> list[str]:
    return sorted(scores, key=lambda i: (-scores[i], i))


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def rank_groups(
    siblings: pl.DataFrame,
    parent_texts: dict[str, str],
    engine: Engine,
    params: RankingParams,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(instruction_rankings, irm_pairs) for the sibling groups; see the module docstring."""
    require_columns(
        siblings, ["group_id", "parent_id", "round", "id", "source", "text"], "rank siblings"
    )
    template = load_template(TEMPLATE)
    groups = []
    requests: list[ChatRequest] = []
    for (group_id,), rows in siblings.group_by(["group_id"], maintain_order=True):
        parent_id, rnd = rows["parent_id"][0], rows["round"][0]
        if parent_id not in parent_texts:
            raise ValueError(
                f"siblings group {group_id!r}: parent {parent_id!r} not in instructions"
            )
        rankable = rows.filter(
            pl.col("text").is_not_null() & (pl.col("text").str.strip_chars() != "")
        )
        if rankable.height > MAX_SIBLINGS:
            raise ValueError(
                f"siblings group {group_id!r}: {rankable.height} siblings, at most {MAX_SIBLINGS}"
            )
        ids = rankable["id"].to_list()
        texts = dict(zip(ids, rankable["text"].to_list(), strict=True))
        group = {
            "group_id": group_id,
            "parent_id": parent_id,
            "round": rnd,
            "ids": ids,
            "texts": texts,
            "sources": dict(zip(ids, rankable["source"].to_list(), strict=True)),
            "unrankable": rows.filter(~pl.col("id").is_in(ids))["id"].to_list(),
            "requests": [],
        }
        if ids:
            order_a, order_b = presentation_orders(group_id, ids, params.seed, params.second_order)
            group["orders"] = (order_a, order_b)
            for order in (order_a, order_b):
                group["requests"].append(len(requests))
                requests.append(
                    ranking_request(
                        template, parent_texts[parent_id], [texts[i] for i in order], params
                    )
                )
        groups.append(group)
    responses = engine.generate(requests) if requests else []
    if len(responses) != len(requests):
        raise RuntimeError(f"engine returned {len(responses)} responses for {len(requests)}")

    ranking_rows, pair_rows = [], []
    for group in groups:
        row, pairs = _judge_group(group, responses, parent_texts, engine.identity, template.version)
        ranking_rows.append(row)
        pair_rows.extend(pairs)
    rankings = InstructionRanking.frame(ranking_rows, orient="row")
    pairs = IrmPair.frame(pair_rows, orient="row")
    return rankings, pairs


def _judge_group(
    group: dict[str, Any],
    responses: list[Any],
    parent_texts: dict[str, str],
    model: str,
    template_version: str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    ids = group["ids"]
    row: dict[str, Any] = {
        "group_id": group["group_id"],
        "parent_id": group["parent_id"],
        "round": group["round"],
        "n_siblings": len(ids),
        "unrankable": group["unrankable"],
        "judge_model": model,
        "template_version": template_version,
    }
    if not ids:
        row |= {"error_a": "no rankable sibling", "error_b": "no rankable sibling"}
        return row, []
    per_order: list[dict[str, dict[str, Any]] | None] = []
    for name, order, index in zip("ab", group["orders"], group["requests"], strict=True):
        labels = list(LABELS[: len(order)])
        row[f"order_{name}"] = order
        try:
            parsed = parse_ranking(reply_text(responses[index]), labels)
        except JudgeError as exc:
            row[f"error_{name}"] = str(exc)
            per_order.append(None)
            continue
        by_id = {sid: parsed[label] for label, sid in zip(labels, order, strict=True)}
        per_order.append(by_id)
        row[f"scores_{name}"] = [{"id": sid, **by_id[sid]} for sid in order]
        row[f"ranking_{name}"] = _ranking({sid: _mean_score(by_id[sid]) for sid in ids})
    judged = [o for o in per_order if o is not None]
    if not judged:
        return row, []
    criteria = {
        sid: {c: sum(o[sid][c] for o in judged) / len(judged) for c in CRITERIA} for sid in ids
    }
    combined = {sid: sum(criteria[sid].values()) / len(CRITERIA) for sid in ids}
    order_scores = [
        {sid: _mean_score(o[sid]) for sid in ids} if o is not None else None for o in per_order
    ]
    both = all(o is not None for o in order_scores)
    if both:
        a, b = order_scores
        row["tau"] = kendall_tau_b([a[i] for i in ids], [b[i] for i in ids])
    ranking = _ranking(combined)
    scores = []
    for sid in ranking:
        others = [combined[o] for o in ids if o != sid]
        beats = sum(
            1.0 if combined[sid] > s else 0.5 if combined[sid] == s else 0.0 for s in others
        )
        scores.append(
            {
                "id": sid,
                "source": group["sources"][sid],
                **criteria[sid],
                "score": combined[sid],
                "r_i": (combined[sid] - 1.0) / 9.0,
                "r_i_sibling": beats / len(others) if others else None,
            }
        )
    row |= {"sibling_ids": ranking, "scores": scores}

    pairs = []
    for x, y in combinations(ids, 2):
        gap = combined[x] - combined[y]
        if gap == 0:
            continue
        chosen, rejected = (x, y) if gap > 0 else (y, x)
        consistent = None
        if both:
            a, b = order_scores
            consistent = _sign(a[chosen] - a[rejected]) == 1 and _sign(b[chosen] - b[rejected]) == 1
        pairs.append(
            {
                "id": f"{chosen}>{rejected}",
                "parent_id": group["parent_id"],
                "round": group["round"],
                "prompt": parent_texts[group["parent_id"]],
                "chosen": group["texts"][chosen],
                "rejected": group["texts"][rejected],
                "chosen_id": chosen,
                "rejected_id": rejected,
                "chosen_score": combined[chosen],
                "rejected_score": combined[rejected],
                "margin": abs(gap),
                "consistent": consistent,
            }
        )
    row["n_pairs"] = len(pairs)
    row["n_consistent"] = sum(1 for p in pairs if p["consistent"] is True)
    return row, pairs


@stage(
    name="rank_siblings",
    outputs={"instruction_rankings": InstructionRanking, "irm_pairs": IrmPair},
)
def rank_siblings(
    ctx: StageContext,
    siblings: pl.DataFrame,
    instructions: pl.DataFrame,
    judge: EngineConfig,
    params: RankingParams,
) -> StageOutput:
    """The judge scores each sibling group twice (seeded order and its reverse): IRM data."""
    require_columns(instructions, ["id", "text"], "rank_siblings instructions")
    wanted = set(siblings["parent_id"].to_list())
    parents = instructions.filter(pl.col("id").is_in(wanted)).unique("id", keep="first")
    parent_texts = dict(zip(parents["id"], parents["text"], strict=True))
    rankings, pairs = rank_groups(siblings, parent_texts, ctx.engine(judge), params)
    taus = rankings["tau"].drop_nulls()
    stats = {
        "groups": rankings.height,
        "ranked": rankings.filter(pl.col("sibling_ids").is_not_null()).height,
        "failed_orders": int(rankings["error_a"].is_not_null().sum())
        + int(rankings["error_b"].is_not_null().sum()),
        "unrankable_siblings": int(rankings["unrankable"].list.len().sum() or 0),
        "tau_groups": taus.len(),
        "mean_tau": float(taus.mean()) if taus.len() else None,
        "pairs": pairs.height,
        "consistent_pairs": int(pairs["consistent"].fill_null(False).sum()),
        "unjudged_pairs": int(pairs["consistent"].is_null().sum()),
    }
    return StageOutput({"instruction_rankings": rankings, "irm_pairs": pairs}, stats)
