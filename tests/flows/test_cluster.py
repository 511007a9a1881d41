"""The data flow on a local Ray cluster (`executor.kind=ray`): a head and one worker node of one
CPU each and a Prefect server, started once for the module by `flows.cluster` and stopped by
their pids; the engine an OpenAI-compatible scripted server on loopback that sleeps per request
(every node reaches it by URL), or the real embedded model. Runs are `evolforge run`
subprocesses, the driver of each Ray job.

- a run on the cluster: every worker process builds its engine once and keeps it across the
  shards it runs; the versions are the local run's; a warm rerun sends nothing, writes nothing;
- the driver killed mid-run, run again: only what was missing runs, the versions equal an
  uninterrupted run's;
- the real embedded engine (float32) for one small round: the local run's versions and texts;
- the worker node's raylet killed (`kill -9`) mid-round: Ray re-runs the lost shards on the head,
  the run completes with exactly the expected rows, no duplicate ids, one version per stage.

The data home is a fixture parameter (`home_kind`): a folder on the local disk here; an S3 home
is one more parameter.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.datasets import MANIFEST, DatasetStore
from storage.request_cache import RequestCache
from storage.settings import PROJECT_ROOT
from tests.scripted_server import ScriptedServer

pytest.importorskip("ray")
pytest.importorskip("prefect_ray")

pytestmark = [pytest.mark.slow, pytest.mark.ray]

DATASETS = ["seeds", "sft_answers", "instructions", "pool", "funnel", "solutions", "answers"]
ENGINE_STAGES = ["sft_answers", "evolutions", "elimination_checks", "solutions"]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Head + 1 worker node (1 CPU each) and a Prefect server; stopped by pid at the end."""
    from flows import cluster

    state = cluster.up(tmp_path_factory.mktemp("cluster"), workers=1, cpus=1)
    try:
        yield state
    finally:
        tree = set()
        for proc in state.procs:
            tree |= set(cluster.node_processes(proc))
        cluster.down(state)
        left = [pid for pid in tree if cluster.pid_running(pid)]
        assert not left, f"processes of the cluster still running: {left}"


@pytest.fixture(scope="module")
def server():
    with ScriptedServer(delay_s=0.05) as scripted:
        yield scripted


@pytest.fixture(scope="module", params=["file"])
def home_kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def homes(home_kind, tmp_path_factory):
    """Makes a fresh data home per name, of the kind under test."""
    root = tmp_path_factory.mktemp(f"homes-{home_kind}")

    def make(name: str) -> Path:
        path = root / name
        path.mkdir()
        return path

    return make


def scripted_sets(server: ScriptedServer) -> dict[str, object]:
    return {
        "seeds.sources.0.limit": 8,
        "engine.kind": "openai",
        "engine.model": "scripted",
        "engine.base_url": server.base_url,
        "engine.batch_size": 4,
        "engine.max_concurrency": 2,
        "sft.samples_per_seed": 1,
        "evolution.rounds": 1,
        "solutions.k_cot": 1,
        "solutions.k_pot": 1,
        "solutions.sandbox.workers": 1,
        "executor.shard_rows": 2,  # a shard or two of rows each: many task runs to spread
    }


