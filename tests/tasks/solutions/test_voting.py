"""Majority voting by math equivalence."""

from __future__ import annotations

import polars as pl
import pytest

from tasks.solutions.voting import majority_vote, majority_votes, vote_answers


def test_majority_vote_groups_equivalent_forms(pool):
    vote = majority_vote(["3", "\\frac{1}{2}", "0.5", "1/2", "3", None], pool)
    assert vote.answer == "\\frac{1}{2}"
    assert vote.group_sizes == (2, 3)
    assert vote.agreement == pytest.approx(3 / 6)
    assert vote.groups == ((0, 4), (1, 2, 3))
    assert [vote.agrees(i) for i in range(6)] == [False, True, True, True, False, False]


def test_majority_vote_ties_go_to_the_earliest_group(pool):
    vote = majority_vote(["7", "8", "8.0", "7"], pool)
    assert vote.answer == "7"
    assert vote.agreement == 0.5


def test_none_never_wins(pool):
    vote = majority_vote([None, None, None, "5"], pool)
    assert vote.answer == "5"
    assert vote.agreement == 0.25
    empty = majority_vote([None, None], pool)
    assert (empty.answer, empty.agreement, empty.winner, empty.agrees(0)) == (None, 0.0, None, None)


def test_majority_votes_batches_many_sets(pool):
    votes = majority_votes([["1", "1", "2"], [], ["x+1", "1+x", "x"]], pool)
    assert [v.answer for v in votes] == ["1", None, "x+1"]
    assert votes[1].n_samples == 0
    assert votes[2].group_sizes == (2, 1)


def _solutions(rows: list[tuple[str, str, str | None]]) -> pl.DataFrame:
    counter: dict[str, int] = {}
    data = []
    for iid, kind, answer in rows:
        sample = counter.get(iid, 0)
        counter[iid] = sample + 1
        data.append(
            {"instruction_id": iid, "kind": kind, "sample": sample, "extracted_answer": answer}
        )
    return pl.DataFrame(data)


def test_vote_answers(pool):
    solutions = _solutions(
        [
            ("a", "cot", "\\frac{1}{2}"),
            ("a", "cot", "0.5"),
            ("a", "cot", "3"),
            ("a", "pot", "0.5"),
            ("a", "pot", "1/2"),
            ("a", "pot_fallback_cot", None),
            ("b", "cot", "4"),
            ("b", "cot", "5"),
            ("b", "pot", "6"),
            ("b", "pot", "6.0"),
            ("c", "cot", None),
            ("c", "pot", None),
            ("d", "cot", "9"),
            ("d", "cot", "9"),
        ]
    )
    answers, with_verdict = vote_answers(
        solutions, references={"a": "1/2", "b": "4", "c": "1"}, threshold=0.6, pool=pool
    )
    assert answers.height == 4  # every instruction gets a row
    assert with_verdict.height == solutions.height  # every sample keeps its row
    rows = {r["instruction_id"]: r for r in answers.to_dicts()}

    a = rows["a"]
    assert (a["answer"], a["n_samples"], a["n_answered"]) == ("\\frac{1}{2}", 6, 5)
    assert a["agreement"] == pytest.approx(4 / 6)
    assert a["difficulty"] == pytest.approx(1 - 4 / 6)
    assert a["group_sizes"] == [4, 1]
    assert (a["cot_answer"], a["pot_answer"], a["cot_pot_agreement"]) == (
        "\\frac{1}{2}",
        "0.5",
        True,
    )
    assert a["verified"] is True and a["reference_match"] is True

    b = rows["b"]
    assert b["answer"] == "6" and b["agreement"] == 0.5 and b["verified"] is False
    assert (b["cot_answer"], b["pot_answer"], b["cot_pot_agreement"]) == ("4", "6", False)
    assert b["reference_match"] is False

    c = rows["c"]
    assert (c["answer"], c["agreement"], c["verified"], c["cot_pot_agreement"]) == (
        None,
        0.0,
        False,
        None,
    )
    assert c["reference_match"] is False

    d = rows["d"]
    assert (d["agreement"], d["verified"], d["pot_answer"], d["cot_pot_agreement"]) == (
        1.0,
        True,
        None,
        None,
    )
    assert d["reference_match"] is None  # no reference for d

    verdicts = with_verdict.filter(pl.col("instruction_id") == "a")["verdict"].to_list()
    assert verdicts == [True, True, False, True, True, False]
    assert with_verdict.filter(pl.col("instruction_id") == "c")["verdict"].to_list() == [None, None]
    assert with_verdict.filter(pl.col("instruction_id") == "b")["verdict"].to_list() == [
        False,
        False,
        True,
        True,
    ]


def test_vote_answers_keeps_row_order_and_validates(pool):
    solutions = _solutions([("z", "cot", "1"), ("y", "cot", "2"), ("z", "pot", "1")])
    answers, with_verdict = vote_answers(solutions, pool=pool)
    assert answers["instruction_id"].to_list() == ["z", "y"]
    assert with_verdict["instruction_id"].to_list() == ["z", "y", "z"]
    assert with_verdict["verdict"].to_list() == [True, True, True]
    assert answers["reference_match"].to_list() == [None, None]
    with pytest.raises(ValueError, match="threshold"):
        vote_answers(solutions, threshold=1.5, pool=pool)
