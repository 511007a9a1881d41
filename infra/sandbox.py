"""Run model-written Python programs (PoT rationales) in a sandbox, and nowhere else.

Every program the factory executes goes through `Sandbox.run` / `run_program`, which return a
`SandboxResult` (stdout, stderr tail, exit code, timed out, which limit killed it, wall time)
instead of raising. A pool of long-lived bubblewrap sandboxes each runs a small fork server
(`infra/sandbox_worker.py`) that has the common math modules (and sympy, numpy when installed)
already imported and forks a fresh child per program, so a short program costs about a
millisecond of overhead rather than a new interpreter.

    with Sandbox(SandboxLimits(cpu_s=2, wall_s=4)) as sandbox:
        results = sandbox.run_many(programs)

What is isolated (each sandbox is `bwrap --unshare-all`, started once per worker):
- network: a private network namespace with only its own loopback; the host's 127.0.0.1
  services and DNS are unreachable.
- filesystem: only /usr, the base Python installation (its site-packages hidden) and the
  preloaded packages are visible, read-only; the root is a read-only tmpfs; /tmp is a small
  private tmpfs. /root, /home, /work, the project and EVOLFORGE_HOME are not mounted at all.
- processes: a private PID namespace (host processes and their /proc entries are invisible), a
  new session, uid/gid 65534, no capabilities, no nested user namespaces; the sandbox dies with
  the host process.
- environment: an explicit minimal environment (PATH, LANG, HOME, TMPDIR, thread counts); no
  variable of the host process (API keys included) is passed.
- resources, per program: rlimits on CPU seconds, address space, file size, open files and
  processes; a wall-clock limit after which every process of the program is SIGKILLed; stdout
  and stderr capped (the program is killed when it exceeds the cap).
- between programs in one worker: each runs in a fresh fork (module state and monkeypatches
  die with it) with its own working folder; after it, every process it left is killed and the
  whole /tmp is wiped. A worker that cannot get back to that state, or that the program killed,
  is discarded and a fresh sandbox started.

What is not isolated:
- the kernel: no seccomp filter, so a kernel exploit escapes. Raw syscalls through ctypes are
  allowed but only act on the sandbox's own namespaces with uid 65534 and no capabilities.
- memory is limited per process, not per program: a program may use up to
  `max_processes × memory_mb` of address space before its processes are refused.
- CPU time is limited per process: forked children each get their own `cpu_s`, but the wall
  clock bounds them all.
- programs in one worker run one at a time as the same uid, so a program can signal the fork
  server; that only costs a recycled worker (the program's result says so).
- `allow_unsafe=True` (no bwrap): only rlimits, the wall clock, output caps, a private working
  folder and the scrubbed environment apply; the program can read the filesystem, use the
  network and see host processes. A warning is logged.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WORKER_SOURCE = Path(__file__).with_name("sandbox_worker.py").read_text(encoding="utf-8")
# Packages mounted read-only into the sandbox (when installed on the host) for PoT programs.
PRELOADED_PACKAGES = ("sympy", "mpmath", "numpy")
SITE_DIR = "/opt/evolforge/site"
SANDBOX_UID = 65534
# Startup imports sympy and numpy; the grace covers the fork server's own cleanup after a kill.
STARTUP_TIMEOUT_S = 60.0
RESPONSE_GRACE_S = 5.0
SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class SandboxLimits:
    """Limits applied to every program (per process for the rlimits, per program for wall)."""

    cpu_s: float = 5
    wall_s: float = 10
    memory_mb: int = 512
    file_size_mb: int = 16
    max_processes: int = 32
    open_files: int = 64
    max_output_bytes: int = 65536

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {value!r}")
        if self.open_files < 8:
            raise ValueError(f"sandbox limit open_files must be >= 8, got {self.open_files}")
        if self.max_processes < 4:
            # The sandbox's init and the fork server count against the uid's process limit.
            raise ValueError(f"sandbox limit max_processes must be >= 4, got {self.max_processes}")


@dataclass
class SandboxResult:
    stdout: str
    stderr_tail: str
    exit_code: int | None  # negative: killed by that signal; None: no exit status was observed
    timed_out: bool
    killed_by_limit: str | None  # wall, cpu, memory, file_size, open_files, processes, output
    wall_s: float
    error: str | None = None  # the sandbox's own failure, not the program's

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class SandboxUnavailableError(RuntimeError):
    """No isolation is available and unsafe local execution was not allowed."""


class _WorkerLost(Exception):
    """The fork server died or stopped answering; the sandbox must be replaced."""


def _interpreter() -> tuple[str, str]:
    """The real interpreter behind the venv and its installation prefix.

    A venv's python is a symlink to the base installation (here under /root/.pyenv), and its
    libpython is found through an absolute RUNPATH, so the base prefix is mounted at its own path.
    """
    return os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)


def _package_dirs() -> list[tuple[str, str]]:
    binds = []
    for name in PRELOADED_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        pkg = Path(next(iter(spec.submodule_search_locations))).resolve()
        binds.append((str(pkg), f"{SITE_DIR}/{name}"))
        libs = pkg.with_name(f"{name}.libs")  # vendored shared libraries of manylinux wheels
        if libs.is_dir():
            binds.append((str(libs), f"{SITE_DIR}/{libs.name}"))
    return binds


def _bwrap_command(argv: list[str], tmp_mb: int) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailableError("bubblewrap (bwrap) is not installed")
    _, prefix = _interpreter()
    cmd = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--uid", str(SANDBOX_UID),
        "--gid", str(SANDBOX_UID),
        "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    for top in ("bin", "lib", "lib64", "sbin"):
        host = Path("/") / top
        if host.is_symlink():
            cmd += ["--symlink", os.readlink(host), f"/{top}"]
        elif host.is_dir():
            cmd += ["--ro-bind", str(host), f"/{top}"]
    if not prefix.startswith("/usr/"):
        cmd += ["--ro-bind", prefix, prefix]
    purelib = os.path.realpath(sysconfig.get_paths(vars={"base": prefix})["purelib"])
    if purelib.startswith(prefix) and os.path.isdir(purelib):
        # The base installation's site-packages holds whatever the user installed; hide it.
        cmd += ["--tmpfs", purelib]
    for src, dst in _package_dirs():
        cmd += ["--ro-bind", src, dst]
    cmd += [
        "--proc", "/proc",
        "--dev", "/dev",
        "--perms", "1777", "--size", str(tmp_mb * 1024 * 1024), "--tmpfs", "/tmp",
        "--remount-ro", "/",
        "--chdir", "/tmp",
    ]  # fmt: skip
    for key, value in SANDBOX_ENV.items():
        cmd += ["--setenv", key, value]
    return [*cmd, *argv]


def _host_env() -> dict[str, str]:
    # bwrap itself (and an unsafe worker) starts from this, never from os.environ.
    return dict(SANDBOX_ENV, PATH="/usr/local/bin:/usr/bin:/bin")


_probe_lock = threading.Lock()


@functools.cache
def _probe() -> tuple[bool, str]:
    python, _ = _interpreter()
    try:
        cmd = _bwrap_command([python, "-I", "-B", "-c", "import os; print(os.getuid())"], 16)
    except SandboxUnavailableError as exc:
        return False, str(exc)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=30, env=_host_env(), check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"bwrap probe failed: {exc}"
    if proc.returncode != 0 or proc.stdout.strip() != str(SANDBOX_UID):
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"bwrap cannot create the sandbox (exit {proc.returncode}): {detail}"
    version = subprocess.run(
        [cmd[0], "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return True, f"{version or 'bwrap'}: namespaces, uid {SANDBOX_UID}, python {python}"


def isolation_available() -> tuple[bool, str]:
    """Whether bubblewrap can build the sandbox here (probed once per process), and why not."""
    with _probe_lock:
        return _probe()


def _read_exact(fd: int, size: int, deadline: float) -> bytes:
    chunks, got = [], 0
    while got < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _WorkerLost("sandbox worker stopped answering")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, size - got)
        if not chunk:
            raise _WorkerLost("sandbox worker died (the program killed it or escaped a limit)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class _Worker:
    """One long-lived sandbox running the fork server, driven over a pair of pipes."""

    def __init__(self, limits: SandboxLimits, sandboxed: bool) -> None:
        self.sandboxed = sandboxed
        self.host_tmp: str | None = None
        python, _ = _interpreter()
        if sandboxed:
            config = {"sandboxed": True, "tmp_root": "/tmp", "site_dir": SITE_DIR}
            argv = [python, "-I", "-B", "-c", WORKER_SOURCE, json.dumps(config)]
            tmp_mb = max(64, 4 * limits.file_size_mb)
            cmd, cwd = _bwrap_command(argv, tmp_mb), "/"
        else:
            self.host_tmp = tempfile.mkdtemp(prefix="evolforge-sandbox-")
            config = {"sandboxed": False, "tmp_root": self.host_tmp}
            cmd = [sys.executable, "-I", "-B", "-c", WORKER_SOURCE, json.dumps(config)]
            cwd = self.host_tmp
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=_host_env(),
            cwd=cwd,
            start_new_session=True,
        )
        self.ready = False
        self.preloaded: list[str] = []

    def _send(self, message: dict) -> None:
        body = json.dumps(message).encode()
        try:
            self.proc.stdin.write(struct.pack(">I", len(body)) + body)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise _WorkerLost(f"sandbox worker died: {exc}") from exc

    def _receive(self, deadline: float) -> dict:
        fd = self.proc.stdout.fileno()
        (size,) = struct.unpack(">I", _read_exact(fd, 4, deadline))
        return json.loads(_read_exact(fd, size, deadline))

    def wait_ready(self) -> None:
        if not self.ready:
            hello = self._receive(time.monotonic() + STARTUP_TIMEOUT_S)
            self.preloaded = hello.get("preloaded", [])
            self.ready = True

    def execute(self, code: str, stdin: str, limits: SandboxLimits) -> dict:
        self.wait_ready()
        self._send({"code": code, "stdin": stdin, "limits": asdict(limits)})
        return self._receive(time.monotonic() + limits.wall_s + RESPONSE_GRACE_S)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                # bwrap's PID namespace ends with it: every process inside dies too.
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        if self.host_tmp:
            shutil.rmtree(self.host_tmp, ignore_errors=True)


class Sandbox:
    """A pool of warm sandboxed fork servers; `run` is thread-safe, `run_many` uses them all."""

    def __init__(
        self,
        limits: SandboxLimits = SandboxLimits(),
        workers: int = 2,
        allow_unsafe: bool = False,
    ) -> None:
        if workers < 1:
            raise ValueError(f"sandbox workers must be >= 1, got {workers}")
        available, reason = isolation_available()
        if not available:
            if not allow_unsafe:
                raise SandboxUnavailableError(
                    f"refusing to run model-written code without isolation: {reason}. Install "
                    "bubblewrap (apt-get install bubblewrap) and allow user namespaces, or pass "
                    "allow_unsafe=True to run it in a plain subprocess with only rlimits."
                )
            log.warning(
                "sandbox isolation unavailable (%s); running programs UNSAFELY in plain "
                "subprocesses with only rlimits, timeouts and a scrubbed environment",
                reason,
            )
        self.limits = limits
        self.sandboxed = available
        self.size = workers
        self.recycled = 0
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(workers):
            self._idle.put(self._start_worker())

    def _start_worker(self) -> _Worker:
        worker = _Worker(self.limits, self.sandboxed)
        with self._lock:
            self._all.add(worker)
        return worker

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)
            self.recycled += 1

    def run(self, code: str, stdin: str = "") -> SandboxResult:
        if self._closed:
            raise RuntimeError("sandbox is closed")
        worker = self._idle.get()
        started = time.monotonic()
        try:
            answer = worker.execute(code, stdin, self.limits)
        except _WorkerLost as exc:
            self._discard(worker)
            self._idle.put(self._start_worker())
            wall = time.monotonic() - started
            timed_out = wall >= self.limits.wall_s
            return SandboxResult(
                stdout="",
                stderr_tail="",
                exit_code=None,
                timed_out=timed_out,
                killed_by_limit="wall" if timed_out else None,
                wall_s=wall,
                error=f"{exc}; sandbox recycled",
            )
        except BaseException:
            self._discard(worker)
            if not self._closed:
                self._idle.put(self._start_worker())
            raise
        if answer.get("recycle"):
            self._discard(worker)
            self._idle.put(self._start_worker())
        else:
            self._idle.put(worker)
        if "error" in answer and "stdout" not in answer:
            return SandboxResult(
                stdout="",
                stderr_tail="",
                exit_code=None,
                timed_out=False,
                killed_by_limit=None,
                wall_s=time.monotonic() - started,
                error=f"sandbox worker failed: {answer['error'].strip().splitlines()[-1]}",
            )
        return SandboxResult(
            stdout=answer["stdout"],
            stderr_tail=answer["stderr_tail"],
            exit_code=answer["exit_code"],
            timed_out=answer["timed_out"],
            killed_by_limit=answer["killed_by_limit"],
            wall_s=answer["wall_s"],
            error="the program left the sandbox unclean; sandbox recycled"
            if answer.get("recycle")
            else None,
        )

    def run_many(self, programs: list[str]) -> list[SandboxResult]:
        """Run the programs over all workers; results come back in the programs' order."""
        if not programs:
            return []
        with ThreadPoolExecutor(max_workers=min(self.size, len(programs))) as pool:
            return list(pool.map(self.run, programs))

    def warm_up(self) -> None:
        """Wait until every worker has finished its imports (benchmarks call this first)."""
        with self._lock:
            workers = list(self._all)
        with ThreadPoolExecutor(max_workers=len(workers)) as pool:
            list(pool.map(_Worker.wait_ready, workers))

    def close(self) -> None:
        self._closed = True
        with self._lock:
            workers = list(self._all)
            self._all.clear()
        for worker in workers:
            worker.kill()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


def run_program(
    code: str, limits: SandboxLimits | None = None, allow_unsafe: bool = False
) -> SandboxResult:
    """Run one program in a one-worker sandbox (convenient, not fast: use `Sandbox` for batches)."""
    with Sandbox(limits or SandboxLimits(), workers=1, allow_unsafe=allow_unsafe) as sandbox:
        return sandbox.run(code)
