"""The executor setting: parsed from run profiles and `--set`, mapped to a task runner, placing
task runs by resources, and never changing a version. The runs on a real Ray cluster are in
tests/flows/test_cluster.py (slow)."""

from __future__ import annotations

import os
import pickle

import polars as pl
import pytest

from flows.overrides import ConfigError
from flows.registry import FLOWS, load_run
from infra.engines import EngineConfig
from storage.datasets import DatasetStore
from storage.errors import UserError
from storage.settings import PROJECT_ROOT
from tasks.contracts import Resources, StageOutput
from tasks.executors import (
    ExecutorSettings,
    InProcessExecutor,
    PrefectExecutor,
    current_executor,
    executor_scope,
)
from tasks.executors.settings import StageResources, task_runner
from tasks.records import Record
from tasks.stage import Shard, stage


class Row(Record):
    """A numbered row."""

    id: pl.String
    x: pl.Int64


@stage(outputs={"doubled": Row}, shard=Shard("rows", rows=8))
def double_rows(rows: pl.DataFrame, engine: EngineConfig) -> StageOutput:
    return StageOutput({"doubled": rows.with_columns(pl.col("x") * 2)})


@stage(outputs={"summed": Row}, resources=Resources(num_cpus=2, memory=2**30))
def sum_rows(rows: pl.DataFrame) -> StageOutput:
    return StageOutput({"summed": rows.select(pl.lit("all").alias("id"), pl.col("x").sum())})


@stage(outputs={"opened": Row}, shard=Shard("rows", rows=8))
def open_engine_rows(rows: pl.DataFrame, engine: EngineConfig) -> StageOutput:
    from infra.engines import build_engine

    build_engine(engine)
    return StageOutput({"opened": rows})


@pytest.fixture
def rows(evolforge_home):
    frame = pl.DataFrame({"id": [f"r{i:03d}" for i in range(40)], "x": list(range(40))})
    return (
        DatasetStore(evolforge_home)
        .write("rows", frame, stage="t", code_version="t", params={})
        .ref
    )


def test_run_profiles_and_set_reach_every_flow_that_runs_stages():
    arguments = load_run(
        None,
        ["executor.kind=ray", "executor.address=10.0.0.1:6379", "executor.shard_rows=16"],
        "data",
    )
    assert arguments["executor"] == ExecutorSettings(
        kind="ray", address="10.0.0.1:6379", shard_rows=16
    )
    factory = load_run(None, ["executor.kind=ray"], "factory")
    assert set(factory) == {"params"} and factory["params"].executor.kind == "ray"
    for name, entry in FLOWS.items():  # a typed parameter of each flow (the UI's form)
        schema = entry.flow.parameters.model_dump()["properties"]
        assert "executor" in schema or name == "factory", name
    with pytest.raises(ConfigError, match="executor"):
        load_run(None, ["executor.kind=spark"], "data")
    with pytest.raises(ConfigError, match=r"executor\.adress"):
        load_run(None, ["executor.adress=x"], "data")


def test_the_ray_runner_needs_a_prefect_server_and_passes_the_project_home_and_api(
    monkeypatch, evolforge_home
):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = ExecutorSettings(kind="ray", address="127.0.0.2:1", forward_env=["MY_KEY"])
    no_server = temporary_settings(updates={PREFECT_API_URL: None})
    with no_server, pytest.raises(UserError, match=r"needs a Prefect server.*PREFECT_API_URL"):
        task_runner(settings)
    monkeypatch.setenv("MY_KEY", "secret")
    monkeypatch.setenv("OTHER_KEY", "not forwarded")
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        runner = task_runner(settings)
    env = runner.init_kwargs["runtime_env"]["env_vars"]
    assert runner.address == "127.0.0.2:1"
    assert env["PYTHONPATH"] == str(PROJECT_ROOT)
    assert env["EVOLFORGE_HOME"] == str(evolforge_home)
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:9/api"
    assert env["MY_KEY"] == "secret" and "OTHER_KEY" not in env
    elsewhere = ExecutorSettings(kind="ray", project_path="/srv/evolforge")
    assert elsewhere.ray_runtime_env(None)["env_vars"]["PYTHONPATH"] == "/srv/evolforge"


def test_workers_get_a_home_on_s3_as_its_url_and_the_s3_client_settings(s3_home, monkeypatch):
    """On S3 the driver's `home()` is its own local folder: the workers get the home's URL (and
    find their own local folder), the endpoint and the credentials, never the driver's path."""
    from storage.settings import home

    env = ExecutorSettings(kind="ray").ray_runtime_env(None)["env_vars"]
    assert env["EVOLFORGE_HOME"] == s3_home
    assert env["EVOLFORGE_HOME"] != str(home())
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name] == os.environ[name]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    from storage import settings as storage_settings

    storage_settings._checked.clear()
    with pytest.raises(UserError, match=r"127\.0\.0\.1:9"):  # checked before a worker starts
        ExecutorSettings(kind="ray").ray_runtime_env(None)


