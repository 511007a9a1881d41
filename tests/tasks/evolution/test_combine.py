"""Putting a round together: removals in one table, the next pool, and the combine stage."""

from __future__ import annotations

import polars as pl

from storage.datasets import DatasetStore
from tasks.evolution.combine import (
    combine_round,
    next_pool,
    removed_rows,
    seeds_as_instructions,
)
from tasks.evolution.evolve import EvolutionParams
from tasks.evolution.records import DedupRemoved, Eliminated, Evolution, Instruction, Removed


def rows(ids, parents, round=1, **extra):
    n = len(ids)
    data = {
        "id": ids,
        "parent_id": parents,
        "root_id": [p if p else i for i, p in zip(ids, parents, strict=True)],
        "round": [round] * n,
        "direction": ["upward"] * n,
        "op": ["concretize"] * n,
        "template_version": ["t"] * n,
        "model": ["m"] * n,
        "text": [f"problem {i}?" for i in ids],
        "raw": [f"problem {i}?" for i in ids],
        "finish_reason": ["stop"] * n,
        "error": [None] * n,
    }
    return pl.DataFrame({**data, **extra}, schema=Evolution.schema())


SEEDS = pl.DataFrame(
    {"id": ["a", "b", "c"], "source": ["sample"] * 3, "question": ["qa?", "qb?", "qc?"]}
)


def test_next_pool_keeps_evolutions_and_returns_parents_without_one():
    previous = seeds_as_instructions(SEEDS)
    kept = rows(["a.1"], ["a"]).select(Instruction.columns())
    pool = next_pool(previous, kept, None, seed=0, round=1)
    assert pool["id"].to_list() == ["a.1", "b", "c"]  # a evolved; b and c come back


def test_next_pool_cap_is_a_seeded_sample():
    previous = seeds_as_instructions(SEEDS)
    kept = rows(["a.1", "a.2", "b.1", "c.1"], ["a", "a", "b", "c"]).select(Instruction.columns())
    capped = next_pool(previous, kept, 2, seed=0, round=1)
    assert capped.height == 2 and set(capped["id"]) <= {"a.1", "a.2", "b.1", "c.1"}
    assert next_pool(previous, kept, 2, seed=0, round=1).equals(capped)
    others = {tuple(next_pool(previous, kept, 2, seed=s, round=1)["id"]) for s in range(8)}
    assert len(others) > 1  # the seed decides which


def test_removed_rows_puts_both_stages_in_one_table():
    elimination = Eliminated.frame(
        [
            {
                "id": "a.1",
                "parent_id": "a",
                "root_id": "a",
                "round": 1,
                "direction": "upward",
                "op": "concretize",
                "text": "x",
                "rule": "no_question",
                "evidence": "no question mark",
            }
        ]
    )
    dedup = DedupRemoved.frame(
        [
            {
                "id": "b.1",
                "parent_id": "b",
                "root_id": "b",
                "round": 1,
                "direction": "downward",
                "op": "simplify",
                "text": "y",
                "rule": "exact_duplicate",
                "collided_with": "c",
                "similarity": 1.0,
                "detail": "same normalised text",
            }
        ]
    )
    out = removed_rows(elimination, dedup, round=1)
    assert out.schema == Removed.schema()
    assert out.select("id", "stage", "rule", "collided_with").rows() == [
        ("a.1", "elimination", "no_question", None),
        ("b.1", "dedup", "exact_duplicate", "c"),
    ]
    empty = removed_rows(elimination.clear(), pl.DataFrame(), round=1)
    assert empty.is_empty() and empty.schema == Removed.schema()


def test_combine_stage_counts_reconcile(evolforge_home):
    store = DatasetStore(evolforge_home)

    def put(name, frame):
        return store.write(name, frame, stage="t", code_version="t", params={}).ref

    start = seeds_as_instructions(SEEDS)
    evolutions = rows(["a.1", "b.1", "c.1"], ["a", "b", "c"])
    elimination = Eliminated.frame(
        [{**evolutions.row(1, named=True), "rule": "sorry_answer", "evidence": "sorry"}]
    )
    result = combine_round.run(
        round=1,
        evolutions=put("evolutions", evolutions),
        elimination=put("elimination", elimination),
        dedup=put("dedup", DedupRemoved.empty()),
        instructions=put("instructions", start),
        pool=put("pool", start),
        eliminated=None,
        funnel=None,
        params=EvolutionParams(),
    )
    s = result.stats
    assert (s["generated"], s["eliminated"], s["kept"], s["pool"], s["instructions"]) == (
        3,
        1,
        2,
        3,
        5,
    )
    pool = store.read(result["pool"])
    assert pool["id"].to_list() == ["a.1", "b", "c.1"]
    removed = store.read(result["eliminated"])
    assert removed.select("id", "stage", "rule").rows() == [("b.1", "elimination", "sorry_answer")]