class Run:
    """An `evolforge run --flow data` subprocess in its own session, output in files."""

    def __init__(
        self,
        home: Path,
        sets: dict[str, object],
        cluster_state=None,
        label: str = "",
        s3: tuple[str, dict[str, str]] | None = None,
    ):
        """`s3`: (the home's `s3://` URL, the S3 client's environment); `home` is then this
        driver's local folder of it (`EVOLFORGE_CACHE`)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "EVOLFORGE_"))}
        env.update(
            EVOLFORGE_HOME=str(home),
            EVOLFORGE_MODELS=os.environ.get("EVOLFORGE_MODELS", str(home / "models")),
            OPENAI_API_KEY="test-key",
            PYTHONPATH=str(PROJECT_ROOT),
        )
        if s3 is not None:
            env.update(s3[1], EVOLFORGE_HOME=s3[0], EVOLFORGE_CACHE=str(home))
        sets = dict(sets)
        if cluster_state is not None:
            env.update(cluster_state.exports)
            sets.update({"executor.kind": "ray", "executor.address": cluster_state.ray_address})
        else:
            env["PREFECT_HOME"] = str(home.parent / f"{home.name}-prefect")
        args = [sys.executable, "-m", "flows.cli", "run", "--flow", "data"]
        for key, value in sets.items():
            args += ["--set", f"{key}={value}"]
        self.out = home.parent / f"{home.name}{label}.out"
        self.err = home.parent / f"{home.name}{label}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                args, env=env, stdout=out, stderr=err, cwd=PROJECT_ROOT, start_new_session=True
            )

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the driver and what it started here

    def wait(self, timeout: float = 600) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return code, self.out.read_text(), self.err.read_text()


def run_ok(home: Path, sets: dict[str, object], cluster_state=None, s3=None) -> str:
    code, out, err = Run(home, sets, cluster_state, s3=s3).wait()
    assert code == 0, err[-4000:]
    return out


def versions(home: Path) -> dict[str, list[str]]:
    """Every version of every dataset (shards included) in a home."""
    store = DatasetStore(home)
    return {n: sorted(m.version for m in store.versions(n)) for n in store.names(internal=True)}


def current(home: Path) -> dict[str, str]:
    store = DatasetStore(home)
    return {name: store.latest(name).version for name in store.names()}


def contents(home: Path, names: list[str] = DATASETS) -> dict[str, list[str]]:
    store = DatasetStore(home)
    return {
        name: sorted(
            json.dumps(r, sort_keys=True, default=str)
            for r in store.read(store.latest(name).ref).to_dicts()
        )
        for name in names
    }


def shard_workers(home: Path, outputs: list[str]) -> list[dict]:
    """The `worker` stats of every shard manifest of these outputs."""
    store = DatasetStore(home)
    found = []
    for output in outputs:
        for manifest in store.versions(f"_shard.{output}"):
            found.append({"output": output, **manifest.stats["worker"]})
    return found


def answered(home: Path) -> int:
    return len(RequestCache(home / "cache" / "requests"))


def wait_quiet(server: ScriptedServer, still_s: float) -> None:
    """Until no request arrives for `still_s` (a killed job's tasks have stopped)."""
    last, since = server.count, time.monotonic()
    while time.monotonic() - since < still_s:
        time.sleep(0.2)
        if server.count != last:
            last, since = server.count, time.monotonic()


@pytest.fixture(scope="module")
def reference(ray_cluster, server, homes):
    """An uninterrupted run on the cluster: its home, versions, datasets and requests sent."""
    home = homes("reference")
    before = server.count
    run_ok(home, scripted_sets(server), ray_cluster)
    return {
        "home": home,
        "versions": versions(home),
        "current": current(home),
        "data": contents(home),
        "sent": server.count - before,
    }


def test_every_worker_builds_its_engine_once_and_a_warm_rerun_does_nothing(
    reference, ray_cluster, server
):
    home = reference["home"]
    workers = shard_workers(home, ENGINE_STAGES)
    by_pid: dict[tuple[str, int], int] = {}
    for shard in workers:
        key = (shard["host"], shard["pid"])
        by_pid[key] = by_pid.get(key, 0) + shard["engines_built"]
    # Both nodes ran shards; each worker process built the engine once, then kept it.
    assert len(workers) > 2 * len(by_pid) and len(by_pid) >= 2
    assert set(by_pid.values()) == {1}, by_pid
    before = server.count
    out = run_ok(home, scripted_sets(server), ray_cluster)
    assert server.count == before  # 0 engine calls
    assert versions(home) == reference["versions"]  # no new version
    block = out.split("stages (computed")[-1].split("\n\n")[0].splitlines()[1:]
    stages = [line.split()[0] for line in block]
    assert "evolve" in stages and "solve" in stages
    # Ingest reads its sources each run (and finds its version); every other stage is a hit.
    assert all("0 computed" in line for line in block if line.split()[0] != "ingest"), block


@pytest.fixture(scope="module")
def moto():
    from tests.s3_server import MotoServer

    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


def test_the_data_flow_on_the_cluster_with_the_home_on_s3(
    reference, ray_cluster, server, moto, homes, monkeypatch
):
    """The home on an S3 server (moto on loopback), the driver and both nodes reading and writing
    it: the same versions and rows as the cluster run on the local disk, each version committed
    once on S3; a second driver with an empty local folder (another machine) finds every stage
    done and sends nothing."""
    from tests.s3_server import use_server

    url = f"s3://{moto.create_bucket()}/home"
    s3 = (url, moto.env())
    local = homes("s3-driver")
    out = run_ok(local, scripted_sets(server), ray_cluster, s3=s3)
    assert url in out  # the run's report names the home it wrote
    use_server(monkeypatch, moto)  # this process reads the home on S3 through its local folder
    assert versions(local) == reference["versions"]
    assert current(local) == reference["current"]
    assert contents(local) == reference["data"]
    import boto3

    client = boto3.client("s3", **{"endpoint_url": moto.url, "region_name": "us-east-1"})
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=url.split("/")[2])
        for o in page.get("Contents", [])
    ]
    manifests = [k for k in keys if k.endswith("/_manifest.json")]
    assert len(manifests) == sum(len(v) for v in reference["versions"].values())
    assert any(k.startswith("home/cache/requests/") for k in keys)
    before = server.count
    other = homes("s3-other-driver")
    out = run_ok(other, scripted_sets(server), ray_cluster, s3=s3)
    assert server.count == before  # every request answered from the shared cache, or not asked
    assert versions(other) == reference["versions"]


