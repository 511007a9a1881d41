"""A data home on S3 (moto on 127.0.0.1): versions, CURRENT, manifest-last visibility, two
writers of one version, artifacts, the catalog and `evolforge sql`, the preflight's lines."""

from __future__ import annotations

import threading

import polars as pl
import pytest

from storage.catalog import Catalog
from storage.datasets import DatasetError, DatasetRef, DatasetStore
from storage.fs import HomeError, content_key, parse_home
from storage.settings import home, home_url, remote_of

COMMON = {"stage": "test", "code_version": "c1", "params": {"k": 1}}


def _frame(n: int = 3, tag: str = "a") -> pl.DataFrame:
    return pl.DataFrame({"id": [f"{tag}{i}" for i in range(n)], "x": list(range(n))})


def _objects(store: DatasetStore, prefix: str) -> list[str]:
    assert store.remote is not None
    return store.remote.find(prefix)


def test_parse_home():
    assert parse_home("s3://b/p/q/").url == "s3://b/p/q"
    assert parse_home("s3://b").prefix == ""
    assert parse_home("file:///tmp/x").local is not None
    with pytest.raises(HomeError, match="unsupported scheme 'gs'"):
        parse_home("gs://bucket/x")
    with pytest.raises(HomeError, match="no bucket"):
        parse_home("s3:///x")
    assert content_key("part-00000.parquet", "ab" * 32) == f"part-00000.{'ab' * 16}.parquet"
    assert content_key("ckpt/model", "cd" * 32) == f"ckpt/model.{'cd' * 16}"


def test_local_home_is_unchanged(evolforge_home):
    assert home() == evolforge_home and home_url() == str(evolforge_home)
    assert remote_of(home()) is None and DatasetStore(home()).remote is None


def test_a_file_url_is_the_local_folder(evolforge_home, monkeypatch):
    monkeypatch.setenv("EVOLFORGE_HOME", f"file://{evolforge_home}")
    assert home() == evolforge_home and DatasetStore(home()).remote is None


def test_write_read_exists_latest_current_on_s3(s3_home, tmp_path):
    local = home()
    assert local != tmp_path and (local / "HOME_URL").read_text().strip() == s3_home
    store = DatasetStore(local)
    assert store.remote is not None
    first = store.write("things", _frame(3), **COMMON)
    second = store.write("things", _frame(5, "b"), **{**COMMON, "params": {"k": 2}})
    assert store.exists("things", first.version) and not store.exists("things", "0" * 16)
    # the parts are named by content on S3, the manifest beside them
    keys = _objects(store, f"datasets/things/{first.version}")
    assert keys == sorted(
        [f"datasets/things/{first.version}/_manifest.json"]
        + [f"datasets/things/{first.version}/{f['key']}" for f in first.files]
    )
    assert all(len(f["key"].split(".")[1]) == 32 for f in first.files)

    # another machine: an empty local folder reads everything from S3
    other = DatasetStore(_other_machine(tmp_path, s3_home))
    assert other.names() == ["things"]
    assert [m.version for m in other.versions("things")] == [first.version, second.version]
    assert other.read(first.ref).equals(_frame(3))
    assert other.latest("things").version == second.version
    store.set_current(first.ref)
    assert other.latest("things").version == first.version  # CURRENT lives on S3
    assert store.remote.get("datasets/things/CURRENT").decode().strip() == first.version
    # a version read here is copied into the local folder, checked against its manifest
    assert all(p.is_file() for p in other.files(first.ref))
    assert other.files(first.ref)[0].is_relative_to(other.root)
    # writing an existing version is a no-op that returns it
    again = other.write("things", _frame(3), **COMMON)
    assert again.created_at == first.created_at


def _other_machine(tmp_path, url):
    """The local folder another node would have for the same home (a `HOME_URL` file)."""
    folder = tmp_path / "other-node"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "HOME_URL").write_text(url + "\n")
    return folder


def test_a_version_without_manifest_is_invisible(s3_home, tmp_path):
    store = DatasetStore(home())
    manifest = store.write("things", _frame(2), **COMMON)
    # parts of an unfinished version (a writer that died before its manifest)
    assert store.remote is not None
    store.remote.put_new("datasets/things/deadbeefdeadbeef/part-00000.abc.parquet", b"PAR1")
    other = DatasetStore(_other_machine(tmp_path, s3_home))
    assert [m.version for m in other.versions("things")] == [manifest.version]
    assert not other.exists("things", "deadbeefdeadbeef")
    with pytest.raises(DatasetError, match="no such dataset version"):
        other.read(DatasetRef("things", "deadbeefdeadbeef"))


def test_a_writer_killed_before_the_manifest_leaves_no_version(s3_home, monkeypatch):
    import storage.datasets as datasets

    def die(point, name):
        if point == "dataset_upload":
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(datasets, "crash_point", die)
    store = DatasetStore(home())
    with pytest.raises(KeyboardInterrupt):
        store.write("things", _frame(2), **COMMON)
    monkeypatch.undo()
    version = datasets.version_id("test", "c1", {"k": 1}, [])
    assert store.versions("things") == [] and not store.exists("things", version)
    assert _objects(store, f"datasets/things/{version}")  # its parts were uploaded, unreferenced
    # the rerun commits the version
    assert store.write("things", _frame(2), **COMMON).version == version
    assert store.read(DatasetRef("things", version)).height == 2


