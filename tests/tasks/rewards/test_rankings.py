"""Listwise sibling rankings: parsing, the two orders, tau, consistent pairs, failures as nulls."""

from __future__ import annotations

import json

import polars as pl
import pytest

from tasks.rewards.judging import JudgeError, kendall_tau_b
from tasks.rewards.rankings import (
    RankingParams,
    parse_ranking,
    presentation_orders,
    rank_groups,
    ranking_schema,
)
from tasks.rewards.records import InstructionRanking, IrmPair
from tests.fakes import ScriptedEngine
from tests.tasks.rewards.helpers import listed_siblings, ranking_reply

PARENTS = {"p": "What is 2 + 3?", "q": "What is 10 - 4?"}


def siblings_frame() -> pl.DataFrame:
    rows = [
        ("p@1", "p", 1, "x1", "instructions", "short one"),
        ("p@1", "p", 1, "x2", "evolver", "a medium length problem"),
        ("p@1", "p", 1, "x3", "evolver", "the longest of these three problems here"),
        ("p@1", "p", 1, "x4", "evolver", None),  # unparseable
        ("q@1", "q", 1, "y1", "instructions", "only one sibling"),
    ]
    return pl.DataFrame(
        rows, schema=["group_id", "parent_id", "round", "id", "source", "text"], orient="row"
    )


def by_length(text: str, position: int) -> int:
    return min(10, 1 + len(text.split()))


def test_parse_ranking_accepts_wrapped_json_and_rejects_incomplete_replies():
    good = {"A": {"definition": 7, "precision": "8", "integrity": 6.0, "reason": "ok"}}
    assert parse_ranking("Sure: " + json.dumps(good) + " done", ["A"]) == {
        "A": {"definition": 7, "precision": 8, "integrity": 6, "reason": "ok"}
    }
    with pytest.raises(JudgeError, match="no entry for sibling B"):
        parse_ranking(json.dumps(good), ["A", "B"])
    with pytest.raises(JudgeError, match=r"A.precision must be an integer from 1 to 10"):
        parse_ranking(json.dumps({"A": {**good["A"], "precision": 11}}), ["A"])
    with pytest.raises(JudgeError, match="no JSON object"):
        parse_ranking("I like A best", ["A"])


def test_schema_requires_every_label_and_bounds_scores():
    schema = ranking_schema(["A", "B"], 40)
    assert schema["required"] == ["A", "B"]
    entry = schema["properties"]["A"]
    assert entry["properties"]["definition"] == {"type": "integer", "minimum": 1, "maximum": 10}
    assert entry["properties"]["reason"]["maxLength"] == 40


def test_orders_are_seeded_and_mirrored():
    ids = ["a", "b", "c", "d", "e"]
    a, b = presentation_orders("g", ids, seed=0)
    assert sorted(a) == ids and b == a[::-1]
    assert presentation_orders("g", ids, seed=0) == (a, b)
    assert any(presentation_orders("g", ids, seed=s)[0] != a for s in range(1, 5))


def test_shuffled_second_order_is_a_second_seeded_permutation():
    ids = ["a", "b", "c", "d", "e"]
    a, b = presentation_orders("g", ids, seed=0, second="shuffled")
    assert sorted(b) == ids and b not in (a, a[::-1])
    assert a == presentation_orders("g", ids, seed=0)[0]  # order a does not change
    assert presentation_orders("g", ids, seed=0, second="shuffled") == (a, b)


