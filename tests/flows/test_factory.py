"""The factory flow: a rerun of unchanged work is a cache hit with no new version."""

from flows.factory import factory
from flows.params import FactoryParams
from storage.datasets import DatasetStore
from tasks.seeds import IngestParams, SeedSource


def test_rerun_is_a_cache_hit_with_no_new_version(prefect_harness, evolforge_home):
    params = FactoryParams.model_validate(
        {
            "seeds": IngestParams(sources=[SeedSource(kind="sample")]).model_dump(),
            "sft": {"enabled": False},
            "solutions": {"enabled": False},
            "evolution": {"rounds": 0},
            "rewards": {"enabled": False},
            "training_sets": {"enabled": False},
            "training": {"enabled": False},
            "evaluation": {"enabled": False},
        }
    )
    first = factory(params).data
    run = factory(params, return_state=True)
    second = run.result().data
    assert run.is_completed()
    assert second.seeds == first.seeds
    assert [step.cached for step in second.steps] == [True] * len(second.steps)
    assert len(DatasetStore(evolforge_home).versions("seeds")) == 1
