"""The factory as an operator meets it in the Prefect UI: a real local server (SQLite) with its
UI, the deployments registered by `flows.serve`, an ad hoc run through the API, a failing run,
and headless Chromium looking at the deployments page, the run form, the finished run and its
report. The assertions read the rendered pages (Chromium's DOM after the UI's scripts ran).

Set `EVOLFORGE_SCREENSHOTS=docs/screenshots` to keep the screenshots (the README shows them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, size: int = 3000) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else ""


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=10) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout}s:\n{tail(log)}")


def api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


EXPECTED_DEPLOYMENTS = [
    "data/adhoc",
    "evaluation/adhoc",
    "factory/adhoc",
    "factory/nightly",
    "rewards/adhoc",
    "training/adhoc",
    "training_sets/adhoc",
]


def registered_deployments(api_url: str) -> list[str]:
    """`flow/deployment` for every deployment the server knows, sorted."""
    flows = {f["id"]: f["name"] for f in api(api_url, "/flows/filter")}
    return sorted(
        f"{flows.get(d['flow_id'], '?')}/{d['name']}" for d in api(api_url, "/deployments/filter")
    )


def wait_for_deployments(
    api_url: str, runner: subprocess.Popen, log: Path, timeout: float = 600
) -> None:
    """Until every expected deployment is registered: `flows.serve` registers them one at a
    time, and a loaded machine can take a while between the first and the last."""
    deadline = time.monotonic() + timeout
    names: list[str] = []
    while time.monotonic() < deadline:
        if runner.poll() is not None:
            raise RuntimeError(
                f"flows.serve exited with {runner.returncode} after registering {names}:\n"
                f"{tail(log)}"
            )
        with contextlib.suppress(OSError):  # the server is busy: ask again
            names = registered_deployments(api_url)
        if set(EXPECTED_DEPLOYMENTS) <= set(names):
            return
        time.sleep(1)
    missing = sorted(set(EXPECTED_DEPLOYMENTS) - set(names))
    raise TimeoutError(
        f"after {timeout}s the server has {names}; missing {missing}. flows.serve:\n{tail(log)}"
    )


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
        "ids": {name: str(d.id) for name, d in deployments.items()},
        "nightly_cron": [s.schedule.cron for s in nightly.schedules],
        "nightly_limit": nightly.global_concurrency_limit.limit if nightly.global_concurrency_limit else None,
        "adhoc_schedules": len(deployments["factory/adhoc"].schedules),
    }))
good = {"seeds": {"sources": [{"kind": "sample", "limit": 4}]}, "sft": {"enabled": False},
        "rewards": {"enabled": False}, "training_sets": {"enabled": False},
        "training": {"enabled": False}, "evaluation": {"enabled": False},
        "solutions": {"enabled": False}, "evolution": {"rounds": 1, "sampling": {"max_tokens": 48}},
        "elimination": {"equal_judge": False, "solvable_judge": False, "probe_sampling": {"max_tokens": 16}}}
run = run_deployment("factory/adhoc", parameters={"params": good}, timeout=900)
print(json.dumps({"id": str(run.id), "state": run.state.type.value, "name": run.state.name}))
bad = {"seeds": {"sources": [{"kind": "file", "path": "/no/such/seeds.jsonl", "format": "gsm8k"}]}}
run = run_deployment("data/adhoc", parameters={"params": bad}, timeout=600)
print(json.dumps({"id": str(run.id), "state": run.state.type.value, "message": run.state.message}))
"""


