"""Run model-written Python programs (PoT rationales) in a sandbox, and nowhere else.

Every program the factory executes goes through `Sandbox.run` / `run_program`, which return a
`SandboxResult` (stdout, stderr tail, exit code, timed out, which limit killed it, wall time, the
syscalls the filter refused) instead of raising. A pool of long-lived bubblewrap sandboxes each
runs a small fork server (`infra/sandbox/worker.py`) that has the common math modules (and sympy,
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
  `worker.DENIED_SYSCALLS`): mount and the new mount API, umount2, pivot_root, chroot,
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
- filesystem: only /usr, the sandbox runtime (`infra/sandbox/runtime.py`: a copy of the base
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

The package, by concern (each module imports only those listed before it):
- `limits.py`: the limits of a program, the memory cap of a pool;
- `logs.py`: the package's logger and its log-once helper;
- `ids.py`: the host uid/gid programs run as (never root);
- `runtime.py`: the sandbox's own copy of the interpreter and packages (`make` builds it);
- `worker.py`: the fork server that runs inside each sandbox (stdlib only; its source is what the
  sandbox runs) and its seccomp filter;
- `cgroups.py`: one cgroup per worker where the machine gives the factory one;
- `layout.py`: what bubblewrap mounts and its command line, and the isolation a probe found;
- `driver.py`: the host's side of one worker: start it, send programs, read answers;
- `probe.py`: the start-up check that every protection is in force;
- `pool.py`: `Sandbox` (the pool of warm workers), `SandboxSettings`, `run_program`.
`python -m infra.sandbox --dest FOLDER` builds the runtime (`__main__.py`; `make` runs it).
"""

from infra.sandbox.ids import SANDBOX_GID_ENV, SANDBOX_UID, SANDBOX_UID_ENV, sandbox_ids
from infra.sandbox.limits import MEMORY_CAP_ENV, SandboxLimits, memory_cap_mb
from infra.sandbox.pool import (
    Sandbox,
    SandboxResult,
    SandboxSettings,
    SandboxUnavailableError,
    run_program,
)
from infra.sandbox.probe import isolation_available
from infra.sandbox.runtime import PRELOADED_PACKAGES

__all__ = [
    "MEMORY_CAP_ENV",
    "PRELOADED_PACKAGES",
    "SANDBOX_GID_ENV",
    "SANDBOX_UID",
    "SANDBOX_UID_ENV",
    "Sandbox",
    "SandboxLimits",
    "SandboxResult",
    "SandboxSettings",
    "SandboxUnavailableError",
    "isolation_available",
    "memory_cap_mb",
    "run_program",
    "sandbox_ids",
]
