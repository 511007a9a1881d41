"""End to end with the real embedded model (SmolLM2-135M on CPU): three seeds, two rounds, every
stage, the real sandbox; then a rerun that is all cache hits. Small token budgets keep it to a
few minutes; `make demo` runs the eight-round profile."""

import polars as pl
import pytest

from flows.factory import factory
from flows.params import FactoryParams
from storage.catalog import Catalog
from storage.datasets import DatasetStore

pytestmark = pytest.mark.slow

PARAMS = {
    "seeds": {"sources": [{"kind": "sample", "limit": 3}]},
    "engine": {"kind": "embedded", "batch_size": 16},
    "sft": {"samples_per_seed": 1, "max_tokens": 64},
    "evolution": {"rounds": 2, "max_tokens": 96},
    "elimination": {"equal_judge": False, "solvable_judge": False, "probe_max_tokens": 32},
    "solutions": {
        "k_cot": 1,
        "k_pot": 1,
        "cot_max_tokens": 64,
        "pot_max_tokens": 64,
        "sandbox": {"workers": 1},
    },
}


def test_factory_end_to_end_with_the_embedded_model(prefect_harness, evolforge_home):
    params = FactoryParams.model_validate(PARAMS)
    state = factory(params)
    store = DatasetStore(evolforge_home)
    seeds = store.read(state.seeds)
    instructions = store.read(state.instructions)
    eliminated = store.read(state.eliminated)
    funnel = store.read(state.funnel)
    answers = store.read(state.answers)
    sft = store.read(state.sft_answers)

    assert seeds.height == 3 and sft.height == 3
    assert sorted(funnel["round"].unique()) == [1, 2]
    assert funnel["generated"].sum() == 6  # one evolution per pool member per round
    assert (
        funnel["generated"].sum()
        == funnel["eliminated"].sum()
        + funnel["duplicate"].sum()
        + funnel["contaminated"].sum()
        + funnel["kept"].sum()
    )
    assert eliminated.height + instructions.filter(pl.col("round") > 0).height == 6
    assert set(instructions.filter(pl.col("round") > 0)["root_id"]) <= set(seeds["id"])
    assert eliminated["rule"].null_count() == 0
    assert set(answers["instruction_id"]) == set(instructions["id"])
    assert answers["agreement"].is_between(0, 1).all()
    assert (answers["difficulty"] - (1 - answers["agreement"])).abs().max() < 1e-9

    _, rows = Catalog(evolforge_home).query("SELECT count(*) FROM answers")
    assert rows == [(answers.height,)]

    # a rerun sends nothing to the engine and creates no version
    versions = {name: len(store.versions(name)) for name in store.names(internal=True)}
    again = factory(params)
    assert again.refs() == state.refs()
    assert all(step.cached for step in again.steps)
    assert {name: len(store.versions(name)) for name in store.names(internal=True)} == versions
