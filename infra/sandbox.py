"""Run model-written Python programs (PoT rationales) in a sandbox, and nowhere else.

Every program the factory executes goes through `Sandbox.run` / `run_program`, which return a
`SandboxResult` (stdout, stderr tail, exit code, timed out, which limit killed it, wall time, the
syscalls the filter refused) instead of raising. A pool of long-lived bubblewrap sandboxes each
runs a small fork server (`infra/sandbox_worker.py`) that has the common math modules (and sympy,
numpy when installed) already imported and forks a fresh child per program, so a short program
costs a few milliseconds rather than a new interpreter.

    with Sandbox(SandboxLimits(cpu_s=2, wall_s=4)) as sandbox:
        results = sandbox.run_many(programs)

What is isolated (each sandbox is `bwrap --unshare-all`, started once per worker):
- host identity: programs run as an unprivileged host uid/gid, never root. A factory running as
  root starts bwrap itself as `$EVOLFORGE_SANDBOX_UID`/`$EVOLFORGE_SANDBOX_GID` (default 65534,
  nobody/nogroup) with no supplementary groups; any other user starts it as itself. bwrap's user
  namespace maps the program's uid 65534 to that host uid, so every check that compares uids
  (sysctl writes, RLIMIT_NPROC, signals, file modes) sees an ordinary user. The start-up check
  reads the running sandbox's host uids from /proc and refuses root.
- syscalls: a seccomp filter on the fork server and every program it forks (see
  `sandbox_worker.DENIED_SYSCALLS`): mount and the new mount API, umount2, pivot_root, chroot,
  unshare, setns, clone with any namespace flag (user namespaces included), ptrace,
  process_vm_readv/writev, pidfd_getfd, kcmp, keyctl, add_key, request_key, bpf,
  perf_event_open, kexec_load, kexec_file_load, init_module, finit_module, delete_module, reboot,
  swapon, swapoff, syslog, personality changes (the query is allowed), io_uring, userfaultfd,
  open_by_handle_at, clock/time setting and a few more. Each fails with EPERM and is listed in
  the result's `denied`; clone3 fails with ENOSYS so libc falls back to clone, whose flags the
  filter reads; calls of another ABI (i386, x32) are denied. The table is x86_64's: on other
  architectures the sandbox refuses to start.
- /proc: a private procfs for the sandbox's PID namespace, with /proc/sys, /proc/sysrq-trigger,
  /proc/irq and /proc/bus bound read-only over it, whatever uid the program has.
- network: a private network namespace with only its own loopback; the host's 127.0.0.1
  services and DNS are unreachable.
- filesystem: only /usr, the sandbox runtime (`infra/sandbox_runtime.py`: a copy of the base
  Python installation without its site-packages, and the preloaded packages; `make` builds it)
  are visible, read-only; the root is a read-only tmpfs; /tmp is a small private tmpfs. /root,
  /home, /work, the project and EVOLFORGE_HOME are not mounted at all.
- processes: a private PID namespace (host processes and their /proc entries are invisible), a
  new session, no capabilities, no nested user namespaces (bwrap's --disable-userns and the
  filter); the sandbox dies with the host process.
- environment: an explicit minimal environment (PATH, LANG, HOME, TMPDIR, thread counts); no
  variable of the host process (API keys included) is passed.
- resources, per process: rlimits on CPU seconds, address space (memory_mb), file size and open
  files; a wall-clock limit after which every process of the program is SIGKILLed; stdout and
  stderr capped (the program is killed when it exceeds the cap).
- resources, per program, across all its processes (which bound is in force is logged once):
  * a cgroup, where the machine gives the factory one: as root on a cgroup v1 machine, one
    cgroup per worker below the factory's own in the memory and pids hierarchies; on cgroup v2,
    below the delegated folder named by `$EVOLFORGE_SANDBOX_CGROUP`. Each program's process
    joins it before its code runs: memory_mb for all its memory (tmpfs files included, no swap)
    and max_processes for its tasks. An OOM kill there is reported as killed_by_limit="memory".
  * otherwise RLIMIT_NPROC, enforced because the uid is not root and counted per user namespace
    (Linux >= 5.14), i.e. per sandbox: max_processes tasks, so at most max_processes × memory_mb
    of address space. Start-up refuses a pool whose workers × that figure exceeds the cap
    (`$EVOLFORGE_SANDBOX_MEMORY_CAP_MB`, default half the RAM).
  RLIMIT_NPROC is set in both cases.
- between programs in one worker: each runs in a fresh fork (module state and monkeypatches
  die with it) with its own working folder; after it, every process it left is killed and the
  whole /tmp is wiped. A worker that cannot get back to that state, or that the program killed,
  is discarded and a fresh sandbox started.
- fail closed: without bwrap, without a non-root uid, without the filter, with /proc/sys
  writable, or when the sandbox user cannot reach the runtime, `Sandbox` raises
  `SandboxUnavailableError` with one line naming the missing protection (unless allow_unsafe).

What is not isolated:
- the kernel: the filter is a denylist. Files, memory, sockets (in the private network
  namespace), signals and the rest stay allowed, so a kernel exploit through them escapes.
- one host uid for all workers: sandboxes are kept apart by their PID, mount, IPC and network
  namespaces, not by uid. On kernels before 5.14 RLIMIT_NPROC counts that uid across every
  sandbox, so without a cgroup concurrent programs share max_processes.
- memory without a cgroup is bounded per process, so a program may use up to
  max_processes × memory_mb, plus its /tmp (a tmpfs of max(64, 4 × file_size_mb) MiB).
- with cgroup v1 the OOM killer ends one process at a time; the program's other processes run
  on until they finish or the wall clock. The cgroup v2 path has not run on the development
  machine (cgroup v1 there).
- CPU time is limited per process: forked children each get their own `cpu_s`, but the wall
  clock bounds them all.
- programs in one worker run one at a time as the same uid, so a program can signal the fork
  server; that only costs a recycled worker (the program's result says so). bwrap's own init
  (PID 1 in the sandbox) runs without the filter; programs cannot ptrace it.
- `allow_unsafe=True` (no bwrap): only rlimits, the wall clock, output caps, the seccomp filter
  (x86_64), a private working folder and the scrubbed environment apply; the program runs as the
  factory's own uid (root, if the factory is root), can read the filesystem, use the network and
  see host processes. A warning is logged.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import queue
import re
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from infra import sandbox_runtime
from infra.sandbox_worker import DENIED_SYSCALLS, seccomp_unsupported

log = logging.getLogger(__name__)

WORKER_SOURCE = Path(__file__).with_name("sandbox_worker.py").read_text(encoding="utf-8")
PRELOADED_PACKAGES = sandbox_runtime.PRELOADED_PACKAGES
SITE_DIR = "/opt/evolforge/site"
# The uid/gid programs have inside the sandbox (bwrap maps it to the host uid below).
SANDBOX_UID = 65534
# The host uid/gid that programs run as when the factory runs as root (never 0).
SANDBOX_UID_ENV = "EVOLFORGE_SANDBOX_UID"
SANDBOX_GID_ENV = "EVOLFORGE_SANDBOX_GID"
DEFAULT_HOST_ID = 65534  # nobody / nogroup
# A cgroup v2 folder delegated to the factory, or "none" to use rlimits only (see `_cgroups`).
CGROUP_ENV = "EVOLFORGE_SANDBOX_CGROUP"
# Cap on the memory all of a pool's programs can take together (default: half the RAM).
MEMORY_CAP_ENV = "EVOLFORGE_SANDBOX_MEMORY_CAP_MB"
# Covered read-only in the sandbox's /proc, whatever uid the program has.
PROC_READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus")
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
MIB = 1024 * 1024


class SandboxLimits(BaseModel):
    """Limits applied to every program.

    cpu_s, memory_mb (address space), file_size_mb and open_files are rlimits of each process;
    wall_s and max_output_bytes hold for the program as a whole. max_processes counts the
    program's processes and threads together. Where the factory has a cgroup, memory_mb also
    bounds the memory of all the program's processes together; otherwise their sum is bounded
    by max_processes × memory_mb, which `Sandbox` checks against a cap at start-up.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_s: float = Field(5, gt=0, description="CPU seconds a program may use")
    wall_s: float = Field(10, gt=0, description="wall-clock seconds before it is killed")
    memory_mb: int = Field(512, gt=0, description="memory of a program (MiB)")
    file_size_mb: int = Field(16, gt=0, description="largest file a program may write (MiB)")
    max_processes: int = Field(8, gt=0, description="processes and threads of one program")
    open_files: int = Field(64, ge=8, description="open files of one process")
    max_output_bytes: int = Field(65536, gt=0, description="output kept of a program")


