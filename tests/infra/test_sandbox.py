"""The sandbox contains adversarial programs, keeps programs apart, and fails closed.

Most tests need bubblewrap with user namespaces (`apt-get install bubblewrap`) and the sandbox
runtime (`make sandbox-runtime`); they are skipped, with the probe's reason, where it is missing
(and fail instead when EVOLFORGE_SANDBOX_TESTS_REQUIRED is set). The fail-closed and unsafe-mode
tests run anywhere. Security tests check the host after the program, not only what it printed.
CI runs this file as root; `test_suite_passes_as_an_unprivileged_host_user` runs it again as uid
65534, where the resource bound falls back to rlimits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from unittest import mock

import psutil
import pytest

from infra import sandbox as sandbox_module
from infra.sandbox import (
    Sandbox,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailableError,
    cgroups,
    driver,
    isolation_available,
    layout,
    run_program,
)
from infra.sandbox import pool as pool_module
from infra.sandbox import probe as probe_module
from infra.sandbox import runtime as sandbox_runtime
from infra.sandbox import worker as w
from storage.settings import PROJECT_ROOT

AVAILABLE, REASON = isolation_available()
REQUIRED_ENV = "EVOLFORGE_SANDBOX_TESTS_REQUIRED"
if os.environ.get(REQUIRED_ENV) and not AVAILABLE:
    raise RuntimeError(f"{REQUIRED_ENV} is set but the sandbox is unavailable: {REASON}")
needs_bwrap = pytest.mark.skipif(not AVAILABLE, reason=f"sandbox isolation unavailable: {REASON}")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs this file as root)")

LIMITS = SandboxLimits(
    cpu_s=1,
    wall_s=2.5,
    memory_mb=400,
    file_size_mb=1,
    max_processes=8,
    open_files=32,
    max_output_bytes=10_000,
)
# A run must end within its wall limit plus the fork server's cleanup.
WALL_BOUND = LIMITS.wall_s + 1.5
SECRET = "sk-test-secret"
MARK = uuid.uuid4().hex[:12]
HOST_TMP_FILE = Path(f"/tmp/evolforge-sandbox-escape-{MARK}")
REPO_FILE = PROJECT_ROOT / f"sandbox-escape-{MARK}.txt"
HOME_PLANT = Path.home() / f".evolforge-sandbox-planted-{MARK}"


def src(code: str) -> str:
    return textwrap.dedent(code).strip() + "\n"


def sandbox_processes(sandbox: Sandbox) -> int:
    """Processes under the sandboxes' bwrap launchers, as the host sees them."""
    total = 0
    for worker in list(sandbox._all):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += len(psutil.Process(worker.proc.pid).children(recursive=True))
    return total


@pytest.fixture(scope="module")
def host_secrets():
    """A fake API key in the host environment and a planted file in the home, both before the
    sandbox starts, so that the sandbox would inherit them if it could."""
    old = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = SECRET
    HOME_PLANT.write_text(f"planted {SECRET}\n")
    yield
    HOME_PLANT.unlink(missing_ok=True)
    if old is None:
        os.environ.pop("OPENAI_API_KEY", None)
    else:
        os.environ["OPENAI_API_KEY"] = old


@pytest.fixture(scope="module")
def box(host_secrets):
    if not AVAILABLE:
        pytest.skip(f"sandbox isolation unavailable: {REASON}")
    with Sandbox(LIMITS, workers=1) as sandbox:
        sandbox.warm_up()
        yield sandbox


@pytest.fixture(scope="module")
def roomy_box(host_secrets):
    """`box` with the wall and CPU limits far out of the way, for tests that measure another
    limit: on a loaded machine a program that fills memory can take longer than `LIMITS.wall_s`,
    and the wall limit then kills it before it reports (it printed nothing)."""
    if not AVAILABLE:
        pytest.skip(f"sandbox isolation unavailable: {REASON}")
    with Sandbox(LIMITS.model_copy(update={"wall_s": 120, "cpu_s": 30}), workers=1) as sandbox:
        sandbox.warm_up()
        yield sandbox


@pytest.fixture(scope="module")
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.05)
    yield server
    server.close()


def assert_no_connection(server: socket.socket) -> None:
    with pytest.raises(TimeoutError):
        server.accept()


def assert_host_files_untouched() -> None:
    assert not HOST_TMP_FILE.exists()
    assert not REPO_FILE.exists()
    assert HOME_PLANT.read_text() == f"planted {SECRET}\n"


def assert_secret_not_seen(result: SandboxResult) -> None:
    assert SECRET not in result.stdout
    assert SECRET not in result.stderr_tail


def assert_stopped_by(*limits: str):
    def check(result: SandboxResult) -> None:
        assert not result.ok
        assert result.killed_by_limit in limits, result
        return True

    return check


def assert_stdout(expected: str):
    def check(result: SandboxResult) -> None:
        assert result.stdout == expected, result
        return True

    return check


def printed_json(result: SandboxResult):
    """The JSON value a program printed, or a failure that says what became of the program (its
    exit status, the limit that stopped it, its stderr, the sandbox's own error) when it printed
    none."""
    try:
        return json.loads(result.stdout)
    except ValueError:
        pytest.fail(
            f"the program printed {result.stdout!r}, not JSON: exit code {result.exit_code}, "
            f"timed out {result.timed_out}, stopped by {result.killed_by_limit}, "
            f"{result.wall_s:.2f}s, sandbox error {result.error!r}, "
            f"stderr {result.stderr_tail[-2000:]!r}"
        )


