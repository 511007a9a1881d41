"""The whole factory flow with a scripted engine routed by prompt template: lineage, pool
semantics, removals with reasons, reconciling funnels, difficulty, and reruns as cache hits."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest

import infra.engines as engines
from flows.factory import factory
from flows.params import FactoryParams
from flows.reports.data import DATA_QUERIES, data_report_markdown, render_summary
from infra.engines.base import ChatRequest
from storage.catalog import Catalog
from storage.datasets import DatasetStore
from tasks.evolution.evolve import OPERATIONS
from tasks.templates import load_template
from tests.fakes import ScriptedEngine, last_user_message

TEMPLATES = ["answer_probe", "judge_equal", "judge_solvable", "cot_fewshot", "pot"] + [
    spec.template for spec in OPERATIONS.values()
]


def template_of(request: ChatRequest) -> str:
    by_version = {load_template(name).version: name for name in TEMPLATES}
    return by_version[request.template_version]


def problem_in(request: ChatRequest) -> str:
    return last_user_message(request)


def scripted_reply(request: ChatRequest, i: int) -> str:
    """Evolutions add a clause (some echo the prompt's heading and get eliminated); solutions
    answer 7 in CoT and print 7 in PoT, so agreement is total."""
    name = template_of(request)
    text = problem_in(request)
    if name.startswith("evolve_"):
        digest = sum(map(ord, text)) % 5
        if digest == 0:
            return "#Rewritten Prompt#: " + "What is 2 + 2?"  # copies the evolving prompt
        words = re.findall(r"[A-Za-z]+", text)[-8:]
        return f"Rewritten problem: A farmer counts {digest * 3 + len(text)} {' '.join(words)} apples. How many apples are there in total?"
    if name == "answer_probe":
        return "Let us add the numbers step by step. The answer is: 7"
    if name == "judge_equal":
        return json.dumps({"verdict": "Not Equal"})
    if name == "judge_solvable":
        return json.dumps({"solvable": True, "reason": "well posed"})
    if name == "cot_fewshot":
        return "Step 1: add. The answer is: 7"
    if name == "pot":
        return "```python\nprint(7)\n```"
    raise AssertionError(f"unexpected template {name}")


@pytest.fixture
def scripted(monkeypatch):
    engine = ScriptedEngine(scripted_reply, identity="scripted-v1")
    monkeypatch.setattr(engines, "_build", lambda config: engine)
    engines._engines.clear()
    yield engine
    engines._engines.clear()


def small_params(**overrides) -> FactoryParams:
    data = {
        "seeds": {"sources": [{"kind": "sample"}]},
        "sft": {"samples_per_seed": 1},
        "evolution": {"rounds": 8},
        "solutions": {"k_cot": 1, "k_pot": 1, "sandbox": {"workers": 1}},
        "rewards": {"enabled": False},
        "training_sets": {"enabled": False},
        "training": {"enabled": False},
        "evaluation": {"enabled": False},
    }
    data.update(overrides)
    return FactoryParams.model_validate(data)


def test_factory_rounds_with_scripted_engine(prefect_harness, evolforge_home, scripted):
    state = factory(small_params()).data
    store = DatasetStore(evolforge_home)
    instructions = store.read(state.instructions)
    eliminated = store.read(state.eliminated)
    funnel = store.read(state.funnel)
    seeds = store.read(state.seeds)

    # every kept instruction traces back through parent_id to a seed
    parents = dict(zip(instructions["id"], instructions["parent_id"], strict=True))
    for row in instructions.iter_rows(named=True):
        node, hops = row["id"], 0
        while parents[node] is not None:
            node, hops = parents[node], hops + 1
        assert node == row["root_id"] and node in set(seeds["id"]) and hops <= row["round"]

    # every removal has a stage and a rule; the echoed heading is caught by copies_prompt
    assert eliminated.height > 0
    assert eliminated["rule"].null_count() == 0 and eliminated["stage"].null_count() == 0
    assert "copies_prompt" in set(eliminated["rule"])

    # funnels reconcile per round, and the pool keeps the parents of removed evolutions
    assert sorted(funnel["round"].unique()) == list(range(1, 9))
    for r in funnel.iter_rows(named=True):
        assert r["generated"] == r["eliminated"] + r["duplicate"] + r["contaminated"] + r["kept"]
    assert funnel.filter(pl.col("round") == 1)["generated"].sum() == seeds.height
    pool = store.read(state.pool)
    assert pool.height == seeds.height  # one evolution per parent: the pool keeps its size
    assert instructions.height == seeds.height + funnel["kept"].sum()

    # answers for every instruction, with agreement and difficulty; seeds checked against references
    answers = store.read(state.answers)
    assert set(answers["instruction_id"]) == set(instructions["id"])
    assert answers.filter(pl.col("agreement") < 1).height == 0
    seed_answers = answers.filter(pl.col("round") == 0)
    assert seed_answers["reference_match"].sum() == seeds.filter(pl.col("answer") == "7").height

    # the catalog's views show the newest versions
    _, rows = Catalog(evolforge_home).query("SELECT count(*) FROM instructions")
    assert rows == [(instructions.height,)]
    plot = store.version_dir("funnel_plot", state.funnel_plot.version) / "funnel.png"
    assert plot.read_bytes().startswith(b"\x89PNG")
    _, rows = Catalog(evolforge_home).query("SELECT kind, path FROM artifacts")
    assert rows == [("plot", str(plot.parent))]

    # every query the summary prints runs as printed, and returns rows
    summary = render_summary(state)
    for query in DATA_QUERIES:
        assert f'evolforge sql "{query}"' in summary
        _, found = Catalog(evolforge_home).query(query)
        assert found, query
    report = data_report_markdown(state)
    assert "data:image/png;base64," in report and "| evolve | 8 | computed" in report

    # a rerun is all cache hits: no new versions, no engine requests
    calls = len(scripted.calls)
    versions = {name: len(store.versions(name)) for name in store.names()}
    again = factory(small_params()).data
    assert again.refs() == state.refs()
    assert all(step.cached for step in again.steps)
    assert len(scripted.calls) == calls
    assert {name: len(store.versions(name)) for name in store.names()} == versions


def test_changing_rounds_reuses_earlier_rounds(prefect_harness, evolforge_home, scripted):
    factory(small_params(evolution={"rounds": 1}))
    calls = len(scripted.calls)
    factory(small_params(evolution={"rounds": 2}))
    new_requests = scripted.calls[calls:]
    assert new_requests, "round 2 needs the engine"
    assert all(
        template_of(r) != "cot_fewshot" or "A farmer counts" in problem_in(r) for r in new_requests
    )