class SandboxSettings(SandboxLimits):
    """The limits plus how the sandbox runs: what a stage's parameters hold."""

    workers: int = Field(2, ge=1, description="programs run at once")
    allow_unsafe: bool = Field(
        False,
        description="run programs without isolation (rlimits and timeouts only); never in "
        "production",
    )

    def limits(self) -> SandboxLimits:
        return SandboxLimits(**self.model_dump(include=set(SandboxLimits.model_fields)))

    def fingerprint(self) -> dict[str, Any]:
        """How many programs run at once does not change what they print."""
        return self.model_dump(mode="json", exclude={"workers"})

    def open(self) -> Sandbox:
        return Sandbox(self.limits(), workers=self.workers, allow_unsafe=self.allow_unsafe)


@dataclass
class SandboxResult:
    stdout: str
    stderr_tail: str
    exit_code: int | None  # negative: killed by that signal; None: no exit status was observed
    timed_out: bool
    killed_by_limit: str | None  # wall, cpu, memory, file_size, open_files, processes, output
    wall_s: float
    error: str | None = None  # the sandbox's own failure, not the program's
    # Syscalls the seccomp filter refused (each failed with EPERM), in the order first tried.
    denied: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class SandboxUnavailableError(RuntimeError):
    """No isolation is available and unsafe local execution was not allowed."""