# (program, check on its result). Every program prints what it managed to do; `{port}` is the
# host listener's port.
ADVERSARIAL = {
    "connect_to_host_loopback": (
        """
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=1)
            print("connected")
        except OSError as exc:
            print("blocked", type(exc).__name__)
        """,
        lambda r: r.stdout.startswith("blocked"),
    ),
    "resolve_a_host": (
        """
        import socket
        try:
            print(socket.getaddrinfo("pypi.org", 443))
        except OSError as exc:
            print("blocked", type(exc).__name__)
        """,
        lambda r: r.stdout.startswith("blocked"),
    ),
    "udp_to_the_internet": (
        """
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"x", ("1.1.1.1", 53))
            print("sent")
        except OSError as exc:
            print("blocked", type(exc).__name__)
        """,
        lambda r: r.stdout.startswith("blocked"),
    ),
    "write_into_the_repo": (
        f"""
        import os
        for path in ({str(REPO_FILE)!r}, {str(PROJECT_ROOT / "infra" / "sandbox.py")!r}):
            try:
                open(path, "a").write("pwned")
                print("wrote", path)
            except OSError as exc:
                print("blocked", type(exc).__name__)
        """,
        lambda r: r.stdout.count("blocked") == 2,
    ),
    "write_to_host_tmp_and_home": (
        f"""
        for path in ({str(HOST_TMP_FILE)!r}, {str(HOME_PLANT)!r}, "/root/.bashrc"):
            try:
                open(path, "w").write("pwned")
                print("wrote", path)
            except OSError as exc:
                print("blocked", type(exc).__name__)
        """,
        # Only the sandbox's private /tmp is writable; the host's stays untouched (checked below).
        lambda r: r.stdout.count("blocked") == 2,
    ),
    "read_environment_secrets": (
        """
        import os
        print(dict(os.environ))
        for pid in os.listdir("/proc"):
            try:
                print(open(f"/proc/{pid}/environ", "rb").read())
            except (OSError, ValueError):
                pass
        """,
        lambda r: "OPENAI_API_KEY" not in r.stdout,
    ),
    "read_files_in_home": (
        f"""
        import glob
        for path in ["/root/.bashrc", {str(HOME_PLANT)!r}, *glob.glob("/root/*"), *glob.glob("/root/.*")]:
            try:
                print(path, open(path).read()[:200])
            except OSError as exc:
                print("blocked", type(exc).__name__)
        """,
        lambda r: "planted" not in r.stdout and "blocked" in r.stdout,
    ),
    "read_host_proc": (
        """
        import os
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        cmdlines = [open(f"/proc/{p}/cmdline", "rb").read() for p in pids]
        print(len(pids), any(b"pytest" in c for c in cmdlines))
        """,
        # bwrap's init, the fork server and the program itself: nothing of the host.
        assert_stdout("3 False\n"),
    ),
    "fork_bomb": (
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """,
        lambda r: not r.ok and r.killed_by_limit in ("cpu", "wall", "processes"),
    ),
    "memory_bomb": (
        """
        chunks = []
        while True:
            chunks.append(bytearray(50_000_000))
        """,
        assert_stopped_by("memory"),
    ),
    "one_huge_allocation": ("x = bytearray(1 << 36)", assert_stopped_by("memory")),
    # On a loaded machine the wall clock can win the race against the CPU limit.
    "infinite_loop": ("while True:\n    pass\n", assert_stopped_by("cpu", "wall")),
    "cpu_burn_in_threads": (
        """
        import threading
        def burn():
            while True:
                sum(range(1000))
        for _ in range(4):
            threading.Thread(target=burn).start()
        """,
        assert_stopped_by("cpu", "wall"),
    ),
    "sleep_forever": ("import time\ntime.sleep(1000)\n", assert_stopped_by("wall")),
    "huge_output": (
        """
        while True:
            print("x" * 1000)
        """,
        lambda r: r.killed_by_limit == "output" and len(r.stdout) <= LIMITS.max_output_bytes,
    ),
    "huge_stderr": (
        """
        import sys
        while True:
            sys.stderr.write("y" * 1000)
        """,
        lambda r: r.killed_by_limit == "output" and len(r.stderr_tail) <= 8192,
    ),
    "subclasses_to_os_system": (
        f"""
        wrap = [c for c in ().__class__.__bases__[0].__subclasses__()
                if c.__name__ == "_wrap_close"][0]
        system = wrap.__init__.__globals__["system"]
        print(system("echo pwned > {REPO_FILE}; cat /root/.bashrc; cat {HOME_PLANT}"))
        popen = [c for c in object.__subclasses__() if c.__name__ == "Popen"]
        if popen:
            print(popen[0](["id"], stdout=-1).communicate()[0])
        """,
        lambda r: "planted" not in r.stdout and "root" not in r.stdout,
    ),
    "ctypes_raw_syscalls": (
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        results = {
            "setuid0": libc.syscall(105, 0),
            "ptrace_attach_worker": libc.syscall(101, 16, os.getppid(), 0, 0),
            "kill_init": libc.syscall(62, 1, 9),
            "unshare_user": libc.syscall(272, 0x10000000),
            "mount": libc.syscall(165, b"none", b"/usr", b"tmpfs", 0, None),
        }
        print(sorted(results.items()), os.getuid())
        """,
        # kill(1) "succeeds" but the namespace's init ignores it; the test goes on to check that
        # the sandbox still works.
        lambda r: (
            r.stdout
            in {
                f"[('kill_init', {k}), ('mount', -1), ('ptrace_attach_worker', -1), "
                "('setuid0', -1), ('unshare_user', -1)] 65534\n"
                for k in (0, -1)
            }
        ),
    ),
    "huge_file": (
        """
        with open("big.bin", "wb") as f:
            while True:
                f.write(b"z" * 65536)
        """,
        assert_stopped_by("file_size"),
    ),
    "many_open_files": (
        """
        files = [open("f%d" % i, "w") for i in range(10_000)]
        """,
        assert_stopped_by("open_files"),
    ),
}


