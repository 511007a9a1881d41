import json
import os
import subprocess
import sys
import textwrap

import polars as pl
import pytest

from storage.datasets import MANIFEST, DatasetError, DatasetRef, DatasetStore, version_id


def frame(n: int = 3) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"r{i}" for i in range(n)], "x": list(range(n))})


def test_version_id_is_a_content_hash():
    a = version_id("s", "c1", {"k": 1, "j": [1, 2]}, ["p@1", "q@2"])
    assert a == version_id("s", "c1", {"j": [1, 2], "k": 1}, ["q@2", "p@1"])  # order-free
    assert a != version_id("s", "c2", {"k": 1, "j": [1, 2]}, ["p@1", "q@2"])  # code version
    assert a != version_id("s", "c1", {"k": 2, "j": [1, 2]}, ["p@1", "q@2"])  # parameters
    assert a != version_id("s", "c1", {"k": 1, "j": [1, 2]}, ["p@1", "q@3"])  # parents


def test_write_read_manifest_and_lineage(evolforge_home):
    store = DatasetStore(evolforge_home)
    m = store.write(
        "things", frame(), stage="make", code_version="c", params={"a": 1}, parents=["seeds@abc"]
    )
    assert store.exists("things", m.version)
    assert store.read(m.ref).equals(frame())
    on_disk = json.loads((store.version_dir("things", m.version) / MANIFEST).read_text())
    assert (
        on_disk["rows"] == 3
        and on_disk["parents"] == ["seeds@abc"]
        and on_disk["params"] == {"a": 1}
    )
    assert on_disk["files"][0]["sha256"] and on_disk["schema"][0] == {
        "name": "id",
        "type": "String",
    }


def test_existing_version_is_never_rewritten(evolforge_home):
    store = DatasetStore(evolforge_home)
    first = store.write("t", frame(3), stage="s", code_version="c", params={})
    again = store.write("t", frame(5), stage="s", code_version="c", params={})  # same inputs
    assert again.version == first.version and again.rows == 3
    assert store.read(first.ref).height == 3
    assert len(store.versions("t")) == 1


def test_empty_dataset_keeps_schema(evolforge_home):
    store = DatasetStore(evolforge_home)
    m = store.write("empty", frame(0), stage="s", code_version="c", params={})
    assert m.rows == 0
    assert store.read(m.ref).columns == ["id", "x"]


def test_resolve_and_errors(evolforge_home):
    store = DatasetStore(evolforge_home)
    m1 = store.write("t", frame(1), stage="s", code_version="c", params={"v": 1})
    m2 = store.write("t", frame(2), stage="s", code_version="c", params={"v": 2})
    assert store.resolve("t").version == m2.version
    assert store.resolve(f"t@{m1.version[:6]}").version == m1.version
    with pytest.raises(DatasetError, match="no dataset named 'nope'"):
        store.resolve("nope")
    with pytest.raises(DatasetError, match="NAME@VERSION"):
        DatasetRef.parse("just-a-name")


def test_crash_mid_write_leaves_no_visible_version_and_is_cleaned(evolforge_home):
    """A writer killed while writing shards leaves only a staging folder, removed by the next write."""
    script = textwrap.dedent(
        f"""
        import os, polars as pl
        import storage.datasets as d
        from storage.datasets import DatasetStore
        d.ROWS_PER_SHARD = 2
        real = DatasetStore._write_shard
        def dying(staging, index, frame):
            if index == 1:
                os._exit(9)  # killed after the first shard
            return real(staging, index, frame)
        DatasetStore._write_shard = staticmethod(dying)
        store = DatasetStore({str(evolforge_home)!r})
        store.write("t", pl.DataFrame({{"x": list(range(6))}}), stage="s", code_version="c", params={{}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ}, capture_output=True)
    assert proc.returncode == 9
    store = DatasetStore(evolforge_home)
    assert store.versions("t") == []
    leftovers = list((evolforge_home / "datasets" / "t").iterdir())
    assert leftovers and all(p.name.startswith(".staging-") for p in leftovers)
    m = store.write(
        "t", pl.DataFrame({"x": list(range(6))}), stage="s", code_version="c", params={}
    )
    assert store.read(m.ref).height == 6
    assert [p.name for p in (evolforge_home / "datasets" / "t").iterdir()] == [m.version]


def test_sharding(evolforge_home, monkeypatch):
    import storage.datasets as d

    monkeypatch.setattr(d, "ROWS_PER_SHARD", 4)
    store = DatasetStore(evolforge_home)
    m = store.write("t", [frame(6), frame(3)], stage="s", code_version="c", params={})
    assert [f["rows"] for f in m.files] == [4, 2, 3]
    assert sum(b.height for b in store.iter_batches(m.ref, 2)) == 9


def test_current_version_follows_the_last_run_not_creation_time(tmp_path):
    store = DatasetStore(tmp_path)
    old = store.write(
        "seeds", pl.DataFrame({"x": [1]}), stage="s", code_version="c", params={"v": 1}
    )
    new = store.write(
        "seeds", pl.DataFrame({"x": [2]}), stage="s", code_version="c", params={"v": 2}
    )
    assert store.latest("seeds").version == new.version  # newest by creation without a pointer
    store.set_current(old.ref)  # a rerun found the old version cached: it is current again
    assert store.latest("seeds").version == old.version
    assert [m.version for m in store.versions("seeds")] == [old.version, new.version]
    with pytest.raises(DatasetError, match="no such dataset version"):
        store.set_current(DatasetRef("seeds", "0000"))