def test_kendall_tau_b():
    assert kendall_tau_b([1, 2, 3], [1, 2, 3]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau_b([1, 2, 3], [1, 1, 1]) is None  # one list all ties
    assert kendall_tau_b([1], [1]) is None
    assert kendall_tau_b([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    assert kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 6**0.5)  # as scipy's tau-b


def test_a_fair_judge_agrees_with_itself_across_orders():
    engine = ScriptedEngine(ranking_reply(by_length), identity="judge")
    rankings, pairs = rank_groups(siblings_frame(), PARENTS, engine, RankingParams())
    assert rankings.schema == InstructionRanking.schema() and pairs.schema == IrmPair.schema()
    assert len(engine.calls) == 4  # two orders per group
    p = rankings.filter(pl.col("group_id") == "p@1").row(0, named=True)
    assert p["sibling_ids"] == ["x3", "x2", "x1"]  # best first
    assert p["unrankable"] == ["x4"] and p["n_siblings"] == 3
    assert p["order_b"] == p["order_a"][::-1]
    assert p["tau"] == 1.0 and p["n_pairs"] == 3 and p["n_consistent"] == 3
    scores = {s["id"]: s for s in p["scores"]}
    assert scores["x3"]["score"] == 8.0 and scores["x3"]["r_i"] == pytest.approx(7 / 9)
    assert scores["x3"]["r_i_sibling"] == 1.0 and scores["x1"]["r_i_sibling"] == 0.0
    assert scores["x1"]["source"] == "instructions"
    # the judge saw the siblings in order a, labelled A, B, C
    seen = [text for _, text in listed_siblings(engine.calls[0])]
    texts = dict(zip(siblings_frame()["id"], siblings_frame()["text"], strict=True))
    assert seen == [texts[i] for i in p["order_a"]]

    p_pairs = pairs.filter(pl.col("parent_id") == "p")
    assert p_pairs["consistent"].to_list() == [True, True, True]
    assert (p_pairs["margin"] > 0).all()
    top = p_pairs.filter(pl.col("chosen_id") == "x3", pl.col("rejected_id") == "x1").row(
        0, named=True
    )
    assert top["prompt"] == PARENTS["p"] and top["chosen"] == texts["x3"]
    assert top["margin"] == pytest.approx(8.0 - 3.0)

    q = rankings.filter(pl.col("group_id") == "q@1").row(0, named=True)
    assert q["sibling_ids"] == ["y1"] and q["tau"] is None and q["n_pairs"] == 0
    assert q["scores"][0]["r_i_sibling"] is None  # alone in its group


def test_a_position_biased_judge_flips_every_pair():
    """Scoring by position only: the reversed order reverses the ranking."""
    engine = ScriptedEngine(ranking_reply(lambda text, position: 9 - position), identity="judge")
    rankings, pairs = rank_groups(siblings_frame(), PARENTS, engine, RankingParams())
    p = rankings.filter(pl.col("group_id") == "p@1").row(0, named=True)
    assert p["tau"] == -1.0 and p["ranking_a"] == p["ranking_b"][::-1]
    # averaged over both orders every sibling scores the same: no preference, no pair
    assert {s["score"] for s in p["scores"]} == {8.0}
    assert pairs.filter(pl.col("parent_id") == "p").height == 0


def test_a_position_biased_judge_with_shuffled_orders_gives_inconsistent_pairs():
    """With a second shuffled order the positional scores no longer cancel: pairs come out,
    and every one that the two orders flip is marked inconsistent."""
    engine = ScriptedEngine(ranking_reply(lambda text, position: 9 - position), identity="judge")
    params = RankingParams(second_order="shuffled")
    rankings, pairs = rank_groups(siblings_frame(), PARENTS, engine, params)
    p = rankings.filter(pl.col("group_id") == "p@1").row(0, named=True)
    assert p["order_b"] != p["order_a"][::-1] and sorted(p["order_b"]) == sorted(p["order_a"])
    p_pairs = pairs.filter(pl.col("parent_id") == "p")
    assert p_pairs.height > 0 and (p_pairs["margin"] > 0).all()
    position = {o: {sid: i for i, sid in enumerate(p[o])} for o in ("order_a", "order_b")}
    for row in p_pairs.iter_rows(named=True):
        same = [
            position[o][row["chosen_id"]] < position[o][row["rejected_id"]]
            for o in ("order_a", "order_b")
        ]
        assert row["consistent"] == all(same)


def test_partly_biased_judge_marks_flipped_pairs_inconsistent():
    def score(text: str, position: int) -> int:
        # content decides, but the first listed sibling gets a large bonus
        return min(10, len(text.split()) // 2 + (6 if position == 0 else 0))

    engine = ScriptedEngine(ranking_reply(score), identity="judge")
    rankings, pairs = rank_groups(siblings_frame(), PARENTS, engine, RankingParams())
    p_pairs = pairs.filter(pl.col("parent_id") == "p")
    assert p_pairs.height > 0
    assert False in p_pairs["consistent"].to_list()
    p = rankings.filter(pl.col("group_id") == "p@1").row(0, named=True)
    assert p["n_consistent"] == p_pairs["consistent"].sum() < p["n_pairs"]
    assert p["tau"] is not None and p["tau"] < 1.0


def test_one_failed_order_keeps_scores_but_not_consistency():
    inner = ranking_reply(by_length)
    calls = []

    def reply(request, i):
        calls.append(request)
        if len(calls) == 1:  # the first request: group p, order a
            raise RuntimeError("judge crashed")
        return inner(request, i)

    engine = ScriptedEngine(reply, identity="judge")
    rankings, pairs = rank_groups(siblings_frame(), PARENTS, engine, RankingParams())
    p = rankings.filter(pl.col("group_id") == "p@1").row(0, named=True)
    assert "engine error" in p["error_a"] and p["scores_a"] is None and p["error_b"] is None
    assert p["tau"] is None and p["sibling_ids"] == ["x3", "x2", "x1"]
    assert pairs.filter(pl.col("parent_id") == "p")["consistent"].null_count() == 3


def test_both_orders_failing_leave_the_group_unranked():
    engine = ScriptedEngine(lambda request, i: "not json at all", identity="judge")
    rankings, pairs = rank_groups(siblings_frame(), PARENTS, engine, RankingParams())
    assert rankings["sibling_ids"].null_count() == 2 and rankings["scores"].null_count() == 2
    assert rankings["error_a"].str.contains("no JSON object").all()
    assert pairs.height == 0


def test_unknown_parent_is_a_one_line_error():
    engine = ScriptedEngine(ranking_reply(by_length))
    with pytest.raises(ValueError, match="parent 'q' not in instructions"):
        rank_groups(siblings_frame(), {"p": "x"}, engine, RankingParams())


def test_requests_carry_schema_and_template_version():
    engine = ScriptedEngine(ranking_reply(by_length))
    rank_groups(siblings_frame(), PARENTS, engine, RankingParams(reason_max_chars=30))
    request = engine.calls[0]
    assert request.json_schema["required"] == ["A", "B", "C"]
    assert request.template_version and request.sampling.temperature == 0.0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rank_siblings_stage_with_the_embedded_model(evolforge_home, models_dir):
    """The stage on one small group with SmolLM2-135M: valid JSON under the schema, two orders,
    a tau or a recorded failure, pairs that reconcile with the ranking."""
    from infra.engines import EngineConfig
    from storage.datasets import DatasetStore

    store = DatasetStore(evolforge_home)
    siblings = siblings_frame().filter(pl.col("group_id") == "p@1")
    instructions = pl.DataFrame({"id": ["p"], "text": [PARENTS["p"]]})
    refs = {
        name: store.write(name, frame, stage="test", code_version="x", params={}).ref
        for name, frame in (("siblings", siblings), ("instructions", instructions))
    }
    from tasks.rewards.rankings import rank_siblings

    result = rank_siblings.run(
        siblings=refs["siblings"],
        instructions=refs["instructions"],
        judge=EngineConfig(kind="embedded"),
        params=RankingParams(reason_max_chars=16, sampling={"max_tokens": 200}),
    )
    rankings = store.read(result["instruction_rankings"])
    pairs = store.read(result["irm_pairs"])
    row = rankings.row(0, named=True)
    assert row["judge_model"] and row["n_siblings"] == 3
    assert result.stats["engine"]["requests"] == 2
    for name in "ab":
        assert (row[f"scores_{name}"] is None) == (row[f"error_{name}"] is not None)
    if row["scores"] is not None:
        assert sorted(row["sibling_ids"]) == ["x1", "x2", "x3"]
        assert all(0.0 <= s["r_i"] <= 1.0 for s in row["scores"])
        assert pairs.height == row["n_pairs"] and (pairs["margin"] > 0).all()
