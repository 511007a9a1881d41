"""The rewards flow on the data flow's output, with a scripted engine routed by template:
the four datasets with lineage to instructions and solutions, r = r_i * r_a, the printed
queries, reruns as cache hits, and a standalone run on the newest data."""

from __future__ import annotations

import json

import polars as pl
import pytest

import infra.engines as engines
from flows.data import data as data_flow
from flows.reports.rewards import REWARD_QUERIES, rewards_summary
from flows.rewards import RewardParams, RewardState, rewards
from infra.engines.base import ChatRequest
from storage.catalog import Catalog
from storage.datasets import DatasetStore
from tasks.templates import load_template
from tests.fakes import ScriptedEngine, last_user_message
from tests.flows.test_data import scripted_reply, small_params
from tests.tasks.rewards.helpers import ranking_reply

REWARD_TEMPLATES = ["rank_siblings", "judge_steps", "step_rollout"]


def reward_reply(request: ChatRequest, i: int) -> str:
    by_version = {load_template(name).version: name for name in REWARD_TEMPLATES}
    name = by_version.get(request.template_version)
    if name == "rank_siblings":
        return ranking_reply(lambda text, position: 1 + len(text) % 10)(request, i)
    if name == "judge_steps":
        text = last_user_message(request)
        first = 0 if "farmer" in text and len(text) % 2 else -1
        return json.dumps({"reason": "checked", "first_error_step": first})
    if name == "step_rollout":
        return "The answer is: 7" if i % 2 == 0 else "The answer is: 8"
    return scripted_reply(request, i)


@pytest.fixture
def scripted(monkeypatch):
    engine = ScriptedEngine(reward_reply, identity="scripted-v1")
    monkeypatch.setattr(engines, "_build", lambda config: engine)
    engines._engines.clear()
    yield engine
    engines._engines.clear()


def params(**overrides) -> RewardParams:
    data = {
        "evolvers": [{"kind": "embedded"}, {"kind": "embedded", "model": "second-evolver"}],
        "siblings": {"share": 1.0, "k": 2, "sampling": {"max_tokens": 64}},
        "steps": {"max_solutions_per_round": 2},
        "monte_carlo": {"n": 2, "sampling": {"max_tokens": 32}},
    }
    data.update(overrides)
    return RewardParams.model_validate(data)


def test_rewards_flow_on_the_data_flow(prefect_harness, evolforge_home, scripted):
    data = data_flow(params=small_params(evolution={"rounds": 2}).data_params())
    state = rewards(params(), data=data)
    assert isinstance(state, RewardState)
    store = DatasetStore(evolforge_home)
    catalog = Catalog(evolforge_home)

    for name in ("instruction_rankings", "irm_pairs", "step_labels", "rewards"):
        assert getattr(state, name) is not None
        _, rows = catalog.query(f"SELECT count(*) FROM {name}")
        assert rows[0][0] == store.read(getattr(state, name)).height

    # lineage: rankings <- siblings <- instructions; rewards <- solutions, instructions
    def parents(ref) -> set[str]:
        return {p.split("@")[0] for p in store.manifest(ref).parents}

    assert parents(state.siblings) == {"instructions"}
    assert parents(state.instruction_rankings) == {"siblings", "instructions"}
    assert parents(state.segmented_solutions) >= {"solutions", "answers", "instructions"}
    assert parents(state.step_labels) == {"segmented_solutions", "step_judgments", "step_rollouts"}
    assert parents(state.rewards) == {
        "solutions", "instructions", "instruction_rankings", "step_labels"
    }  # fmt: skip

    rankings = store.read(state.instruction_rankings)
    siblings = store.read(state.siblings)
    instructions = store.read(data.instructions)
    groups = instructions.filter(pl.col("round") >= 1).select("parent_id", "round").unique()
    assert rankings.height == groups.height  # share 1.0: every parent of every round
    assert siblings.filter(pl.col("source") == "evolver").height == 2 * groups.height
    assert set(siblings["model"].drop_nulls()) >= {"scripted-v1"}
    assert (rankings["tau"].drop_nulls() == 1.0).all()  # the scripted judge scores by content

    pairs = store.read(state.irm_pairs)
    assert pairs.height > 0 and (pairs["margin"] > 0).all() and pairs["consistent"].all()
    assert {"prompt", "chosen", "rejected"} <= set(pairs.columns)

    labels = store.read(state.step_labels)
    solutions = store.read(data.solutions)
    assert set(labels["solution_id"]) <= set(solutions["id"])
    pot = labels.filter(pl.col("label_source") == "execution")
    assert set(pot["solution_id"]) == set(solutions.filter(pl.col("kind") == "pot")["id"])
    # rollouts answer 7 and 8 in turn: half reach an evolved instruction's majority answer (7)
    soft = set(labels.filter(pl.col("label_source") == "steps")["mc_soft"].drop_nulls())
    assert 0.5 in soft and soft <= {0.0, 0.5, 1.0}

    reward_rows = store.read(state.rewards)
    assert reward_rows.height == solutions.height
    assert reward_rows["r"].is_not_null().sum() > 0
    _, rows = catalog.query("SELECT count(*) FROM rewards WHERE abs(r - r_i * r_a) > 1e-9")
    assert rows == [(0,)]
    _, rows = catalog.query(
        "SELECT count(*) FROM rewards WHERE r IS NULL AND r_i_note IS NULL AND r_a_note IS NULL"
    )
    assert rows == [(0,)]

    # the stages' engine counters are in the state's steps
    by_stage = {s.stage: s for s in state.steps}
    assert by_stage["evolve_siblings"].stats["engine"]["requests"] > 0
    assert by_stage["rank_siblings"].stats["engine"]["requests"] == 2 * rankings.height
    assert by_stage["rollout_steps"].stats["engine"]["requests"] > 0
    assert by_stage["judge_steps"].stats["engine"]["requests"] > 0
    assert "engine" not in by_stage["compute_rewards"].stats

    summary = rewards_summary(state)
    assert "mean tau between the two orders 1.000" in summary
    assert "rank_siblings" in summary and "requests" in summary
    for query in REWARD_QUERIES:
        assert f'evolforge sql "{query}"' in summary
        _, found = catalog.query(query)
        assert found, query

    # a rerun is all cache hits, and so is a standalone run on the newest data
    calls = len(scripted.calls)
    again = rewards(params(), data=data)
    assert again.refs() == state.refs() and all(s.cached for s in again.steps)
    alone = rewards(params())
    assert alone.refs() == state.refs() and all(s.cached for s in alone.steps)
    assert len(scripted.calls) == calls

    # more rollouts recompute the rollouts and what follows them, not the rankings
    more = rewards(params(monte_carlo={"n": 4, "sampling": {"max_tokens": 32}}), data=data)
    cached = {s.stage: s.cached for s in more.steps}
    assert cached["evolve_siblings"] and cached["rank_siblings"] and cached["judge_steps"]
    assert not cached["rollout_steps"] and not cached["compute_rewards"]


def test_disabled_flow_does_nothing(prefect_harness, evolforge_home, scripted):
    state = rewards(RewardParams(enabled=False))
    assert state.refs() == {} and state.steps == []


def test_missing_solutions_is_a_user_error(prefect_harness, evolforge_home, scripted):
    from storage.errors import UserError

    data = data_flow(
        params=small_params(evolution={"rounds": 1}, solutions={"enabled": False}).data_params()
    )
    with pytest.raises(UserError, match="needs solutions, answers"):
        rewards(params(), data=data)