class _WorkerLost(Exception):
    """The fork server died or stopped answering; the sandbox must be replaced."""


_logged: set[str] = set()
_log_lock = threading.Lock()


def _log_once(level: int, message: str) -> None:
    with _log_lock:
        if message in _logged:
            return
        _logged.add(message)
    log.log(level, message)


def sandbox_ids() -> tuple[int, int]:
    """The host uid and gid programs run as: never root.

    As root the factory starts bubblewrap as `$EVOLFORGE_SANDBOX_UID`/`$EVOLFORGE_SANDBOX_GID`
    (default 65534, nobody/nogroup) with no supplementary groups; as any other user it runs
    bubblewrap as itself. Raises ValueError when the configured ids are not usable.
    """
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    ids = []
    for name in (SANDBOX_UID_ENV, SANDBOX_GID_ENV):
        raw = os.environ.get(name, str(DEFAULT_HOST_ID))
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number") from None
        if not 0 < value < 2**32 - 1:
            raise ValueError(
                f"{name}={value} would not drop root (it must be between 1 and 2^32-2)"
            )
        ids.append(value)
    return ids[0], ids[1]


@dataclass(frozen=True)
class _Layout:
    """What the sandbox mounts to run the interpreter and the preloaded packages."""

    python: str  # interpreter path inside the sandbox
    binds: tuple[tuple[str, str], ...]  # (host source, sandbox destination), read-only
    hide: tuple[str, ...]  # folders covered with an empty tmpfs
    description: str


def _layout(uid: int, gid: int) -> tuple[_Layout | None, str]:
    """The runtime `make` built, else the live interpreter; None and why if uid cannot reach it."""
    runtime = sandbox_runtime.load()
    if runtime is not None:
        binds = [(str(runtime.site_dir), SITE_DIR)]
        if runtime.python_dir is not None:
            binds.insert(0, (str(runtime.python_dir), runtime.prefix))
        layout = _Layout(runtime.python, tuple(binds), (), f"runtime {runtime.root}")
        installed = sandbox_runtime.package_versions(sandbox_runtime.installed_packages())
        stale = {k: v for k, v in installed.items() if runtime.packages.get(k) != v}
        if stale:
            _log_once(
                logging.WARNING,
                f"sandbox runtime {runtime.root} has {runtime.packages}, the venv has {installed}: "
                "rebuild it with `make sandbox-runtime`",
            )
    else:
        python = os.path.realpath(sys.executable)
        prefix = os.path.realpath(sys.base_prefix)
        binds, hide = [], []
        if not (prefix == "/usr" or prefix.startswith("/usr/")):
            # A venv's libpython is found through an absolute RUNPATH: mount the prefix in place.
            binds.append((prefix, prefix))
        purelib = os.path.realpath(sysconfig.get_paths(vars={"base": prefix})["purelib"])
        if purelib.startswith(prefix) and os.path.isdir(purelib):
            # The base installation's site-packages holds whatever the user installed; hide it.
            hide.append(purelib)
        for name, folder in sandbox_runtime.installed_packages().items():
            binds.append((str(folder), f"{SITE_DIR}/{name}"))
            libs = folder.with_name(f"{name}.libs")
            if libs.is_dir():
                binds.append((str(libs), f"{SITE_DIR}/{libs.name}"))
        layout = _Layout(python, tuple(binds), tuple(hide), f"live interpreter {python}")
    for source, _ in layout.binds:
        blocked = sandbox_runtime.blocked_for(source, uid, gid)
        if blocked:
            return None, (
                f"the sandbox user (uid {uid}) cannot reach {source}: {blocked} is not searchable; "
                "build the sandbox runtime with `make sandbox-runtime` "
                f"(or set {sandbox_runtime.RUNTIME_ENV} to one it can reach)"
            )
    return layout, layout.description


