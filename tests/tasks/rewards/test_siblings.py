"""Sibling evolutions: which parents, how many per evolver, the data flow's own evolutions in the
group, distinct ids and requests, unparseable replies kept."""

from __future__ import annotations

import polars as pl
import pytest

import infra.engines as engines
from infra.engines import EngineConfig
from tasks.rewards.siblings import (
    SiblingParams,
    evolve_siblings,
    per_evolver,
    select_parents,
    sibling_evolutions,
)
from tests.fakes import ScriptedEngine, last_user_message
from tests.tasks.rewards.helpers import instructions_frame


def evolver(tag: str) -> ScriptedEngine:
    def reply(request, i):
        problem = last_user_message(request).rstrip().splitlines()[-1]
        if "10 - 4" in last_user_message(request) and tag == "B":
            return "   "  # nothing usable: parse failure
        return f"Rewritten problem: ({tag} seed {request.sampling.seed % 97}) {problem} How many?"

    return ScriptedEngine(reply, identity=f"evolver-{tag}")


def test_per_evolver_spreads_k_in_turn():
    assert per_evolver(4, 2) == [2, 2]
    assert per_evolver(5, 2) == [3, 2]
    assert per_evolver(1, 3) == [1, 0, 0]
    with pytest.raises(ValueError, match="at least one evolver"):
        per_evolver(4, 0)


def test_select_parents_share_and_cap_are_seeded_and_stable():
    instructions = instructions_frame()
    everything = select_parents(instructions, SiblingParams(share=1.0))
    assert everything.rows() == [("a", 1), ("b", 1), ("a1", 2)]
    assert select_parents(instructions, SiblingParams(share=0.0)).height == 0
    capped = select_parents(instructions, SiblingParams(share=1.0, max_parents_per_round=1))
    assert capped.group_by("round").len().sort("round")["len"].to_list() == [1, 1]
    # the same draw whatever else is in the frame
    again = select_parents(
        instructions.filter(pl.col("id") != "b1"), SiblingParams(share=1.0, max_parents_per_round=1)
    )
    assert ("a1", 2) in again.rows()
    half = [
        select_parents(instructions, SiblingParams(share=0.5, seed=s)).height for s in range(20)
    ]
    assert 0 < sum(half) < 3 * 20  # a share, not all or nothing


def test_sibling_groups_hold_the_data_flow_evolutions_and_k_new_ones():
    instructions = instructions_frame()
    groups = select_parents(instructions, SiblingParams(share=1.0))
    a, b = evolver("A"), evolver("B")
    params = SiblingParams(share=1.0, k=3)
    frame = sibling_evolutions(instructions, groups, [a, b], params)

    group_a1 = frame.filter(pl.col("group_id") == "a@1")
    own = group_a1.filter(pl.col("source") == "instructions")
    assert sorted(own["id"]) == ["a1", "a1x"] and own["evolver"].null_count() == 2
    new = group_a1.filter(pl.col("source") == "evolver")
    assert new.group_by("evolver").len().sort("evolver")["len"].to_list() == [2, 1]  # k=3 over 2
    assert all(i.startswith(("s0-", "s1-")) for i in new["id"])
    assert frame["id"].n_unique() == frame.height
    assert set(frame["group_id"]) == {"a@1", "b@1", "a1@2"}
    assert frame.filter(pl.col("group_id") == "a1@2")["round"].unique().to_list() == [2]
    # the evolvers were asked with their own seeds: no request equals a data-flow request seed
    assert {r.sampling.seed for r in a.calls}.isdisjoint({r.sampling.seed for r in b.calls})
    # evolver B's empty reply for b's group is kept as a row with null text
    broken = frame.filter(pl.col("text").is_null())
    assert broken["group_id"].unique().to_list() == ["b@1"] and set(broken["evolver"]) == {1}
    assert frame.filter(pl.col("source") == "evolver")["model"].unique().sort().to_list() == [
        "evolver-A",
        "evolver-B",
    ]


def test_without_data_evolutions_only_new_ones():
    instructions = instructions_frame()
    groups = select_parents(instructions, SiblingParams(share=1.0))
    params = SiblingParams(share=1.0, k=2, include_data_evolutions=False)
    frame = sibling_evolutions(instructions, groups, [evolver("A")], params)
    assert set(frame["source"]) == {"evolver"} and frame.height == 2 * groups.height


def test_missing_parent_is_a_one_line_error():
    instructions = instructions_frame()
    groups = pl.DataFrame({"parent_id": ["zz"], "round": [1]})
    with pytest.raises(ValueError, match="parent 'zz' is not in instructions"):
        sibling_evolutions(instructions, groups, [evolver("A")], SiblingParams(k=1))


def test_stage_counts_and_engine_stats(evolforge_home, monkeypatch):
    from storage.datasets import DatasetStore

    engine = evolver("A")
    monkeypatch.setattr(engines, "_build", lambda config: engine)
    engines._engines.clear()
    store = DatasetStore(evolforge_home)
    manifest = store.write(
        "instructions", instructions_frame(), stage="test", code_version="x", params={}, parents=[]
    )
    try:
        result = evolve_siblings.run(
            instructions=manifest.ref,
            evolvers=[EngineConfig(), EngineConfig(model="other")],
            params=SiblingParams(share=1.0, k=2),
        )
    finally:
        engines._engines.clear()
    stats = result.stats
    assert stats["parents"] == 3 and stats["eligible_parents"] == 3
    assert stats["generated"] == 6 and stats["from_instructions"] == 4
    assert stats["siblings"] == 10
    assert stats["engine"]["requests"] == 6
    frame = store.read(result["siblings"])
    assert frame.height == 10


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_evolve_siblings_stage_with_the_embedded_model(evolforge_home, models_dir):
    from storage.datasets import DatasetStore

    store = DatasetStore(evolforge_home)
    instructions = instructions_frame().filter(pl.col("id").is_in(["a", "a1", "a1x"]))
    ref = store.write("instructions", instructions, stage="test", code_version="x", params={}).ref
    result = evolve_siblings.run(
        instructions=ref,
        evolvers=[EngineConfig(kind="embedded")],
        params=SiblingParams(share=1.0, k=2, sampling={"max_tokens": 48}),
    )
    frame = store.read(result["siblings"])
    assert frame.height == 4 and set(frame["group_id"]) == {"a@1"}
    new = frame.filter(pl.col("source") == "evolver")
    assert new.height == 2 and new["finish_reason"].null_count() == 0
    assert result.stats["engine"]["requests"] == 2