@needs_bwrap
@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_program_is_contained(box, listener, name):
    code, check = ADVERSARIAL[name]
    baseline = sandbox_processes(box)
    result = box.run(src(code).replace("{port}", str(listener.getsockname()[1])))

    if name == "fork_bomb" and result.error is not None:
        # On a heavily loaded machine the fork server may not finish killing the bomb in time;
        # the host then destroys the whole sandbox, which is the designed fallback.
        assert "recycled" in result.error
        assert result.wall_s < LIMITS.wall_s + driver.RESPONSE_GRACE_S + 1.5
    else:
        assert result.error is None, result
        assert check(result), result
        assert result.wall_s < WALL_BOUND
    assert_secret_not_seen(result)
    assert_host_files_untouched()
    assert_no_connection(listener)
    # The sandbox still serves the next program, and nothing the program started survives it.
    assert box.run("print(6 * 7)").stdout == "42\n"
    assert sandbox_processes(box) == baseline


@needs_bwrap
@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.kill(os.getppid(), 9)\n",
        "import os\nos.kill(-1, 9)\n",
        "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n",
    ],
    ids=["kill_parent", "kill_minus_one", "stop_parent"],
)
def test_signals_to_the_fork_server_only_cost_a_recycled_sandbox(host_secrets, code):
    with Sandbox(LIMITS, workers=1) as sandbox:
        launcher = next(iter(sandbox._all)).proc.pid
        result = sandbox.run(code)
        assert not result.ok
        assert result.wall_s < WALL_BOUND + driver.RESPONSE_GRACE_S
        # The host (this process) is untouched; the next program gets a fresh sandbox.
        assert psutil.Process(os.getpid()).is_running()
        again = sandbox.run("print('alive')")
        assert again.stdout == "alive\n"
        if result.error is not None:
            assert "recycled" in result.error
            assert sandbox.recycled == 1
            assert not psutil.pid_exists(launcher) or psutil.Process(launcher).status() == "zombie"


@needs_bwrap
def test_sleeping_children_do_not_outlive_the_program(box):
    baseline = sandbox_processes(box)
    first = box.run(
        src(
            """
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(1.0)
                    open("/tmp/late-marker", "w").write("still here")
                    os._exit(0)
                os._exit(0)
            print("parent done")
            """
        )
    )
    assert first.stdout == "parent done\n"
    assert sandbox_processes(box) == baseline
    second = box.run(
        src(
            """
            import os, time
            time.sleep(1.5)
            print(os.path.exists("/tmp/late-marker"), len([p for p in os.listdir("/proc") if p.isdigit()]))
            """
        )
    )
    assert second.stdout == "False 3\n"


@needs_bwrap
def test_consecutive_programs_in_one_worker_are_isolated(box):
    first = box.run(
        src(
            """
            import math, os, json, subprocess
            open("note.txt", "w").write("from program 1")
            open("/tmp/shared.txt", "w").write("from program 1")
            math.pi = 3
            json.dumps = lambda *a, **k: "patched"
            subprocess.Popen(["sleep", "30"], start_new_session=True)
            print(os.getcwd())
            """
        )
    )
    assert first.ok, first
    second = box.run(
        src(
            """
            import math, os, json
            procs = [open(f"/proc/{p}/cmdline", "rb").read() for p in os.listdir("/proc") if p.isdigit()]
            print(os.listdir("."), os.path.exists("/tmp/shared.txt"), os.listdir("/tmp"))
            print(math.pi, json.dumps([1]), any(c.startswith(b"sleep") for c in procs))
            """
        )
    )
    assert second.ok, second
    assert second.stdout.splitlines()[0].startswith("[] False [")
    assert "shared.txt" not in second.stdout
    assert second.stdout.splitlines()[1] == "3.141592653589793 [1] False"
    assert first.stdout.strip() not in second.stdout.splitlines()[0]


@needs_bwrap
def test_results_record_stdout_stderr_exit_and_stdin(box):
    assert box.run("x = input()\nprint(int(x) * 2)\n", stdin="21\n").stdout == "42\n"
    failed = box.run("print('before')\nraise ValueError('bad step')\n")
    assert (failed.stdout, failed.exit_code, failed.killed_by_limit) == ("before\n", 1, None)
    assert "ValueError: bad step" in failed.stderr_tail
    assert "run_child" not in failed.stderr_tail
    assert box.run("import sys\nsys.exit(3)\n").exit_code == 3
    assert box.run("print('ok')").ok
    assert not box.run("def broken(:\n").ok