def _bwrap_command(bwrap: str, layout: _Layout, argv: list[str], tmp_mb: int) -> list[str]:
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
    for source, destination in layout.binds:
        cmd += ["--ro-bind", source, destination]
    for folder in layout.hide:
        cmd += ["--tmpfs", folder]
    cmd += ["--proc", "/proc"]
    # bwrap covers these only when they look writable to the caller at set-up, which /proc/sys
    # (mode 0555) never does; a read-only bind holds whatever uid the program has.
    for path in PROC_READ_ONLY:
        cmd += ["--ro-bind-try" if path != "/proc/sys" else "--ro-bind", path, path]
    cmd += [
        "--dev", "/dev",
        "--perms", "1777", "--size", str(tmp_mb * MIB), "--tmpfs", "/tmp",
        "--remount-ro", "/",
        "--chdir", "/tmp",
    ]  # fmt: skip
    for key, value in SANDBOX_ENV.items():
        cmd += ["--setenv", key, value]
    return [*cmd, *argv]


def _host_env() -> dict[str, str]:
    # bwrap itself (and an unsafe worker) starts from this, never from os.environ.
    return dict(SANDBOX_ENV, PATH="/usr/local/bin:/usr/bin:/bin")


# --- cgroups -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CgroupTree:
    """Where the factory may create one cgroup per worker, and the files each version uses."""

    version: int
    parents: tuple[Path, ...]  # v1: the memory and the pids folder; v2: one folder
    memory_limit: str
    swap_limit: str
    oom_file: str
    # v1: `tasks`, which moves one thread without the global threadgroup lock that a write to
    # cgroup.procs takes (the program's process is single-threaded when it joins, so this moves
    # all of it); v2 domain cgroups only have cgroup.procs.
    join_file: str

    def describe(self) -> str:
        where = ", ".join(str(p) for p in self.parents)
        return f"cgroup v{self.version} under {where}"


_cgroup_names = itertools.count()


def _cgroup_prefix() -> str:
    # The pid namespace's inode keeps factories in other containers (other pid numbering) apart.
    return f"evolforge-{os.stat('/proc/self/ns/pid').st_ino}-{os.getpid()}-"