def browse(url: str, out: Path | None, height: int = 1100, expect: tuple[str, ...] = ()) -> str:
    """The page's DOM after its scripts ran (again, up to three times, until it holds every
    string of `expect`: the UI loads data after it renders); a screenshot too when `out` is
    given."""
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = ""
    for budget in (25000, 45000, 90000):
        args = [*base, f"--virtual-time-budget={budget}", f"--window-size=1400,{height}"]
        dom = subprocess.run(
            [*args, "--dump-dom", url], capture_output=True, text=True, timeout=300
        ).stdout
        if all(text in dom for text in expect):
            break
    if out is not None:
        subprocess.run(
            [*args, f"--screenshot={out}", url], capture_output=True, timeout=300, check=True
        )
        assert out.read_bytes().startswith(b"\x89PNG")
    return dom


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (make installs it)")
def test_deployments_ui_adhoc_run_and_a_failed_run(tmp_path, evolforge_home, model_home):
    shots = Path(os.environ.get("EVOLFORGE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"{url}/api",
        "PREFECT_UI_API_URL": f"{url}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "EVOLFORGE_HOME": str(evolforge_home),
        "EVOLFORGE_MODELS": str(model_home / "models"),
    }
    bin_dir = os.path.dirname(sys.executable)
    server_log, runner_log = tmp_path / "server.log", tmp_path / "serve.log"
    # Their output goes to files (a pipe nobody reads would fill and block them), which a
    # failure quotes.
    with server_log.open("w") as log:
        server = subprocess.Popen(
            [os.path.join(bin_dir, "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    runner = None
    try:
        wait_healthy(f"{url}/api", server, server_log)
        with runner_log.open("w") as log:
            runner = subprocess.Popen(
                [sys.executable, "-m", "flows.serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_deployments(f"{url}/api", runner, runner_log)
        trigger = subprocess.run(
            [sys.executable, "-c", TRIGGER], env=env, capture_output=True, text=True, timeout=1800
        )
        assert trigger.returncode == 0, trigger.stderr[-3000:]
        info, good, bad = [json.loads(x) for x in trigger.stdout.splitlines() if x.startswith("{")]
        assert info["names"] == EXPECTED_DEPLOYMENTS
        assert info["nightly_cron"] == ["0 2 * * *"]
        assert info["nightly_limit"] == 1 and info["adhoc_schedules"] == 0
        assert (good["state"], good["name"]) == ("COMPLETED", "Completed")
        # A failed run says why in one line, as its state message.
        assert bad["state"] == "FAILED"
        assert "/no/such/seeds.jsonl: no such file" in bad["message"]
        assert "\n" not in bad["message"].strip()

        shown = ("nightly", "adhoc", "factory", "data", "At 02:00 AM every day")
        page = browse(f"{url}/deployments", shots / "deployments.png", 700, shown)
        for text in shown:
            assert text in page, text

        titles = ("Seeds", "LLM engine", "Evolution", "Elimination", "Solutions")
        form = browse(
            f"{url}/deployments/deployment/{info['ids']['factory/adhoc']}/run",
            shots / "run-form.png",
            1600,
            tuple(f">{title}" for title in titles),
        )
        for title in titles:
            assert f">{title}" in form, title
        assert "Seed problems: sources" in form and "evolution rounds (WizardMath: 8)" in form
        assert "Property is type None" not in form

        runs = api(f"{url}/api", "/flow_runs/filter", {"limit": 50})
        data_run = next(
            r for r in runs if r.get("parent_task_run_id") and r["state"]["type"] == "COMPLETED"
            and api(f"{url}/api", "/flows/filter", {"flows": {"id": {"any_": [r["flow_id"]]}}})[0]["name"] == "data"
        )  # fmt: skip
        run_page = browse(
            f"{url}/runs/flow-run/{data_run['id']}",
            shots / "finished-run.png",
            1100,
            (data_run["name"], "Completed"),
        )
        assert data_run["name"] in run_page and "Completed" in run_page
        keys = ("data-report", "funnel-round-1")
        artifacts = browse(
            f"{url}/artifacts", None, 1100, tuple(f"/artifacts/key/{key}" for key in keys)
        )
        for key in keys:
            assert f"/artifacts/key/{key}" in artifacts, key
        (report_artifact,) = api(
            f"{url}/api", "/artifacts/filter", {"artifacts": {"key": {"any_": ["data-report"]}}}
        )
        report = browse(
            f"{url}/artifacts/artifact/{report_artifact['id']}",
            shots / "report.png",
            1600,
            ("evolforge data run", "Evolution funnel", "<img"),
        )
        assert "evolforge data run" in report and "Evolution funnel" in report
        assert "<img" in report  # the funnel plot, embedded
    finally:
        for proc in (runner, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
