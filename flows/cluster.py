"""A local Ray cluster to run the factory on: `evolforge cluster up|down|status`.

    evolforge cluster up --workers 1            # head + 1 worker node, a Prefect server
    eval "$(evolforge cluster up --s3 --quiet)"  # ... and a moto S3 server; exports to the shell
    evolforge run --config configs/demo.yaml --set executor.kind=ray --set executor.address=$RAY_ADDRESS
    evolforge cluster status
    evolforge cluster down

`up` starts, all on loopback: a Ray head and N worker nodes (`ray start --block`, each in a
session of its own, `--num-cpus`, a small object store) on 127.0.0.2 (see `RAY_HOST`), a Prefect
server on 127.0.0.1 (the API every Ray worker reports task runs to: without one each worker
would start an ephemeral server on one SQLite file, `database is locked`) and, with `--s3`, a
moto S3 server with a bucket on 127.0.0.1. It records their pids, ports and logs in a state file
and prints the variables to export. `down` stops them by their recorded pids (checking each is
still the process it started, then what it started), `status` reports them and, from `ss`, the
cluster's sockets that listen on every interface or on the host's address, and its connections
beyond loopback (none: `tests/flows/test_cluster.py`).

Ray 2.60 turns token authentication on by default for a new cluster; a node joining with another
setting fails with `InvalidAuthToken`. `up` makes a token of its own (a file beside the state,
mode 0600) and starts every node with `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN_PATH`: export
both where a driver connects (`up` prints them).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.processes import free_port
from storage.errors import UserError

STATE_FILE = "cluster.json"
OBJECT_STORE_MB = 100  # Ray's floor is 75 MB; the factory passes refs and manifests only
START_TIMEOUT_S = 180.0
S3_BUCKET = "evolforge"
# The nodes' address: a loopback address other than 127.0.0.1, which `ray start` replaces with
# the host's own address (Ray's `resolve_ip_for_localhost`: "localhost", "127.0.0.1" and "::1"
# only), so that with it every connection between the nodes would leave loopback.
RAY_HOST = "127.0.0.2"


class ClusterError(UserError):
    """A cluster that would not start or stop: one line, naming the part and its log."""


@dataclass
class Proc:
    """A process `up` started (in a session of its own: its pid is its process group)."""

    role: str  # head | worker-1 ... | prefect | s3
    pid: int
    started: str  # /proc/<pid>/stat start time: a reused pid is not ours
    log: str
    url: str = ""


@dataclass
class ClusterState:
    state_dir: str
    ray_address: str
    temp_dir: str
    token_path: str
    procs: list[Proc] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.state_dir) / STATE_FILE

    def save(self) -> None:
        self.path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState:
        path = state_dir / STATE_FILE
        if not path.is_file():
            raise ClusterError(f"no cluster recorded in {path} (start one: evolforge cluster up)")
        data = json.loads(path.read_text())
        data["procs"] = [Proc(**p) for p in data["procs"]]
        return cls(**data)

    def proc(self, role: str) -> Proc:
        for proc in self.procs:
            if proc.role == role:
                return proc
        raise ClusterError(f"the cluster has no {role}")

    def workers(self) -> list[Proc]:
        return [p for p in self.procs if p.role.startswith("worker-")]


def default_state_dir() -> Path:
    return Path(os.environ.get("EVOLFORGE_CLUSTER_DIR", "~/.evolforge/cluster")).expanduser()


# -- processes, by /proc -----------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces: split after its closing parenthesis
    return [
        str(pid),
        text[text.index("(") + 1 : text.rindex(")")],
        *text[text.rindex(")") + 2 :].split(),
    ]


def start_time(pid: int) -> str:
    fields = _stat(pid)
    return fields[21] if fields else ""


def pid_running(pid: int) -> bool:
    """A process with this pid exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[2] != "Z"