class _ProgramCgroup:
    """One worker's cgroup: each program's processes join it (through `join_fds`) at start."""

    def __init__(self, tree: _CgroupTree, limits: SandboxLimits) -> None:
        self.tree = tree
        name = f"{_cgroup_prefix()}{next(_cgroup_names)}"
        self.dirs = [parent / name for parent in tree.parents]
        self.join_fds: list[int] = []
        self.counter_fds: list[tuple[int, int, re.Pattern]] = []
        limited = set()
        try:
            for folder in self.dirs:
                folder.mkdir()
                memory = str(limits.memory_mb * MIB)
                if (folder / tree.memory_limit).exists():
                    (folder / tree.memory_limit).write_text(memory)
                    limited.add("memory")
                    if (folder / tree.swap_limit).exists():
                        # v1: memory + swap at the same figure; v2: no swap at all.
                        (folder / tree.swap_limit).write_text(memory if tree.version == 1 else "0")
                if (folder / "pids.max").exists():
                    (folder / "pids.max").write_text(str(limits.max_processes))
                    limited.add("pids")
                if tree.version == 2:
                    with contextlib.suppress(OSError):
                        (folder / "memory.oom.group").write_text("1")
                self.join_fds.append(os.open(folder / tree.join_file, os.O_WRONLY | os.O_CLOEXEC))
                for index, (counter, key) in enumerate(
                    ((tree.oom_file, "oom_kill"), ("pids.events", "max"))
                ):
                    if (folder / counter).exists():
                        fd = os.open(folder / counter, os.O_RDONLY | os.O_CLOEXEC)
                        pattern = re.compile(rf"^{key} (\d+)", re.M)
                        self.counter_fds.append((index, fd, pattern))
            if limited != {"memory", "pids"}:
                raise OSError(
                    f"no {' or '.join({'memory', 'pids'} - limited)} limit in {self.dirs}"
                )
        except OSError:
            self.remove()
            raise
        self.last = self.counters()

    def counters(self) -> tuple[int, int]:
        """(OOM kills, forks refused at pids.max) so far; read after every program."""
        values = [0, 0]
        for index, fd, pattern in self.counter_fds:
            match = pattern.search(os.pread(fd, 4096, 0).decode())
            values[index] += int(match.group(1)) if match else 0
        return values[0], values[1]

    def close_fds(self) -> None:
        for fd in self.join_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.join_fds = []

    def remove(self) -> None:
        self.close_fds()
        for _, fd, _ in self.counter_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.counter_fds = []
        for folder in self.dirs:
            for _ in range(100):  # tasks leave the cgroup a moment after they are reaped
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
            else:
                log.warning("could not remove sandbox cgroup %s", folder)