def test_two_writers_one_shard_key_exactly_one_wins(s3_home, tmp_path, monkeypatch):
    """Two nodes compute the same shard version (a task Ray re-ran) with different bytes (an
    LLM's answers differ): both pass the existence check and upload their parts; exactly one
    manifest is committed, the other writer's call returns the winner's version unchanged."""
    import storage.datasets as datasets

    url = s3_home
    stores = [DatasetStore(home()), DatasetStore(_other_machine(tmp_path, url))]
    both_staged = threading.Barrier(2, timeout=30)

    def meet(point, name):
        if point == "dataset_upload":
            both_staged.wait()  # both have uploaded their parts; now both commit

    monkeypatch.setattr(datasets, "crash_point", meet)
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            results[i] = stores[i].write("_shard.things", _frame(4, f"w{i}"), **COMMON)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    a, b = results[0], results[1]
    assert a.version == b.version and a.created_at == b.created_at and a.files == b.files
    reader = DatasetStore(_other_machine(tmp_path / "third", url))
    assert reader.manifest(a.ref).created_at == a.created_at
    rows = reader.read(a.ref)
    assert rows.equals(_frame(4, "w0")) or rows.equals(_frame(4, "w1"))
    # both uploaded their parts (different bytes, different names); one manifest
    version_keys = _objects(stores[0], f"datasets/_shard.things/{a.version}")
    assert sum(k.endswith("_manifest.json") for k in version_keys) == 1
    assert len(version_keys) == 3
    # a writer arriving after the commit (a re-run task) writes nothing at all
    late = DatasetStore(_other_machine(tmp_path / "fourth", url))
    assert late.write("_shard.things", _frame(4, "w9"), **COMMON).created_at == a.created_at
    assert _objects(stores[0], f"datasets/_shard.things/{a.version}") == version_keys
    # a part written again with the same bytes: the conditional put is a no-op
    assert stores[0].remote is not None
    assert not stores[0].remote.put_file_new(
        f"datasets/_shard.things/{a.version}/{a.files[0]['key']}", reader.files(a.ref)[0]
    )


def test_artifact_folder_is_uploaded_and_read_back_by_content(s3_home, tmp_path):
    store = DatasetStore(home())
    source = home() / "datasets" / "model_x" / ".work-v" / "final"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text('{"a": 1}')
    (source / "sub" / "weights.bin").write_bytes(b"\0" * 1000)
    manifest = store.write_folder("model_x", source, kind="model", **COMMON)
    assert {f["path"] for f in manifest.files} == {"config.json", "sub/weights.bin"}
    other = DatasetStore(_other_machine(tmp_path, s3_home))
    folder = other.version_dir("model_x", manifest.version)
    assert (folder / "config.json").read_text() == '{"a": 1}'
    assert (folder / "sub" / "weights.bin").read_bytes() == b"\0" * 1000
    assert other.location("model_x", manifest.version).startswith(s3_home + "/datasets/")


def test_a_copy_that_does_not_match_its_manifest_is_refused(s3_home, tmp_path):
    store = DatasetStore(home())
    manifest = store.write("things", _frame(2), **COMMON)
    assert store.remote is not None
    key = f"datasets/things/{manifest.version}/{manifest.files[0]['key']}"
    store.remote.put(key, b"not the same bytes")
    other = DatasetStore(_other_machine(tmp_path, s3_home))
    with pytest.raises(DatasetError, match="does not match its manifest"):
        other.read(manifest.ref)
    assert not (other.root / "things" / manifest.version).exists()


def test_catalog_and_sql_over_s3(s3_home, tmp_path, capsys, monkeypatch):
    from flows.cli import main

    store = DatasetStore(home())
    manifest = store.write("things", _frame(3), **COMMON)
    store.set_current(manifest.ref)
    catalog = Catalog(home())
    catalog.register(manifest)
    _, rows = catalog.query("SELECT count(*), max(_version) FROM things")
    assert rows == [(3, manifest.version)]
    _, paths = catalog.query("SELECT path FROM versions")
    assert paths == [(f"{s3_home}/datasets/things/{manifest.version}",)]
    assert main(["sql", "SELECT sum(x) AS s FROM things", "--format", "csv"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "3"

    assert main(["datasets", "show", "things"]) == 0
    assert f"path: {s3_home}/datasets/things/{manifest.version}" in capsys.readouterr().out
    # another machine rebuilds its catalog from the manifests on S3
    other = tmp_path / "node-b"
    monkeypatch.setenv("EVOLFORGE_CACHE", str(other))
    assert main(["catalog", "rebuild"]) == 0
    assert "catalog rebuilt from 1 manifest(s) in " + s3_home in capsys.readouterr().out
    assert main(["sql", "SELECT count(*) FROM things", "--format", "csv"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "3"
    # the views read the objects on S3 through the registered file system: nothing copied here
    assert not (other / "datasets" / "things" / manifest.version).exists()


def test_threads_reading_one_version_copy_it_once(s3_home, tmp_path):
    store = DatasetStore(home())
    manifest = store.write("things", _frame(50), **COMMON)
    other = DatasetStore(_other_machine(tmp_path, s3_home))
    start = threading.Barrier(4, timeout=30)
    frames: list[pl.DataFrame] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            start.wait()
            frames.append(other.read(manifest.ref))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(frames) == 4 and all(f.equals(_frame(50)) for f in frames)
    assert [p.name for p in (other.root / "things").iterdir()] == [manifest.version]


def test_a_copy_placed_second_is_dropped(tmp_path):
    from storage.datasets import MANIFEST, _place

    first, second, folder = tmp_path / "a", tmp_path / "b", tmp_path / "v"
    for staging, text in ((first, "first"), (second, "second")):
        staging.mkdir()
        (staging / "part.parquet").write_text(text)
        (staging / MANIFEST).write_text("{}")
    assert _place(first, folder) is True
    assert _place(second, folder) is False  # the rename into a full folder fails: theirs stands
    assert (folder / "part.parquet").read_text() == "first" and not second.exists()