@needs_bwrap
def test_pot_programs_with_preloaded_libraries(box):
    program = src(
        """
        from fractions import Fraction
        from sympy import symbols, solve
        import numpy as np
        x = symbols("x")
        print(Fraction(3, 4) + Fraction(1, 6), solve(x**2 - 4, x), int(np.arange(5).sum()))
        """
    )
    result = box.run(program)
    assert result.stdout == "11/12 [-2, 2] 10\n", result


@needs_bwrap
def test_run_many_keeps_order_over_all_workers(host_secrets):
    with Sandbox(LIMITS, workers=2) as sandbox:
        programs = [f"print({i} ** 2)" for i in range(40)] + ["while True: pass"]
        results = sandbox.run_many(programs)
    assert [r.stdout for r in results[:-1]] == [f"{i**2}\n" for i in range(40)]
    assert results[-1].killed_by_limit in ("cpu", "wall")
    assert sandbox.run_many([]) == []


@needs_bwrap
def test_run_program_one_shot():
    result = run_program("import os\nprint(os.getuid())", SandboxLimits(wall_s=5))
    assert (result.stdout, result.ok) == ("65534\n", True)


def test_limits_are_validated():
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=0)
    with pytest.raises(ValueError, match="max_processes"):
        SandboxLimits(max_processes=0)


def test_fails_closed_without_bubblewrap(monkeypatch):
    monkeypatch.setattr(probe_module.shutil, "which", lambda name: None)
    available, reason = probe_module._probe.__wrapped__()
    assert (available, reason) == (False, "bubblewrap (bwrap) is not installed")
    monkeypatch.setattr(pool_module, "isolation_available", lambda: (False, reason))
    with pytest.raises(SandboxUnavailableError, match="refusing to run model-written code"):
        Sandbox(LIMITS)
    with pytest.raises(SandboxUnavailableError, match="bwrap"):
        run_program("print(1)")