def test_resources_become_ray_remote_options_only_on_ray(rows):
    vllm = EngineConfig(kind="vllm", tensor_parallel_size=2)
    values = double_rows.bind({"rows": rows, "engine": vllm})
    assert double_rows.resources_for(values) == {"num_gpus": 2}
    # On a cluster without GPUs a vLLM stage runs vLLM's CPU build: asking for a GPU there would
    # leave its task pending forever.
    assert double_rows.resources_for(values, cluster_gpus=False) == {}
    embedded = double_rows.bind({"rows": rows, "engine": EngineConfig()})
    assert double_rows.resources_for(embedded) == {}
    assert sum_rows.resources_for(sum_rows.bind({"rows": rows})) == {
        "num_cpus": 2,
        "memory": 2**30,
    }
    ray = PrefectExecutor(settings=ExecutorSettings(kind="ray"), runner=object())
    # A GPU task keeps its worker process, and with it the engine it loaded.
    assert ray.remote_options(double_rows, values) == {"num_gpus": 2, "max_calls": 0}
    tuned = PrefectExecutor(
        settings=ExecutorSettings(kind="ray", resources={"sum_rows": StageResources(num_cpus=4)}),
        runner=object(),
    )
    assert tuned.remote_options(sum_rows, sum_rows.bind({"rows": rows})) == {
        "num_cpus": 4,
        "memory": 2**30,
    }
    assert PrefectExecutor().remote_options(double_rows, values) == {}  # threads: nothing


def test_shard_rows_cuts_other_shards_but_never_changes_the_stage_version(rows):
    values = double_rows.bind({"rows": rows, "engine": EngineConfig()})
    declared = double_rows.shard_plan(values, InProcessExecutor().home)
    finer = double_rows.shard_plan(values, InProcessExecutor().home, rows=2)
    assert len(finer) > len(declared) and sum(s.rows for s in finer) == 40
    mine = InProcessExecutor()
    mine.shard_rows = 2
    from tasks.executors import use_executor

    with use_executor(mine):
        split = double_rows(rows=rows, engine=EngineConfig())
    whole = double_rows.run(rows=rows, engine=EngineConfig())
    assert split.version == whole.version and whole.cached
    store = DatasetStore(mine.home)
    assert len(store.versions("_shard.doubled")) == len(finer)


def test_the_version_is_the_same_under_every_executor_setting(rows, prefect_harness):
    from prefect import flow

    local = InProcessExecutor().run(double_rows, double_rows.bind({"rows": rows, "engine": None}))

    @flow
    def pipeline(executor: ExecutorSettings) -> list[str]:
        with executor_scope(executor):
            assert isinstance(current_executor(), PrefectExecutor)
            assert current_executor().shard_rows == executor.shard_rows
            return [double_rows(rows=rows, engine=None).version]

    for settings in (ExecutorSettings(), ExecutorSettings(shard_rows=3)):
        assert pipeline(settings) == [local.version]


def test_stages_and_executors_travel_to_ray_workers_by_name_and_settings(rows):
    assert pickle.loads(pickle.dumps(double_rows)) is double_rows
    executor = PrefectExecutor(settings=ExecutorSettings(kind="ray", shard_rows=5), runner=object())
    executor.task(double_rows, "shard")  # a Prefect task made and kept
    copy = pickle.loads(pickle.dumps(executor))
    assert copy.settings == executor.settings and copy.shard_rows == 5
    assert copy.runner is None and copy._tasks == {}


def test_a_shard_manifest_names_its_worker_and_the_engines_it_built(rows, monkeypatch):
    import infra.engines as engines

    built: list[EngineConfig] = []

    class Quiet:
        identity = "quiet"

    def fake_build(config):
        built.append(config)
        return Quiet()

    monkeypatch.setattr(engines, "_build", fake_build)
    monkeypatch.setattr(engines, "_engines", {})

    result = open_engine_rows.run(rows=rows, engine=EngineConfig(model="m1"))
    store = DatasetStore(InProcessExecutor().home)
    workers = [m.stats["worker"] for m in store.versions("_shard.opened")]
    assert len(workers) > 1 and len(built) == 1
    assert sorted(w["engines_built"] for w in workers) == [0] * (len(workers) - 1) + [1]
    assert {w["pid"] for w in workers} == {os.getpid()}
    assert "worker" not in result.stats  # per shard only, never summed into the stage's


def test_cluster_commands_fail_in_one_line_without_a_cluster(capsys, tmp_path):
    from flows.cli import main

    assert main(["cluster", "status", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"evolforge: error: no cluster recorded in {tmp_path}/cluster.json "
        "(start one: evolforge cluster up)"
    ]
