"""A real local Prefect server (SQLite): the deployments register and the ad hoc one runs."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("prefect server did not become healthy")


TRIGGER = """
import json, sys
from prefect.deployments import run_deployment
from prefect.client.orchestration import get_client

with get_client(sync_client=True) as client:
    deployments = {
        f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()
    }
    nightly = deployments["factory/nightly"]
    print(json.dumps({
        "names": sorted(deployments),
        "nightly_cron": [s.schedule.cron for s in nightly.schedules],
        "nightly_limit": nightly.global_concurrency_limit.limit if nightly.global_concurrency_limit else None,
        "adhoc_schedules": len(deployments["factory/adhoc"].schedules),
    }))
params = {"seeds": {"sources": [{"kind": "sample"}]}, "sft": {"enabled": False}, "solutions": {"enabled": False}, "evolution": {"rounds": 0}}
run = run_deployment("factory/adhoc", parameters={"params": params}, timeout=240)
print(json.dumps({"state": run.state.type.value, "name": run.state.name}))
"""


def test_deployments_register_and_adhoc_runs(tmp_path, evolforge_home):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "EVOLFORGE_HOME": str(evolforge_home),
    }
    bin_dir = os.path.dirname(sys.executable)
    server = subprocess.Popen(
        [
            os.path.join(bin_dir, "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    runner = None
    try:
        wait_healthy(api, server)
        runner = subprocess.Popen(
            [sys.executable, "-m", "flows.serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while True:
            trigger = subprocess.run(
                [sys.executable, "-c", TRIGGER],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if trigger.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(2)  # the deployments are not registered yet
        assert trigger.returncode == 0, trigger.stderr[-2000:]
        lines = [json.loads(line) for line in trigger.stdout.splitlines() if line.startswith("{")]
        info, run = lines[0], lines[1]
        assert info["names"] == ["data/adhoc", "factory/adhoc", "factory/nightly"]
        assert info["nightly_cron"] == ["0 2 * * *"]
        assert info["nightly_limit"] == 1
        assert info["adhoc_schedules"] == 0
        assert run == {"state": "COMPLETED", "name": "Completed"}
        assert (evolforge_home / "datasets" / "seeds").is_dir()
    finally:
        for proc in (runner, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
