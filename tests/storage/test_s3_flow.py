"""The data flow's first stages with the home on S3 (moto on 127.0.0.1) give the versions a home
on the local disk gives; a rerun from another node's empty local folder is all cache hits."""

from __future__ import annotations

import pytest

import infra.engines as engines
from flows.data import data
from flows.params import DataParams
from storage.catalog import Catalog
from storage.datasets import DatasetStore
from storage.settings import home, home_url
from tests.fakes import ScriptedEngine
from tests.flows.test_data import scripted_reply


@pytest.fixture
def scripted(monkeypatch):
    engine = ScriptedEngine(scripted_reply, identity="scripted-v1")
    monkeypatch.setattr(engines, "_build", lambda config: engine)
    engines._engines.clear()
    yield engine
    engines._engines.clear()


def _run():
    engines._engines.clear()
    return data(
        DataParams.model_validate(
            {
                "seeds": {"sources": [{"kind": "sample", "limit": 6}]},
                "sft": {"samples_per_seed": 1},
                "evolution": {"rounds": 1},
                "solutions": {"enabled": False},
            }
        )
    )


def _versions(store: DatasetStore) -> dict[str, list[str]]:
    return {n: sorted(m.version for m in store.versions(n)) for n in store.names(internal=True)}


def test_data_flow_on_s3_gives_the_local_versions(
    prefect_harness, evolforge_home, scripted, s3_home, tmp_path, monkeypatch
):
    monkeypatch.setenv("EVOLFORGE_HOME", str(evolforge_home))
    local = _run()
    local_versions = _versions(DatasetStore(evolforge_home))
    local_calls = len(scripted.calls)
    assert local_calls > 0 and local.funnel_plot is not None

    monkeypatch.setenv("EVOLFORGE_HOME", s3_home)
    on_s3 = _run()
    assert home_url() == s3_home
    assert on_s3.refs() == local.refs()
    store = DatasetStore(home())
    assert store.remote is not None and _versions(store) == local_versions
    assert len(scripted.calls) == 2 * local_calls  # the S3 home's request cache started empty
    assert store.remote.listdir("cache/requests")
    # the driver registered every version in its catalog; the views read S3
    _, rows = Catalog(home()).query("SELECT count(*) FROM instructions")
    assert rows[0][0] == DatasetStore(evolforge_home).read(local.instructions).height
    _, paths = Catalog(home()).query("SELECT DISTINCT split_part(path, '/', 1) FROM versions")
    assert paths == [("s3:",)]

    # another node (an empty local folder) reruns it: every stage a cache hit, no request sent
    monkeypatch.setenv("EVOLFORGE_CACHE", str(tmp_path / "node-b"))
    again = _run()
    assert again.refs() == local.refs()
    assert [s.stage for s in again.steps if not s.cached] == []
    assert len(scripted.calls) == 2 * local_calls
    assert _versions(DatasetStore(home())) == local_versions
