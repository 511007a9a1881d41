"""Operating the factory the way operators meet it: `evolforge run` processes killed with
SIGKILL at chosen moments and rerun, two runs on one data home with a reader holding the
catalog, and a failed run. Runs are real subprocesses against a scripted OpenAI-compatible
server on loopback (tests/scripted_server.py)."""

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

from storage.catalog import Catalog
from storage.datasets import MANIFEST, DatasetStore
from tests.scripted_server import ScriptedServer

pytestmark = pytest.mark.slow

DATASETS = ["seeds", "instructions", "eliminated", "pool", "funnel", "solutions", "answers"]


def run_args(server: ScriptedServer) -> list[str]:
    sets = {
        "seeds.sources.0.limit": 6,
        "engine.kind": "openai",
        "engine.model": "scripted",
        "engine.base_url": server.base_url,
        "engine.batch_size": 4,
        "engine.max_concurrency": 2,
        "sft.samples_per_seed": 1,
        "evolution.rounds": 2,
        "solutions.k_cot": 1,
        "solutions.k_pot": 1,
        "solutions.sandbox.workers": 1,
    }
    args = [sys.executable, "-m", "flows.cli", "run", "--flow", "data"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def env_for(home: Path, prefect_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "EVOLFORGE_"))}
    env.update(
        EVOLFORGE_HOME=str(home),
        EVOLFORGE_MODELS=str(home / "models"),
        PREFECT_HOME=str(prefect_home),
        OPENAI_API_KEY="test-key",
        **extra,
    )
    return env


class Run:
    """An `evolforge run` subprocess in its own session, its output in files (the ephemeral
    Prefect server it starts must not hold a pipe open after it exits)."""

    def __init__(self, server, home: Path, prefect_home: Path, label: str = "", **extra: str):
        home.mkdir(parents=True, exist_ok=True)
        self.out_path = home.parent / f"{home.name}{label}.out"
        self.err_path = home.parent / f"{home.name}{label}.err"
        with self.out_path.open("a") as out, self.err_path.open("a") as err:
            self.proc = subprocess.Popen(
                run_args(server),
                env=env_for(home, prefect_home, **extra),
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def wait(self, timeout: float = 900) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):  # whatever it left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        return code, self.out_path.read_text(), self.err_path.read_text()


def start(server, home, prefect_home, label: str = "", **extra) -> Run:
    return Run(server, home, prefect_home, label, **extra)


def contents(home: Path) -> dict[str, list[str]]:
    """The current version of each dataset, as sorted JSON rows (order-free comparison)."""
    store = DatasetStore(home)
    return {
        name: sorted(
            json.dumps(r, sort_keys=True, default=str)
            for r in store.read(store.latest(name).ref).to_dicts()
        )
        for name in DATASETS
    }


def check_consistent(home: Path) -> None:
    """Every version complete or absent; the catalog agrees with the manifests."""
    store = DatasetStore(home)
    for name in store.names(internal=True):
        for entry in (store.root / name).iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                assert (entry / MANIFEST).is_file(), f"{entry} has no manifest"
    catalog = Catalog(home)
    _, rows = catalog.query("SELECT name, version FROM versions")
    recorded = set(rows)
    for name in store.names():
        on_disk = {(name, m.version) for m in store.versions(name)}
        assert on_disk <= recorded, f"catalog lacks versions of {name}"
        if store.latest(name).is_dataset:
            _, view = catalog.query(f'SELECT DISTINCT _version FROM "{name}"')
            assert view in ([(store.latest(name).version,)], []), name


def cached_requests(home: Path) -> int:
    count = 0
    for segment in (home / "cache" / "requests").glob("seg-*.jsonl"):
        for line in segment.read_bytes().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                count += json.loads(line)["ok"] is True
    return count


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its datasets and how many requests it sent."""
    root = tmp_path_factory.mktemp("ops")
    prefect_home = root / "prefect"
    with ScriptedServer() as server:
        code, _, err = start(server, root / "reference", prefect_home).wait()
        assert code == 0, err[-3000:]
        sent = server.count
    return {
        "root": root,
        "prefect": prefect_home,
        "data": contents(root / "reference"),
        "sent": sent,
    }


@pytest.mark.parametrize(
    "where",
    ["engine_batch", "dataset_write:instructions:2", "catalog_update:answers"],
)
def test_kill_9_then_rerun_loses_and_duplicates_nothing(reference, where):
    home = reference["root"] / f"killed-{where.replace(':', '-')}"
    with ScriptedServer(delay_s=0.02) as server:
        if where == "engine_batch":
            proc = start(server, home, reference["prefect"])
            deadline = time.monotonic() + 600
            while server.count < reference["sent"] // 2 and time.monotonic() < deadline:
                assert proc.poll() is None, proc.wait()[2][-3000:]
                time.sleep(0.01)
            proc.kill()
        else:
            proc = start(server, home, reference["prefect"], EVOLFORGE_CRASH_AT=where)
        code, _, _ = proc.wait()
        assert code == -signal.SIGKILL
        before = server.count
        answered = cached_requests(home)
        assert 0 < before < reference["sent"] or where != "engine_batch"
        code, _, err = start(server, home, reference["prefect"]).wait()
        assert code == 0, err[-3000:]
        resent = server.count - before
    check_consistent(home)
    assert contents(home) == reference["data"]
    # Only the missing requests went out again: every answer cached before the kill was reused.
    assert resent == reference["sent"] - answered


def test_two_runs_and_a_reader_on_one_home(reference):
    home = reference["root"] / "concurrent"
    # Slow replies keep the run that gets the lock busy while the other starts up.
    with ScriptedServer(delay_s=0.4) as server:
        runs = [
            start(server, home, reference["prefect"], f"-{i}", EVOLFORGE_CATALOG_WAIT_S="3")
            for i in (1, 2)
        ]
        deadline = time.monotonic() + 300
        while not (home / "catalog.duckdb").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        # A reader keeps the catalog open read-only for a while during the runs.
        reader = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time, duckdb; "
                f"c = duckdb.connect({str(home / 'catalog.duckdb')!r}, read_only=True); "
                "time.sleep(8)",
            ]
        )
        results = [run.wait() for run in runs]
        reader.wait(timeout=60)
        sent = server.count
    for code, _, err in results:
        assert code == 0, err[-3000:]
    waited = [r for r in results if "waiting for the run in progress" in r[2]]
    assert len(waited) == 1 and "flow 'data'" in waited[0][2]
    # The run that waited found every version the first wrote: no work done twice.
    assert "0 computed" in waited[0][1].split("stages (computed")[1].splitlines()[1]
    assert sent == reference["sent"]
    Catalog(home).rebuild()
    check_consistent(home)
    assert contents(home) == reference["data"]


def test_a_failed_run_says_why_in_one_line(reference, tmp_path):
    home = tmp_path / "failing"
    args = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--flow",
        "data",
        "--set",
        "seeds.sources.0.kind=file",
        "--set",
        "seeds.sources.0.path=/no/such/seeds.jsonl",
        "--set",
        "seeds.sources.0.format=gsm8k",
    ]
    proc = subprocess.run(
        args, env=env_for(home, reference["prefect"]), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("evolforge: error")]
    assert errors == ["evolforge: error: /no/such/seeds.jsonl: no such file"]