@pytest.fixture
def public_dir():
    """A folder the sandbox user can reach (pytest's tmp_path is private to the test's user)."""
    folder = Path(tempfile.mkdtemp(prefix="evolforge-sandbox-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_fails_closed_when_namespaces_are_refused(monkeypatch, public_dir):
    # A stand-in bwrap that fails the way bwrap does where user namespaces are disabled.
    fake = public_dir / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(probe_module.shutil, "which", lambda name: str(fake))
    available, reason = probe_module._probe.__wrapped__()
    assert not available
    assert "No permissions to create new namespace" in reason


def test_unsafe_mode_still_applies_limits_and_scrubs_env(monkeypatch, caplog, host_secrets):
    monkeypatch.setattr(pool_module, "isolation_available", lambda: (False, "no bwrap here"))
    with caplog.at_level(logging.WARNING, logger="infra.sandbox"):
        sandbox = Sandbox(LIMITS, workers=1, allow_unsafe=True)
    assert "UNSAFELY" in caplog.text
    with sandbox:
        env = sandbox.run("import os\nprint(sorted(os.environ))")
        assert "OPENAI_API_KEY" not in env.stdout and env.ok
        assert sandbox.run("while True: pass").killed_by_limit in ("cpu", "wall")
        assert sandbox.run("import time\ntime.sleep(100)").killed_by_limit == "wall"
        assert sandbox.run("x = bytearray(1 << 36)").killed_by_limit == "memory"
        straggler = sandbox.run(
            src(
                f"""
                import os, time
                if os.fork() == 0:
                    os.setsid()
                    time.sleep(1.0)
                    open({str(HOST_TMP_FILE)!r}, "w").write("late")
                    os._exit(0)
                print(os.getpid())
                """
            )
        )
        assert straggler.ok
        worker_pid = next(iter(sandbox._all)).proc.pid
        assert psutil.Process(worker_pid).children(recursive=True) == []
    assert not HOST_TMP_FILE.exists()


# --- the host after the program: uid, sysctls, processes, memory, syscalls ----------------------

# core_pattern and poweroff_cmd are run by the kernel as root: writing them is a host escape.
SYSCTLS = ("kernel/core_pattern", "kernel/poweroff_cmd", "kernel/hostname", "vm/drop_caches")


def host_state() -> dict:
    """What an escaped program would change on the host."""
    state = {}
    for name in SYSCTLS:
        path = Path("/proc/sys") / name
        state[name] = path.read_text() if os.access(path, os.R_OK) else None
    state["mounts"] = Path("/proc/self/mountinfo").read_text()
    return state


@pytest.fixture
def host_unchanged():
    before = host_state()
    yield
    assert host_state() == before


def sandbox_tree(sandbox: Sandbox) -> list[psutil.Process]:
    """The bwrap launchers and everything under them, as the host sees them."""
    found = []
    for worker in list(sandbox._all):
        with contextlib.suppress(psutil.NoSuchProcess):
            launcher = psutil.Process(worker.proc.pid)
            found += [launcher, *launcher.children(recursive=True)]
    return found


def run_watching(sandbox: Sandbox, code: str, watch) -> SandboxResult:
    """Run `code`, calling `watch(processes)` on the sandbox's host processes every few ms."""
    done = threading.Event()

    def poll():
        while not done.is_set():
            # A process may exit between being listed and being read.
            with contextlib.suppress(psutil.Error, OSError):
                watch(sandbox_tree(sandbox))
            time.sleep(0.005)

    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        return sandbox.run(code)
    finally:
        done.set()
        watcher.join()


def without_cgroup(isolation):
    return dataclasses.replace(isolation, cgroup=None, cgroup_reason="cgroups off for this test")


@pytest.fixture(scope="module", params=["own_bound", "rlimits"])
def pool(request, host_secrets):
    """One worker with this machine's bound (a cgroup as root here), and one with rlimits only."""
    if not AVAILABLE:
        pytest.skip(f"sandbox isolation unavailable: {REASON}")
    isolation = probe_module.current_isolation()
    if request.param == "rlimits":
        isolation = without_cgroup(isolation)
    with mock.patch.object(pool_module, "current_isolation", lambda: isolation):
        sandbox = Sandbox(LIMITS, workers=1)
    with sandbox:
        sandbox.warm_up()
        yield sandbox


@needs_bwrap
@pytest.mark.parametrize("sysctl", SYSCTLS)
def test_sysctls_cannot_be_opened_for_writing(box, host_unchanged, sysctl):
    # Opened and closed without writing: if the test fails, nothing on the host has changed.
    result = box.run(
        src(
            f"""
            import os
            try:
                os.close(os.open("/proc/sys/{sysctl}", os.O_WRONLY))
                print("opened")
            except OSError as exc:
                print("refused", exc.errno)
            """
        )
    )
    assert result.stdout.startswith("refused"), result
    assert int(result.stdout.split()[1]) in (errno.EACCES, errno.EROFS, errno.EPERM)


@needs_bwrap
@needs_root
def test_proc_sys_stays_read_only_for_a_program_mapped_to_root(host_unchanged):
    # The old set-up: bwrap started by root maps the program's uid to host root, and /proc/sys
    # (mode 0555) looked read-only to bwrap so it was left writable. With the same mapping, the
    # sandbox's read-only binds alone must refuse the write.
    isolation = probe_module.current_isolation()
    probe = src(
        """
        import os
        for path in ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/poweroff_cmd"):
            try:
                os.close(os.open(path, os.O_WRONLY))
                print("opened", path)
            except OSError as exc:
                print("refused", exc.errno)
        """
    )
    argv = [isolation.layout.python, "-I", "-B", "-c", probe]
    cmd = layout.bwrap_command(isolation.bwrap, isolation.layout, argv, 16)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert proc.stdout == f"refused {errno.EROFS}\nrefused {errno.EROFS}\n", proc


@needs_bwrap
def test_programs_run_as_an_unprivileged_host_uid(pool, host_unchanged):
    seen = {}

    def watch(processes):
        for process in processes:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except FileNotFoundError:
                continue  # exited since it was listed
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            seen[process.pid] = (
                {int(u) for u in fields["Uid"].split()},
                {int(g) for g in fields["Gid"].split()},
                {int(g) for g in fields["Groups"].split()},
                int(fields["CapEff"], 16),
            )

    result = run_watching(pool, "import time\ntime.sleep(1.0)\nprint('slept')\n", watch)
    assert result.stdout == "slept\n", result
    # bwrap, its init, the fork server and the sleeping program at least.
    assert len(seen) >= 4, seen
    for uids, gids, groups, caps in seen.values():
        assert 0 not in uids and 0 not in gids and 0 not in groups, seen
        assert uids == {pool.isolation.uid} and gids == {pool.isolation.gid}
        assert caps == 0


@needs_bwrap
def test_forking_stops_at_max_processes(pool, host_unchanged):
    peak = [0]

    def watch(processes):
        # Everything but bwrap, its init and the fork server belongs to the program.
        peak[0] = max(peak[0], len(processes) - 3)

    tries = LIMITS.max_processes + 32
    result = run_watching(
        pool,
        src(
            f"""
            import os, time
            started = 0
            for _ in range({tries}):
                try:
                    if os.fork() == 0:
                        time.sleep(1.0)
                        os._exit(0)
                    started += 1
                except OSError as exc:
                    print("refused", exc.errno)
                    break
            print("started", started)
            time.sleep(1.0)
            """
        ),
        watch,
    )
    assert result.stdout.startswith(f"refused {errno.EAGAIN}\n"), result
    started = int(result.stdout.split()[-1])
    assert started == LIMITS.max_processes - 1  # the program's own process counts too
    assert LIMITS.max_processes - 2 <= peak[0] <= LIMITS.max_processes, peak
    worker = next(iter(pool._all))
    if pool.isolation.cgroup is not None:
        pids = next(d for d in worker.cgroup.dirs if (d / "pids.max").exists())
        assert (pids / "pids.max").read_text().strip() == str(LIMITS.max_processes)


@needs_bwrap
def test_concurrent_programs_do_not_share_the_process_limit(host_secrets, host_unchanged):
    # All workers run as one host uid. Under rlimits alone each sandbox must still get its own
    # max_processes (the kernel counts RLIMIT_NPROC per user namespace), or concurrent programs
    # would starve each other.
    isolation = without_cgroup(probe_module.current_isolation())
    with mock.patch.object(pool_module, "current_isolation", lambda: isolation):
        sandbox = Sandbox(LIMITS, workers=2)
    program = src(
        f"""
        import os, time
        started = 0
        for _ in range({LIMITS.max_processes + 8}):
            try:
                if os.fork() == 0:
                    time.sleep(1.5)
                    os._exit(0)
                started += 1
            except OSError:
                break
        print(started)
        time.sleep(1.0)
        """
    )
    with sandbox:
        sandbox.warm_up()
        peak = [0]
        done = threading.Event()

        def watch():
            while not done.is_set():
                with contextlib.suppress(psutil.Error):
                    peak[0] = max(peak[0], len(sandbox_tree(sandbox)))
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            results = sandbox.run_many([program, program])
        finally:
            done.set()
            watcher.join()
    assert [r.stdout for r in results] == [f"{LIMITS.max_processes - 1}\n"] * 2, results
    # Both at once on the host: 2 x (bwrap, init, fork server) + 2 x max_processes.
    assert peak[0] == 2 * (3 + LIMITS.max_processes), peak


@needs_bwrap
def test_memory_of_all_processes_is_bounded_by_the_cgroup(roomy_box, host_unchanged):
    box = roomy_box
    if box.isolation.cgroup is None:
        pytest.skip(f"no cgroup here ({box.isolation.cgroup_reason}): rlimits bound each process")
    worker = next(iter(box._all))
    # Four children of 150 MB each: every one is under the per-process limit (400 MB), together
    # they are over the program's 400 MB; the cgroup's OOM killer stops some of them. Each child
    # holds its block until every child holds one or was killed, so they overlap however slowly
    # a loaded machine runs them (a fixed sleep let early children exit before late ones filled
    # their blocks). The children volunteer as the OOM killer's victims: the parent reports.
    result = box.run(
        src(
            """
            import json, os
            release_r, release_w = os.pipe()
            holding = {}  # read end of each child's "I hold my block" pipe -> its pid
            for _ in range(4):
                ready_r, ready_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    for fd in (release_w, ready_r, *holding):
                        os.close(fd)
                    open("/proc/self/oom_score_adj", "w").write("1000")
                    block = bytearray(150_000_000)
                    for i in range(0, len(block), 4096):
                        block[i] = 1
                    os.write(ready_w, b"1")
                    os.read(release_r, 1)  # EOF once the parent lets go
                    os._exit(0)
                os.close(ready_w)
                holding[ready_r] = pid
            held = [os.read(fd, 1) == b"1" for fd in holding]  # b"": killed before it held
            os.close(release_w)
            codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in holding.values()]
            print(json.dumps({"held": held, "codes": codes}))
            """
        )
    )
    report = printed_json(result)
    assert -9 in report["codes"], (report, result)
    memory_dir = next(
        d for d in worker.cgroup.dirs if (d / box.isolation.cgroup.memory_limit).exists()
    )
    peak = memory_dir / (
        "memory.max_usage_in_bytes" if box.isolation.cgroup.version == 1 else "memory.peak"
    )
    assert int(peak.read_text()) <= LIMITS.memory_mb * 1024 * 1024


def test_a_cgroup_without_both_limits_is_refused_and_removed():
    tree, reason = cgroups.cgroup_tree()
    if tree is None:
        pytest.skip(f"no cgroup here ({reason})")
    # Only the first folder (memory on cgroup v1): no pids.max to set, so no cgroup at all.
    partial = dataclasses.replace(tree, parents=tree.parents[:1])
    if tree.version == 2:
        partial = dataclasses.replace(tree, memory_limit="memory.absent")
    before = sorted(tree.parents[0].iterdir())
    with pytest.raises(OSError, match="limit in"):
        cgroups.ProgramCgroup(partial, LIMITS)
    assert sorted(tree.parents[0].iterdir()) == before


@needs_bwrap
def test_a_program_killed_by_the_cgroup_is_reported_as_memory(roomy_box):
    box = roomy_box
    if box.isolation.cgroup is None:
        pytest.skip(f"no cgroup here ({box.isolation.cgroup_reason}): rlimits bound each process")
    # The main process volunteers as the OOM killer's victim; its children fill the cgroup. All
    # of them wait for that kill rather than for a fixed time, which a loaded machine could
    # outlast before the children have filled the cgroup (the wall limit would win the race).
    result = box.run(
        src(
            """
            import os, time
            open("/proc/self/oom_score_adj", "w").write("1000")
            for _ in range(4):
                if os.fork() == 0:
                    open("/proc/self/oom_score_adj", "w").write("0")
                    block = bytearray(150_000_000)
                    for i in range(0, len(block), 4096):
                        block[i] = 1
                    time.sleep(1000)
                    os._exit(0)
            time.sleep(1000)
            """
        )
    )
    assert result.exit_code == -9 and result.killed_by_limit == "memory", result
    assert not result.timed_out


# Each call with arguments that would do nothing harmful even if the filter let it through; the
# filter must refuse it with EPERM and report it in the result's `denied`.
DENIED_CALLS = {
    "mount": (165, b"none", b"/tmp", b"tmpfs", 0, None),
    "umount2": (166, b"/tmp", 0),
    "pivot_root": (155, b"/tmp", b"/tmp"),
    "unshare": (272, 0x00020000),
    "setns": (308, -1, 0),
    "ptrace": (101, 0, 0, 0, 0),
    "process_vm_readv": (310, 1, None, 0, None, 0, 0),
    "process_vm_writev": (311, 1, None, 0, None, 0, 0),
    "keyctl": (250, 0, -3, 0),
    "add_key": (248, b"user", b"evolforge-test", b"x", 1, 0),
    "request_key": (249, b"user", b"evolforge-none", None, 0),
    "bpf": (321, 9999, None, 0),
    "perf_event_open": (298, None, 0, -1, -1, 0),
    "kexec_load": (246, 0, 0, None, 0),
    "init_module": (175, None, 0, b""),
    "finit_module": (313, -1, b"", 0),
    "delete_module": (176, b"evolforge_none", 0),
    "reboot": (169, 0, 0, 0, None),
    "swapon": (167, b"/nonexistent", 0),
    "swapoff": (168, b"/nonexistent"),
    "syslog": (103, 10, None, 0),
    "personality": (135, 0x0040000),
    "clone(0x10000000)": (56, 0x10000000 | 17, 0, 0, 0, 0),
    "unshare_user": (272, 0x10000000),
}


@needs_bwrap
@pytest.mark.parametrize("name", sorted(DENIED_CALLS))
def test_denied_syscall_fails_with_eperm(box, host_unchanged, name):
    nr, *args = DENIED_CALLS[name]
    result = box.run(
        src(
            f"""
            import ctypes, os
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long
            ret = libc.syscall({nr}, *{args!r})
            if ret == 0 and {nr} == 56:
                os._exit(0)  # a clone that got through: the child must not print
            print(ret, ctypes.get_errno())
            """
        )
    )
    assert result.stdout == f"-1 {errno.EPERM}\n", result
    assert result.denied == [name.removesuffix("_user")], result


@needs_bwrap
def test_clone3_falls_back_and_threads_and_subprocesses_still_work(box):
    result = box.run(
        src(
            """
            import ctypes, subprocess, threading
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long
            args = (ctypes.c_uint64 * 11)(0x10000000)  # struct clone_args, flags = CLONE_NEWUSER
            print(libc.syscall(435, args, ctypes.sizeof(args)), ctypes.get_errno())
            out = []
            thread = threading.Thread(target=lambda: out.append(6 * 7))
            thread.start()
            thread.join()
            print(out, subprocess.run(["/bin/echo", "hi"], capture_output=True, text=True).stdout)
            print(libc.syscall(135, 0xFFFFFFFF) >= 0)  # the personality query stays allowed
            """
        )
    )
    assert result.stdout == f"-1 {errno.ENOSYS}\n[42] hi\n\nTrue\n", result
    assert result.denied == []


def filter_decision(arch: int, nr: int, first_arg: int = 0) -> int:
    """Run the worker's classic-BPF filter on one struct seccomp_data, like the kernel does."""
    program = w.seccomp_filter()
    data = struct.pack("=IIQ6Q", nr, arch, 0, first_arg, 0, 0, 0, 0, 0)
    pc, acc = 0, 0
    while True:
        op, jt, jf, k = struct.unpack_from("=HBBI", program, pc * 8)
        pc += 1
        if op == w.BPF_LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
        elif op == w.BPF_RET_K:
            return k
        else:
            taken = {
                w.BPF_JEQ_K: acc == k,
                w.BPF_JGE_K: acc >= k,
                w.BPF_JSET_K: bool(acc & k),
            }[op]
            pc += jt if taken else jf


def test_filter_decides_by_arch_number_and_flags():
    x86_64, i386 = w.AUDIT_ARCH_X86_64, 0x40000003
    allow, notify = w.SECCOMP_RET_ALLOW, w.SECCOMP_RET_USER_NOTIF
    assert filter_decision(x86_64, 39) == allow  # getpid
    assert filter_decision(x86_64, 57) == allow  # fork
    assert filter_decision(x86_64, 56, 0x01200011) == allow  # clone as fork() makes it
    assert filter_decision(x86_64, 56, 0x003D0F00) == allow  # clone as pthread_create makes it
    for flag in (
        0x00020000,
        0x02000000,
        0x04000000,
        0x08000000,
        0x10000000,
        0x20000000,
        0x40000000,
    ):
        assert filter_decision(x86_64, 56, flag | 17) == notify  # any namespace flag
    assert filter_decision(x86_64, 435) == w.SECCOMP_RET_ERRNO | errno.ENOSYS  # clone3
    assert filter_decision(x86_64, 135, 0xFFFFFFFF) == allow  # personality query
    assert filter_decision(x86_64, 135, 0) == notify
    for nr in w.DENIED_SYSCALLS.values():
        assert filter_decision(x86_64, nr) == notify
    assert filter_decision(x86_64, 0x40000000 | 39) == notify  # x32 ABI
    assert filter_decision(i386, 20) == notify  # i386 getpid through int 0x80


# --- start-up checks ----------------------------------------------------------------------------


def assert_refused_with(monkeypatch, *reason_parts: str) -> None:
    available, reason = probe_module._probe.__wrapped__()
    assert not available and all(part in reason for part in reason_parts), reason
    monkeypatch.setattr(pool_module, "isolation_available", lambda: (False, reason))
    with pytest.raises(SandboxUnavailableError) as refused:
        Sandbox(LIMITS, workers=1)
    assert reason in str(refused.value) and "\n" not in str(refused.value)


def test_fails_closed_without_a_seccomp_filter(monkeypatch):
    monkeypatch.setattr(probe_module, "seccomp_unsupported", lambda: "no table for riscv64")
    assert_refused_with(monkeypatch, "seccomp filter unavailable: no table for riscv64")


@needs_root
def test_fails_closed_when_it_cannot_drop_root(monkeypatch):
    monkeypatch.setenv(sandbox_module.SANDBOX_UID_ENV, "0")
    assert_refused_with(monkeypatch, "cannot drop to a non-root uid")


@needs_bwrap
def test_fails_closed_when_proc_sys_stays_writable(monkeypatch):
    monkeypatch.setattr(layout, "PROC_READ_ONLY", ())
    assert_refused_with(monkeypatch, "/proc/sys", "not read-only in the sandbox")


@needs_bwrap
def test_worker_without_its_filter_is_refused(monkeypatch):
    isolation = probe_module.current_isolation()
    source = driver.WORKER_SOURCE.replace('config.get("seccomp", True)', "False", 1)
    assert source != driver.WORKER_SOURCE
    monkeypatch.setattr(driver, "WORKER_SOURCE", source)
    worker = driver.Worker(LIMITS, isolation, preload=[])
    try:
        with pytest.raises(driver.WorkerLost, match="without its seccomp filter"):
            worker.wait_ready()
    finally:
        worker.kill()


@needs_bwrap
def test_memory_cap_is_checked_at_start_up(monkeypatch):
    isolation = probe_module.current_isolation()
    monkeypatch.setenv(sandbox_module.MEMORY_CAP_ENV, str(LIMITS.memory_mb * 3))
    monkeypatch.setattr(pool_module, "current_isolation", lambda: without_cgroup(isolation))
    with pytest.raises(SandboxUnavailableError, match="max_processes x memory_mb"):
        Sandbox(LIMITS, workers=1)  # 8 processes x 400 MiB > 1200 MiB
    if isolation.cgroup is not None:
        monkeypatch.setattr(pool_module, "current_isolation", lambda: isolation)
        with Sandbox(LIMITS, workers=2) as fits:
            assert fits.bound.startswith("cgroup")  # 2 x 400 MiB in cgroups fits the cap


# --- the same suite as an unprivileged host user ------------------------------------------------

UNPRIVILEGED = "65534"
# Tests that need root or a cgroup, which uid 65534 does not have.
SKIPPABLE_UNPRIVILEGED = {
    "test_proc_sys_stays_read_only_for_a_program_mapped_to_root",
    "test_fails_closed_when_it_cannot_drop_root",
    "test_memory_of_all_processes_is_bounded_by_the_cgroup",
    "test_a_program_killed_by_the_cgroup_is_reported_as_memory",
    "test_a_cgroup_without_both_limits_is_refused_and_removed",
}


def python_for(uid: str, env: dict) -> tuple[str | None, list[str]]:
    """A Python interpreter `uid` can run with this project's packages, and why others fail."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(sys.executable), f"/usr/bin/python{version}"]
    failures = []
    probe = (
        "import os, sys, psutil, pytest, infra.sandbox; print(os.access(sys.executable, os.X_OK))"
    )
    for python in dict.fromkeys(candidates):
        check = [*setpriv(uid), python, "-c", probe]
        proc = subprocess.run(check, env=env, capture_output=True, text=True, check=False)
        # setpriv falls back to a PATH search when the path is not executable, keeping the name
        # in sys.executable: check that the user can execute it (the unsafe-mode test does).
        if proc.returncode == 0 and proc.stdout.strip() == "True":
            return python, failures
        why = (proc.stderr.strip().splitlines() or ["not executable by this user"])[-1]
        failures.append(f"{python}: {why}")
    return None, failures


def setpriv(uid: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]


@needs_bwrap
@needs_root
def test_suite_passes_as_an_unprivileged_host_user(public_dir):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    home = public_dir / "home"
    home.mkdir()
    os.chown(home, int(UNPRIVILEGED), int(UNPRIVILEGED))
    site_packages = next(
        p for p in sys.path if p.endswith("site-packages") and "sandbox-runtime" not in p
    )
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": f"{PROJECT_ROOT}:{site_packages}",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HF_HUB_OFFLINE": "1",
        sandbox_runtime.RUNTIME_ENV: str(sandbox_runtime.default_location()),
        REQUIRED_ENV: "1",
    }
    python, failures = python_for(UNPRIVILEGED, env)
    if python is None:
        pytest.skip(f"uid {UNPRIVILEGED} cannot run Python here: {'; '.join(failures)}")
    report = home / "report.xml"
    proc = subprocess.run(
        [
            *setpriv(UNPRIVILEGED),
            python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "--basetemp", str(home / "pytest"), "--junitxml", str(report),
            "-k", "not unprivileged_host_user",
            str(Path(__file__).resolve()),
        ],
        env=env, cwd=home, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    skipped = {c.get("name").split("[")[0] for c in cases if c.find("skipped") is not None}
    assert skipped <= SKIPPABLE_UNPRIVILEGED, skipped
    assert " passed" in proc.stdout
