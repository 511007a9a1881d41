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
        }
    )
    first = factory(params)
    state = factory(params, return_state=True)
    second = state.result()
    assert second["seeds"]["refs"] == first["seeds"]["refs"]
    assert second["seeds"]["cached"] is True
    assert len(DatasetStore(evolforge_home).versions("seeds")) == 1
