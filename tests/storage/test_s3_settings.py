"""A bad S3 setting fails with one line naming what is wrong, before anything runs."""

from __future__ import annotations

import pytest

from storage.fs import HomeError
from storage.settings import home
from tests.s3_server import free_port, use_server


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    use_server(monkeypatch, s3_server)
    monkeypatch.setenv("EVOLFORGE_CACHE", str(tmp_path / "local"))
    return s3_server


def _cli_line(capsys, argv: list[str]) -> str:
    from flows.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_bucket(s3_env, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("EVOLFORGE_HOME", "s3://no-such-bucket-here/home")
    with pytest.raises(HomeError, match="bucket 'no-such-bucket-here' does not exist at endpoint"):
        home()
    line = _cli_line(capsys, ["sql", "SELECT 1"])
    assert line.startswith("evolforge: error: EVOLFORGE_HOME s3://no-such-bucket-here/home:")
    assert not (tmp_path / "local").exists()  # nothing was made


def test_wrong_endpoint(s3_env, monkeypatch, capsys):
    bucket = s3_env.create_bucket()
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setenv("EVOLFORGE_HOME", f"s3://{bucket}/h")
    line = _cli_line(capsys, ["catalog", "rebuild"])
    assert f"cannot reach the S3 endpoint {closed}" in line


def test_no_credentials(s3_env, monkeypatch, capsys, tmp_path):
    bucket = s3_env.create_bucket()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("EVOLFORGE_HOME", f"s3://{bucket}/h")
    line = _cli_line(capsys, ["datasets", "ls"])
    assert "no S3 credentials in the environment" in line and "AWS_ACCESS_KEY_ID" in line


def test_unsupported_scheme(monkeypatch, capsys):
    monkeypatch.setenv("EVOLFORGE_HOME", "gs://bucket/home")
    line = _cli_line(capsys, ["sql", "SELECT 1"])
    assert "unsupported scheme 'gs'" in line


def test_a_flow_fails_before_any_stage(s3_env, monkeypatch, prefect_harness):
    """The data flow's first act is the preflight (its run lock takes `home()`): no stage runs."""
    from flows.data import data
    from flows.params import DataParams
    from tasks.executors.base import Executor

    ran: list[str] = []
    monkeypatch.setattr(Executor, "execute", lambda self, stage, values: ran.append(stage.name))
    monkeypatch.setenv("EVOLFORGE_HOME", "s3://no-such-bucket-here/home")
    with pytest.raises(HomeError, match="does not exist"):
        data(DataParams.model_validate({"seeds": {"sources": [{"kind": "sample"}]}}))
    assert ran == []


def test_the_credentials_are_written_nowhere(s3_home, tmp_path):
    import polars as pl

    from storage.datasets import DatasetStore
    from tests.s3_server import ACCESS_KEY, SECRET_KEY

    store = DatasetStore(home())
    store.write("things", pl.DataFrame({"a": [1]}), stage="s", code_version="c", params={})
    assert store.remote is not None
    blobs = [store.remote.get(k) for k in store.remote.find("datasets")]
    blobs += [p.read_bytes() for p in home().rglob("*") if p.is_file()]
    assert not any(SECRET_KEY.encode() in b or ACCESS_KEY.encode() in b for b in blobs)


def test_one_local_folder_serves_one_home(s3_env, monkeypatch, tmp_path):
    first, second = s3_env.create_bucket(), s3_env.create_bucket()
    monkeypatch.setenv("EVOLFORGE_HOME", f"s3://{first}/h")
    local = home()
    assert (local / "HOME_URL").read_text().strip() == f"s3://{first}/h"
    monkeypatch.setenv("EVOLFORGE_HOME", f"s3://{second}/h")
    with pytest.raises(HomeError, match=f"is the local folder of s3://{first}/h, not of"):
        home()
    # without EVOLFORGE_CACHE each home gets its own folder, derived from its URL
    monkeypatch.delenv("EVOLFORGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    other = home()
    assert other.parent == tmp_path / "xdg" / "evolforge" and other != local
