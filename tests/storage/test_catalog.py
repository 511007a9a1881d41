import subprocess
import sys
import textwrap

import polars as pl

from storage.catalog import Catalog, connect
from storage.datasets import DatasetStore


def write(home, name, rows, params):
    store = DatasetStore(home)
    m = store.write(
        name,
        pl.DataFrame({"id": [f"r{i}" for i in range(rows)]}),
        stage="s",
        code_version="c",
        params=params,
        parents=["seeds@p"],
    )
    Catalog(home).register(m)
    return m


def test_view_shows_newest_version_and_versions_table(evolforge_home):
    m1 = write(evolforge_home, "things", 2, {"v": 1})
    m2 = write(evolforge_home, "things", 5, {"v": 2})
    catalog = Catalog(evolforge_home)
    _, rows = catalog.query("SELECT count(*), min(_version) FROM things")
    assert rows == [(5, m2.version)]
    _, rows = catalog.query("SELECT name, version, parents, rows FROM versions ORDER BY created_at")
    assert rows == [("things", m1.version, ["seeds@p"], 2), ("things", m2.version, ["seeds@p"], 5)]
    write(
        evolforge_home, "things", 2, {"v": 1}
    )  # re-registering an old version keeps the newest view
    assert catalog.query("SELECT count(*) FROM things")[1] == [(5,)]


def test_reader_opens_read_only_while_writer_process_registers(evolforge_home):
    write(evolforge_home, "things", 3, {"v": 0})
    writer = textwrap.dedent(
        f"""
        import polars as pl
        from storage.catalog import Catalog
        from storage.datasets import DatasetStore
        home = {str(evolforge_home)!r}
        for i in range(1, 25):
            m = DatasetStore(home).write("things", pl.DataFrame({{"id": ["x"] * i}}), stage="s", code_version="c", params={{"v": i}})
            Catalog(home).register(m)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer])
    catalog = Catalog(evolforge_home)
    seen = set()
    while proc.poll() is None:
        _, rows = catalog.query("SELECT count(*) FROM things")
        seen.add(rows[0][0])
    assert proc.wait() == 0
    assert catalog.query("SELECT count(*) FROM things")[1] == [(24,)]
    assert seen  # reads succeeded while the writer ran


def test_rebuild_from_manifests(evolforge_home):
    write(evolforge_home, "a", 2, {})
    write(evolforge_home, "b", 3, {})
    (evolforge_home / "catalog.duckdb").unlink()
    assert Catalog(evolforge_home).rebuild() == 2
    assert Catalog(evolforge_home).query(
        "SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM b)"
    )[1] == [(2, 3)]


def test_no_extension_downloads():
    con = connect()
    settings = dict(
        con.execute(
            "SELECT name, value FROM duckdb_settings() WHERE name LIKE 'auto%extensions'"
        ).fetchall()
    )
    assert settings == {
        "autoinstall_known_extensions": "false",
        "autoload_known_extensions": "false",
    }


def test_a_reader_holding_the_catalog_delays_updates_once_and_nothing_is_lost(
    evolforge_home, monkeypatch
):
    import time

    from storage import catalog as catalog_module

    write(evolforge_home, "things", 1, {"v": 0})  # the catalog file exists
    # The full wait, well above the short one of later updates (BUSY_RETRY_WAIT_S, plus up to a
    # back-off step and a last try, which a loaded machine stretches): 0.5 s apart was too close.
    full_wait_s = catalog_module.BUSY_RETRY_WAIT_S + 2.0
    monkeypatch.setenv("EVOLFORGE_CATALOG_WAIT_S", str(full_wait_s))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, duckdb; "
            f"c = duckdb.connect({str(evolforge_home / 'catalog.duckdb')!r}, read_only=True); "
            "print('open', flush=True); sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        store = DatasetStore(evolforge_home)
        catalog = Catalog(evolforge_home)
        timings = []
        for i in (1, 2, 3):
            m = store.write(
                "things",
                pl.DataFrame({"id": ["x"] * (i + 1)}),
                stage="s",
                code_version="c",
                params={"v": i},
            )
            start = time.monotonic()
            assert catalog.register(m) is False
            timings.append(time.monotonic() - start)
        assert timings[0] >= full_wait_s and max(timings[1:]) < full_wait_s, timings  # in full once
        assert len(catalog_module.pending(evolforge_home)) == 3
    finally:
        holder.communicate("\n", timeout=10)
    later = write(evolforge_home, "other", 1, {"v": 9})  # the next update records the backlog
    assert catalog_module.pending(evolforge_home) == []
    _, rows = Catalog(evolforge_home).query("SELECT count(*) FROM versions WHERE name = 'things'")
    assert rows == [(4,)]
    assert Catalog(evolforge_home).query("SELECT count(*) FROM things")[1] == [(4,)]
    assert later.name == "other"