def alive(proc: Proc) -> bool:
    fields = _stat(proc.pid)
    return fields is not None and fields[21] == proc.started and fields[2] != "Z"


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` (pid → command name), from /proc."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                children.setdefault(int(fields[3]), []).append(int(entry.name))
                names[int(entry.name)] = fields[1]
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = names.get(child, "?")
                todo.append(child)
    return found


def node_processes(proc: Proc) -> dict[int, str]:
    """The processes of a node (its `ray start --block` and everything below it)."""
    if not alive(proc):
        return {}
    return {proc.pid: "ray start", **descendants(proc.pid)}


def raylet_pid(proc: Proc) -> int:
    """The raylet of a node: what `kill -9` takes down to kill the node."""
    for pid, name in node_processes(proc).items():
        if name == "raylet":
            return pid
    raise ClusterError(f"{proc.role}: no raylet running")


def _spawn(role: str, args: list[str], env: dict[str, str], state_dir: Path, url: str = "") -> Proc:
    log = state_dir / f"{role}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            args,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Proc(role, popen.pid, start_time(popen.pid), str(log), url)


def stop(proc: Proc, grace_s: float = 15.0) -> None:
    """SIGTERM the process (and what it started), then SIGKILL what is left, by pid."""
    if not alive(proc):
        return
    below = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (
        alive(proc) or any(_stat(pid) is not None for pid in below)
    ):
        time.sleep(0.2)
    for pid in [proc.pid, *below]:
        fields = _stat(pid)
        if fields is not None and fields[2] != "Z":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: whatever else is in it
    with contextlib.suppress(ChildProcessError):
        os.waitpid(proc.pid, os.WNOHANG)  # our child when started from this process


def _wait(proc: Proc, ready: Any, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(proc):
            tail = Path(proc.log).read_text(errors="replace").strip().splitlines()[-1:] or [""]
            raise ClusterError(f"{proc.role} exited while starting ({proc.log}): {tail[0]}")
        if ready():
            return
        time.sleep(0.3)
    raise ClusterError(f"{proc.role}: {what} not ready after {timeout_s:.0f} s (see {proc.log})")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status < 500
    except Exception:
        return False


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


# -- up / down / status ------------------------------------------------------------------------


def up(
    state_dir: Path | None = None,
    workers: int = 1,
    cpus: int = 1,
    object_store_mb: int = OBJECT_STORE_MB,
    prefect: bool = True,
    s3: bool = False,
    env: dict[str, str] | None = None,
) -> ClusterState:
    """Start the cluster (see the module docstring); on failure stop what started."""
    state_dir = (state_dir or default_state_dir()).expanduser().resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    if (state_dir / STATE_FILE).exists():
        old = ClusterState.load(state_dir)
        if any(alive(p) for p in old.procs):
            raise ClusterError(
                f"a cluster recorded in {old.path} is running (evolforge cluster down first)"
            )
    base = dict(os.environ if env is None else env)
    base.update(RAY_USAGE_STATS_ENABLED="0", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    token = state_dir / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # Unix socket paths must stay under ~107 bytes: Ray's session folders live in a short path.
    temp_dir = tempfile.mkdtemp(prefix="efray-", dir="/tmp")
    gcs_port = free_port()
    state = ClusterState(str(state_dir), f"{RAY_HOST}:{gcs_port}", temp_dir, str(token))
    try:
        if prefect:
            _start_prefect(state, base)
        if s3:
            _start_s3(state, base)
        node_env = {
            **base,
            **{k: v for k, v in state.exports.items() if k.startswith("PREFECT_")},
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
        }
        common = [
            "--block",
            f"--node-ip-address={RAY_HOST}",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            f"--object-store-memory={object_store_mb * 1024 * 1024}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ]
        for index in range(workers + 1):
            role = "head" if index == 0 else f"worker-{index}"
            ports = [
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}",
            ]
            if index == 0:
                where = [
                    "--head",
                    f"--port={gcs_port}",
                    f"--ray-client-server-port={free_port()}",
                    "--include-dashboard=false",
                ]
            else:
                where = [f"--address={state.ray_address}"]
            args = [_bin("ray"), "start", *where, *common, *ports]
            proc = _spawn(role, args, node_env, state_dir)
            state.procs.append(proc)
            state.save()
            _wait(proc, lambda p=proc: "Ray runtime started" in _read(p.log), "ray node")
        state.exports.update(
            RAY_ADDRESS=state.ray_address,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token),
        )
        state.save()
        return state
    except BaseException:
        down(state)
        raise


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _start_prefect(state: ClusterState, base: dict[str, str]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    prefect_home = Path(state.state_dir) / "prefect"
    env = {
        **{k: v for k, v in base.items() if not k.startswith("PREFECT_")},
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
    }
    args = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    proc = _spawn("prefect", [*args, "--port", str(port)], env, Path(state.state_dir), url)
    state.procs.append(proc)
    state.save()
    _wait(proc, lambda: _http_ok(f"{url}/health"), "Prefect server")
    state.exports["PREFECT_API_URL"] = url


def _start_s3(state: ClusterState, base: dict[str, str]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = _spawn("s3", args, base, Path(state.state_dir), url)
    state.procs.append(proc)
    state.save()
    _wait(proc, lambda: _http_ok(url), "moto S3 server")
    credentials = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    request = urllib.request.Request(f"{url}/{S3_BUCKET}", method="PUT")
    with urllib.request.urlopen(request, timeout=10):
        pass  # moto accepts an unsigned CreateBucket
    state.exports.update(credentials, EVOLFORGE_HOME=f"s3://{S3_BUCKET}/home")


def down(state: ClusterState) -> list[str]:
    """Stop every recorded process, workers first; the state file and Ray's temp dir go too."""
    stopped = []
    order = [
        *reversed(state.workers()),
        *[p for p in state.procs if not p.role.startswith("worker-")],
    ]
    for proc in order:
        if alive(proc):
            stop(proc)
            stopped.append(f"{proc.role} (pid {proc.pid})")
    shutil.rmtree(state.temp_dir, ignore_errors=True)
    state.path.unlink(missing_ok=True)
    return stopped


LOOPBACK = ("127.", "[::ffff:127.", "[::1]", "::1")
WILDCARD = ("0.0.0.0:", "*:", "[::]:")


def sockets(pids: set[int], state: str) -> list[tuple[str, str, str]]:
    """(process, local, peer) of the TCP sockets of these processes in `state` (`ss -tnp`)."""
    try:
        out = subprocess.run(
            ["ss", "-Htnp", "state", state], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 5 or "pid=" not in parts[-1]:
            continue
        for user in parts[-1].split("),("):
            name = user.split('"')[1] if '"' in user else "?"
            pid = int(user.split("pid=")[1].split(",")[0])
            if pid in pids:
                found.append((f"{name}[{pid}]", parts[2], parts[3]))
    return found


def status(state: ClusterState) -> dict[str, Any]:
    """Each recorded process (alive or not, its url), the exports, and how the cluster's
    sockets sit: listening on every interface (Ray's gRPC servers and agents do), on the
    host's own address, or connected beyond loopback (none should be)."""
    pids: set[int] = set()
    procs = []
    for proc in state.procs:
        is_alive = alive(proc)
        if is_alive:
            pids |= {proc.pid, *descendants(proc.pid)}
        procs.append({"role": proc.role, "pid": proc.pid, "alive": is_alive, "url": proc.url})
    listening = sockets(pids, "listening")
    return {
        "procs": procs,
        "exports": state.exports,
        "listening_on_all_interfaces": sorted(
            f"{who} {local}" for who, local, _ in listening if local.startswith(WILDCARD)
        ),
        "listening_on_host_address": sorted(
            f"{who} {local}"
            for who, local, _ in listening
            if not local.startswith(WILDCARD + LOOPBACK)
        ),
        "connected_beyond_loopback": sorted(
            f"{who} {local} -> {peer}"
            for who, local, peer in sockets(pids, "established")
            if not (local.startswith(LOOPBACK) and peer.startswith(LOOPBACK))
        ),
    }


def exports_text(state: ClusterState) -> str:
    return "\n".join(f"export {k}={v}" for k, v in state.exports.items())