def _own_cgroup_v1_dirs() -> dict[str, Path]:
    """The factory's own folder in each cgroup v1 hierarchy, by controller."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            if controller:
                own[controller] = path
    found = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3].split(",")
        if fstype != "cgroup":
            continue
        root, mountpoint = fields[3], fields[4]
        for controller in ("memory", "pids"):
            if controller in options and controller in own:
                relative = os.path.relpath(own[controller], root)
                if not relative.startswith(".."):
                    found[controller] = Path(mountpoint) / relative
    return found


def _sweep_stale(parents: tuple[Path, ...]) -> None:
    """Remove empty cgroups left by factories of this pid namespace that died."""
    namespace = os.stat("/proc/self/ns/pid").st_ino
    for parent in parents:
        for entry in parent.glob(f"evolforge-{namespace}-*-*"):
            match = re.fullmatch(rf"evolforge-{namespace}-(\d+)-\d+", entry.name)
            if match and not Path(f"/proc/{match.group(1)}").exists():
                with contextlib.suppress(OSError):
                    entry.rmdir()


@functools.cache
def _cgroups() -> tuple[_CgroupTree | None, str]:
    """The cgroup tree the factory may use for per-program limits, or None and why not.

    `$EVOLFORGE_SANDBOX_CGROUP` names a cgroup v2 folder delegated to the factory (writable, no
    processes of its own, memory and pids available), or "none". Without it, the factory's own
    folders in the cgroup v1 memory and pids hierarchies are used when it may create cgroups
    there (as root on a cgroup v1 machine).
    """
    configured = os.environ.get(CGROUP_ENV, "").strip()
    if configured.lower() == "none":
        return None, f"{CGROUP_ENV}=none"
    try:
        if configured:
            parent = Path(configured)
            available = (parent / "cgroup.controllers").read_text().split()
            missing = {"memory", "pids"} - set(available)
            if missing:
                return None, f"{parent} has no {' and '.join(sorted(missing))} controller"
            (parent / "cgroup.subtree_control").write_text("+memory +pids")
            tree = _CgroupTree(
                2, (parent,), "memory.max", "memory.swap.max", "memory.events", "cgroup.procs"
            )
        else:
            dirs = _own_cgroup_v1_dirs()
            if set(dirs) != {"memory", "pids"}:
                return (
                    None,
                    "no cgroup v1 memory and pids hierarchies (and no cgroup v2 folder given)",
                )
            tree = _CgroupTree(
                1,
                (dirs["memory"], dirs["pids"]),
                "memory.limit_in_bytes",
                "memory.memsw.limit_in_bytes",
                "memory.oom_control",
                "tasks",
            )
        _sweep_stale(tree.parents)
        _ProgramCgroup(tree, SandboxLimits()).remove()  # can it create, limit and open one?
    except OSError as exc:
        return None, f"cannot create cgroups: {exc}"
    return tree, tree.describe()


def memory_cap_mb() -> int:
    """The most memory all of one pool's programs may take together: `$EVOLFORGE_SANDBOX_
    MEMORY_CAP_MB`, by default half of the machine's RAM."""
    configured = os.environ.get(MEMORY_CAP_ENV)
    if configured:
        return int(configured)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MIB // 2


# --- the start-up check ------------------------------------------------------------------------

# Run in a probe sandbox: what the program sees of the protections.
PROBE_PROGRAM = r"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
unshare = libc.syscall(272, 0x10000000)
unshare_errno = ctypes.get_errno() if unshare < 0 else 0
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
read_only = {}
for path in PATHS:
    try:
        read_only[path] = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except FileNotFoundError:
        read_only[path] = "absent"
print(json.dumps({"uid": os.getuid(), "seccomp": status["Seccomp"].strip(),
                  "unshare_errno": unshare_errno, "read_only": read_only,
                  "cgroup": open("/proc/self/cgroup").read()}))
""".replace("PATHS", repr(PROC_READ_ONLY))


@dataclass(frozen=True)
class _Isolation:
    bwrap: str
    layout: _Layout
    uid: int
    gid: int
    cgroup: _CgroupTree | None
    cgroup_reason: str
    description: str


_probe_lock = threading.Lock()


def _host_ids(pid: int) -> tuple[set[int], set[int]]:
    """Real, effective, saved and filesystem uids and gids of a host process."""
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
    gids = re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()
    return {int(u) for u in uids}, {int(g) for g in gids}


def _check_probe(worker: _Worker, answer: dict, cgroup: _ProgramCgroup | None) -> str | None:
    """Which protection the probe sandbox lacks, or None."""
    if answer.get("exit_code") != 0:
        tail = (answer.get("stderr_tail") or answer.get("error") or "no output").strip()
        return f"the probe program failed in the sandbox: {tail.splitlines()[-1]}"
    seen = json.loads(answer["stdout"])
    if seen["seccomp"] != "2" or seen["unshare_errno"] != 1 or "unshare" not in answer["denied"]:
        return "seccomp filter not in force in the sandbox (unshare was not refused with EPERM)"
    writable = [path for path, ro in seen["read_only"].items() if ro is False]
    if writable:
        return f"{', '.join(writable)} not read-only in the sandbox"
    if seen["uid"] != SANDBOX_UID:
        return f"the program has uid {seen['uid']} in the sandbox, not {SANDBOX_UID}"
    if cgroup is not None:
        names = {folder.name for folder in cgroup.dirs}
        joined = {n for n in names if re.search(rf"/{re.escape(n)}$", seen["cgroup"], re.M)}
        if joined != names:
            return "programs did not join their cgroup"
    return None


def _probe_isolation() -> tuple[_Isolation | None, str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, "bubblewrap (bwrap) is not installed"
    try:
        uid, gid = sandbox_ids()
    except ValueError as exc:
        return None, f"cannot drop to a non-root uid: {exc}"
    if uid == 0:
        return (
            None,
            "cannot drop to a non-root uid: the factory runs as uid 0 without a sandbox uid",
        )
    unsupported = seccomp_unsupported()
    if unsupported:
        return None, f"seccomp filter unavailable: {unsupported}"
    blocked = sandbox_runtime.blocked_for(bwrap, uid, gid)
    if blocked:
        return None, f"the sandbox user (uid {uid}) cannot reach {bwrap}: {blocked}"
    layout, why = _layout(uid, gid)
    if layout is None:
        return None, why
    tree, cgroup_reason = _cgroups()
    isolation = _Isolation(bwrap, layout, uid, gid, tree, cgroup_reason, "")
    limits = SandboxLimits(wall_s=20, cpu_s=10)
    cgroup = None
    worker = None
    try:
        if tree is not None:
            cgroup = _ProgramCgroup(tree, limits)
        worker = _Worker(limits, isolation, cgroup=cgroup, preload=[], capture_stderr=True)
        try:
            worker.wait_ready()
            host_uids, host_gids = _host_ids(worker.proc.pid)
            answer = worker.execute(PROBE_PROGRAM, "", limits)
        except _WorkerLost as exc:
            worker.kill()
            detail = (worker.stderr_text().strip().splitlines() or [str(exc)])[-1]
            return (
                None,
                f"bwrap cannot create the sandbox (exit {worker.proc.returncode}): {detail}",
            )
        if 0 in host_uids or 0 in host_gids:
            return None, f"cannot drop to a non-root uid: the sandbox runs as host uids {host_uids}"
        problem = _check_probe(worker, answer, cgroup)
        if problem and cgroup is not None and problem.startswith("programs did not join"):
            # The bound falls back to rlimits; isolation itself is fine.
            isolation = _Isolation(bwrap, layout, uid, gid, None, problem, "")
            problem = None
        if problem:
            return None, problem
    except OSError as exc:
        return None, f"bwrap probe failed: {exc}"
    finally:
        if worker is not None:
            worker.kill()
            worker.stderr_file.close()
        if cgroup is not None:
            cgroup.remove()
    version = subprocess.run(
        [bwrap, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    description = (
        f"{version or 'bwrap'}: host uid {uid}/gid {gid}, seccomp filter "
        f"({len(DENIED_SYSCALLS)} syscalls + namespace clone + personality), read-only "
        f"/proc/sys, {layout.description}"
    )
    isolation = _Isolation(
        bwrap, layout, uid, gid, isolation.cgroup, isolation.cgroup_reason, description
    )
    return isolation, description


class _ProbeResult(tuple):
    """(available, reason), carrying what the probe found for the pools to use."""

    isolation: _Isolation | None


@functools.cache
def _probe() -> _ProbeResult:
    isolation, reason = _probe_isolation()
    result = _ProbeResult((isolation is not None, reason))
    result.isolation = isolation
    return result


def isolation_available() -> tuple[bool, str]:
    """Whether the sandbox can be built here with every protection (probed once per process),
    and which protection is missing if not."""
    with _probe_lock:
        return _probe()


def _current_isolation() -> _Isolation | None:
    with _probe_lock:
        return _probe().isolation


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

    def __init__(
        self,
        limits: SandboxLimits,
        isolation: _Isolation | None,
        cgroup: _ProgramCgroup | None = None,
        preload: list[str] | None = None,
        capture_stderr: bool = False,
    ) -> None:
        self.sandboxed = isolation is not None
        self.cgroup = cgroup
        self.host_tmp: str | None = None
        config: dict = {"sandboxed": self.sandboxed, "seccomp": True}
        if preload is not None:
            config["preload"] = preload
        popen_args: dict = {}
        if isolation is not None:
            config.update(tmp_root="/tmp", site_dir=SITE_DIR)
            if cgroup is not None:
                config["cgroup_fds"] = cgroup.join_fds
                popen_args["pass_fds"] = cgroup.join_fds
            argv = [isolation.layout.python, "-I", "-B", "-c", WORKER_SOURCE, json.dumps(config)]
            tmp_mb = max(64, 4 * limits.file_size_mb)
            cmd, cwd = _bwrap_command(isolation.bwrap, isolation.layout, argv, tmp_mb), "/"
            if os.geteuid() == 0:
                # bwrap itself runs as the unprivileged user, so its user namespace maps the
                # program's uid to that user and never to root.
                popen_args.update(user=isolation.uid, group=isolation.gid, extra_groups=[])
        else:
            self.host_tmp = tempfile.mkdtemp(prefix="evolforge-sandbox-")
            config["tmp_root"] = self.host_tmp
            cmd = [sys.executable, "-I", "-B", "-c", WORKER_SOURCE, json.dumps(config)]
            cwd = self.host_tmp
        # Only the start-up probe keeps bwrap's messages (and closes the file).
        self.stderr_file = tempfile.TemporaryFile() if capture_stderr else None  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.stderr_file or subprocess.DEVNULL,
                env=_host_env(),
                cwd=cwd,
                start_new_session=True,
                **popen_args,
            )
        except BaseException:
            if self.host_tmp:
                shutil.rmtree(self.host_tmp, ignore_errors=True)
            if self.stderr_file is not None:
                self.stderr_file.close()
            raise
        finally:
            if cgroup is not None:
                cgroup.close_fds()  # the worker holds them now
        self.ready = False
        self.preloaded: list[str] = []
        self.seccomp = False

    def stderr_text(self) -> str:
        if self.stderr_file is None:
            return ""
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode("utf-8", errors="replace")

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
            if not hello.get("ready"):
                raise _WorkerLost(f"sandbox worker refused to start: {hello.get('error')}")
            if self.sandboxed and not hello.get("seccomp"):
                raise _WorkerLost("sandbox worker started without its seccomp filter")
            self.preloaded = hello.get("preloaded", [])
            self.seccomp = bool(hello.get("seccomp"))
            self.seccomp_error = hello.get("seccomp_error")
            self.ready = True

    def execute(self, code: str, stdin: str, limits: SandboxLimits) -> dict:
        self.wait_ready()
        self._send({"code": code, "stdin": stdin, "limits": limits.model_dump()})
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
        if self.cgroup is not None:
            self.cgroup.remove()


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
        isolation = _current_isolation() if available else None
        if isolation is None:
            if not allow_unsafe:
                raise SandboxUnavailableError(
                    f"refusing to run model-written code: {reason}. Fix that (README, "
                    '"Program sandbox"), or pass allow_unsafe=True to run it in a plain '
                    "subprocess with only rlimits."
                )
            log.warning(
                "sandbox isolation unavailable (%s); running programs UNSAFELY in plain "
                "subprocesses with only rlimits, timeouts, a seccomp filter where the "
                "architecture allows it and a scrubbed environment",
                reason,
            )
            self.bound = "rlimits per process (unsafe mode)"
        else:
            self.bound = self._check_bound(limits, workers, isolation)
        self.limits = limits
        self.isolation = isolation
        self.sandboxed = isolation is not None
        self.size = workers
        self.recycled = 0
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        try:
            for _ in range(workers):
                self._idle.put(self._start_worker())
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _check_bound(limits: SandboxLimits, workers: int, isolation: _Isolation) -> str:
        """Which bound holds a program's memory and processes; refuse one above the cap."""
        if isolation.cgroup is not None:
            per_program = limits.memory_mb
            bound = (
                f"{isolation.cgroup.describe()}: each program at most {limits.memory_mb} MiB "
                f"and {limits.max_processes} processes in total"
            )
        else:
            per_program = limits.max_processes * limits.memory_mb
            bound = (
                f"rlimits ({isolation.cgroup_reason}): RLIMIT_NPROC counted per sandbox, so each "
                f"program at most {limits.max_processes} processes of {limits.memory_mb} MiB "
                f"address space = {per_program} MiB"
            )
        cap = memory_cap_mb()
        if per_program * workers > cap:
            raise SandboxUnavailableError(
                f"refusing to start: {workers} workers x {per_program} MiB per program "
                f"({'memory_mb' if isolation.cgroup else 'max_processes x memory_mb'}) exceeds "
                f"the cap of {cap} MiB (${MEMORY_CAP_ENV}, default half the RAM); lower the "
                "limits or the workers"
            )
        _log_once(
            logging.INFO,
            f"sandbox: {isolation.description}; resource bound: {bound}; "
            f"{workers} workers x {per_program} MiB <= cap {cap} MiB",
        )
        return bound

    def _start_worker(self) -> _Worker:
        cgroup = None
        if self.isolation is not None and self.isolation.cgroup is not None:
            cgroup = _ProgramCgroup(self.isolation.cgroup, self.limits)
        try:
            worker = _Worker(self.limits, self.isolation, cgroup=cgroup)
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            raise
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
        oom_kills = pid_limit_hits = 0
        if worker.cgroup is not None:
            before = worker.cgroup.last
            worker.cgroup.last = worker.cgroup.counters()
            oom_kills = worker.cgroup.last[0] - before[0]
            pid_limit_hits = worker.cgroup.last[1] - before[1]
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
        killed_by = answer["killed_by_limit"]
        exit_code = answer["exit_code"]
        if oom_kills and exit_code == -signal.SIGKILL and killed_by is None:
            killed_by = "memory"  # the cgroup's OOM killer ended it
        elif pid_limit_hits and exit_code not in (0, None) and killed_by is None:
            killed_by = "processes"
        return SandboxResult(
            stdout=answer["stdout"],
            stderr_tail=answer["stderr_tail"],
            exit_code=exit_code,
            timed_out=answer["timed_out"],
            killed_by_limit=killed_by,
            wall_s=answer["wall_s"],
            error="the program left the sandbox unclean; sandbox recycled"
            if answer.get("recycle")
            else None,
            denied=answer.get("denied", []),
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