def test_cluster_status_names_every_process_and_no_connection_leaves_loopback(
    reference, ray_cluster, capsys
):
    from flows.cli import main

    assert main(["cluster", "status", "--state-dir", ray_cluster.state_dir]) == 0
    out = capsys.readouterr().out
    for proc in ray_cluster.procs:
        assert f"{proc.role}: pid {proc.pid} up" in out
    assert "connections beyond loopback: none" in out
    assert f"export RAY_ADDRESS={ray_cluster.ray_address}" in out


def test_an_s3_server_for_the_home_starts_with_a_bucket_and_stops_by_pid(tmp_path):
    import boto3

    from flows import cluster

    state = cluster.ClusterState(str(tmp_path), "", str(tmp_path / "ray"), "")
    cluster._start_s3(state, dict(os.environ))
    try:
        exports = state.exports
        assert exports["EVOLFORGE_HOME"] == f"s3://{cluster.S3_BUCKET}/home"
        client = boto3.client(
            "s3",
            endpoint_url=exports["AWS_ENDPOINT_URL"],
            aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"],
            region_name=exports["AWS_DEFAULT_REGION"],
        )
        assert client.head_bucket(Bucket=cluster.S3_BUCKET)["ResponseMetadata"]["HTTPStatusCode"]
        assert exports["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    finally:
        stopped = cluster.down(state)
    assert stopped == [f"s3 (pid {state.procs[0].pid})"]
    assert not cluster.pid_running(state.procs[0].pid)


def test_the_versions_are_the_local_runs(reference, server, homes):
    home = homes("local")
    run_ok(home, scripted_sets(server))
    assert current(home) == reference["current"]
    assert contents(home) == reference["data"]
    local = {pid for _, pid in {(w["host"], w["pid"]) for w in shard_workers(home, ["evolutions"])}}
    assert len(local) == 1  # in the flow's own process, on threads


def test_driver_killed_mid_run_then_rerun_runs_only_what_is_missing(
    reference, ray_cluster, server, homes
):
    home = homes("driver-killed")
    server.delay_s = 0.3
    try:
        start = server.count
        run = Run(home, scripted_sets(server), ray_cluster, label="-killed")
        deadline = time.monotonic() + 300
        while server.count - start < reference["sent"] // 2 and time.monotonic() < deadline:
            assert run.proc.poll() is None, run.wait()[2][-3000:]
            time.sleep(0.05)
        run.kill()
        code, _, _ = run.wait()
        assert code == -signal.SIGKILL
        wait_quiet(server, 3.0)  # Ray has stopped the dead driver's tasks
        done_before = answered(home)
        shards_before = {n: set(v) for n, v in versions(home).items() if n.startswith("_shard.")}
        assert 0 < done_before < reference["sent"]
        before = server.count
        run_ok(home, scripted_sets(server), ray_cluster)
        resent = server.count - before
    finally:
        server.delay_s = 0.05
    # Only the requests no node had answered went out again, and the shards done before the
    # kill were kept, not recomputed: the rerun's shard versions are the missing ones only.
    assert resent == reference["sent"] - done_before
    assert current(home) == reference["current"]
    assert contents(home) == reference["data"]
    for name, kept in shards_before.items():
        assert kept <= set(versions(home)[name])
    assert versions(home) == reference["versions"]


def test_the_embedded_engine_on_the_cluster_writes_what_it_writes_locally(
    ray_cluster, homes, models_dir
):
    sets = {
        "seeds.sources.0.limit": 4,
        "engine.kind": "embedded",
        "engine.dtype": "float32",
        "engine.batch_size": 4,
        "sft.enabled": "false",
        "evolution.rounds": 1,
        "evolution.sampling.max_tokens": 24,
        "elimination.equal_judge": "false",
        "elimination.solvable_judge": "false",
        "elimination.probe_sampling.max_tokens": 16,
        "solutions.enabled": "false",
        "executor.shard_rows": 1,
    }
    local, remote = homes("embedded-local"), homes("embedded-ray")
    run_ok(local, sets)
    run_ok(remote, sets, ray_cluster)
    assert current(remote) == current(local)
    names = ["seeds", "instructions", "pool", "evolutions", "elimination_checks"]
    assert contents(remote, names) == contents(local, names)
    built: dict[int, int] = {}
    for shard in shard_workers(remote, ["evolutions", "elimination_checks"]):
        built[shard["pid"]] = built.get(shard["pid"], 0) + shard["engines_built"]
    assert set(built.values()) == {1}, built  # the model loaded once per worker process


def test_worker_node_killed_mid_round_the_flow_completes_with_every_row_once(
    reference, ray_cluster, server, homes
):
    """Last in the module: the worker node stays down."""
    from flows import cluster

    home = homes("node-killed")
    worker = ray_cluster.workers()[0]
    raylet = cluster.raylet_pid(worker)
    server.delay_s = 0.3
    try:
        start = server.count
        run = Run(home, scripted_sets(server), ray_cluster, label="-node")
        deadline = time.monotonic() + 300
        # Past the seeds' answers, inside the evolution round's sharded stages.
        while server.count - start < reference["sent"] // 3 and time.monotonic() < deadline:
            assert run.proc.poll() is None, run.wait()[2][-3000:]
            time.sleep(0.05)
        os.kill(raylet, signal.SIGKILL)
        code, _, err = run.wait()
    finally:
        server.delay_s = 0.05
    assert code == 0, err[-4000:]
    assert contents(home) == reference["data"]
    store = DatasetStore(home)
    for name in ("instructions", "solutions", "answers", "seeds"):
        frame = store.read(store.latest(name).ref)
        key = "id" if "id" in frame.columns else frame.columns[0]
        assert frame[key].n_unique() == frame.height, f"duplicate ids in {name}"
    for name in store.names(internal=True):  # every version complete: none half-written
        for folder in (store.root / name).iterdir():
            if folder.is_dir() and not folder.name.startswith("."):
                assert (folder / MANIFEST).is_file(), folder
    # One committed version per stage run, as in the uninterrupted run: no version twice, no
    # shard twice (a shard Ray ran again wrote once).
    assert versions(home) == reference["versions"]
    # The worker node had shards of this run before it died.
    assert len({w["pid"] for w in shard_workers(home, ENGINE_STAGES)}) >= 2
    assert current(home) == reference["current"]
