"""The fork server that runs inside each sandbox: one fresh forked child per program.

`infra.sandbox` starts this file's source with `python -I -B -c`, inside bubblewrap (or, when
the user allowed unsafe execution, as a plain subprocess). It is stdlib only and imports
nothing from the project, because the project is not visible inside the sandbox.

Protocol, over the worker's stdin/stdout: every message is a 4-byte big-endian length followed by
that many bytes of JSON. The worker first sends {"ready": ...}; then, for each request
{"code", "stdin", "limits"}, it forks a child that becomes a session leader in a private working
folder, applies the rlimits, runs the code with `exec` and exits; the worker collects its stdout
(capped) and stderr (tail), enforces the wall-clock limit, kills everything the program left
behind, wipes the temporary files, and answers with one result. Forking from a warm interpreter
with the common math modules already imported is what makes a program cost a few milliseconds
instead of the ~25 ms of a fresh interpreter through bwrap (plus the import of sympy, if used).

If the worker cannot get back to a clean state (a process survives SIGKILL, the temporary folder
cannot be wiped), it answers with "recycle": true and exits, and the host starts a fresh sandbox.

Before anything else the worker installs a seccomp filter on itself (inherited by every program it
forks): the syscalls in `DENIED_SYSCALLS`, user-namespace and other namespace creation through
clone, and personality changes fail with EPERM; clone3 fails with ENOSYS so that libc falls back to
clone, whose flags the filter can read. The filter hands each denied call to the worker (seccomp
user notification), which answers EPERM and lists the call in the program's result ("denied").
When the host gives the worker cgroup files (`cgroup_fds`), each program's process joins that
cgroup before its code runs, so memory and process limits hold across all its processes.
"""

import contextlib
import ctypes
import errno
import fcntl
import io
import json
import os
import platform
import resource
import select
import shutil
import signal
import struct
import sys
import time
import traceback

# Modules imported once in the worker so that forked programs get them for free. Those that are
# missing are skipped; `sys.argv[1]` can override the list.
DEFAULT_PRELOAD = [
    "math",
    "cmath",
    "fractions",
    "decimal",
    "itertools",
    "functools",
    "collections",
    "statistics",
    "random",
    "re",
    "string",
    "heapq",
    "bisect",
    "operator",
    "numbers",
    "datetime",
    "json",
    "sympy",
    "numpy",
    "numpy.random",
]

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
STDERR_TAIL_BYTES = 8192
# How long the worker keeps killing and reaping a program's processes before it gives up and asks
# to be recycled; dying processes can take a while on a loaded machine. Below the host's grace.
CLEANUP_S = 3.0

# Messages of the exceptions Python raises when a resource limit is hit; the worker checks the
# stderr tail for them to say which limit stopped the program.
LIMIT_MARKERS = (
    ("MemoryError", "memory"),
    ("File too large", "file_size"),
    ("Too many open files", "open_files"),
    ("Resource temporarily unavailable", "processes"),
)

# --- seccomp ------------------------------------------------------------------------------------
# x86_64 numbers of the syscalls no program may make. Most need a capability the program does not
# have anyway; the filter is the second wall (and the only one if a uid mapping ever goes wrong).
DENIED_SYSCALLS = {
    # mounts, old and new API, and changing the root
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    # namespaces (clone's namespace flags are checked separately)
    "unshare": 272,
    "setns": 308,
    # other processes' memory and descriptors
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "pidfd_getfd": 438,
    "process_madvise": 440,
    "kcmp": 312,
    # kernel keyrings, BPF, perf, modules, kexec, power, swap, kernel log
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "bpf": 321,
    "perf_event_open": 298,
    "kexec_load": 246,
    "kexec_file_load": 320,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "reboot": 169,
    "swapon": 167,
    "swapoff": 168,
    "syslog": 103,
    # large kernel attack surfaces that no PoT program needs; io_uring also bypasses seccomp
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_by_handle_at": 304,
    "fanotify_init": 300,
    # host-wide settings
    "quotactl": 179,
    "quotactl_fd": 443,
    "acct": 163,
    "settimeofday": 164,
    "clock_settime": 227,
    "clock_adjtime": 305,
    "adjtimex": 159,
    "sethostname": 170,
    "setdomainname": 171,
    "iopl": 172,
    "ioperm": 173,
    "vhangup": 153,
    "uselib": 134,
    "_sysctl": 156,
    "lookup_dcookie": 212,
}
NR_CLONE = 56
NR_CLONE3 = 435
NR_PERSONALITY = 135
NR_SECCOMP = 317
# CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID |
# CLONE_NEWNET (CLONE_NEWTIME shares its bit with the exit signal in clone and needs clone3).
CLONE_NAMESPACE_FLAGS = 0x7E020000
PERSONALITY_QUERY = 0xFFFFFFFF
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_JSET_K = 0x45
BPF_RET_K = 0x06
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
PR_SET_NO_NEW_PRIVS = 38
# _IOWR('!', 0, struct seccomp_notif) and _IOWR('!', 1, struct seccomp_notif_resp)
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
NOTIF_SIZE = 80
MAX_DENIED_REPORTED = 32


def seccomp_filter(deny_action=SECCOMP_RET_USER_NOTIF):
    """The classic-BPF program (bytes of struct sock_filter) that the worker installs.

    Offsets into struct seccomp_data: nr at 0, arch at 4, args[0] (low 32 bits, little endian)
    at 16. Syscalls of another ABI (i386 through int 0x80, x32) are denied as a whole.
    """
    code, labels = [], {}

    def emit(op, k=0, jt=0, jf=0):
        code.append([op, jt, jf, k])

    def label(name):
        labels[name] = len(code)

    emit(BPF_LD_W_ABS, 4)
    emit(BPF_JEQ_K, AUDIT_ARCH_X86_64, 0, "deny")
    emit(BPF_LD_W_ABS, 0)
    emit(BPF_JGE_K, X32_SYSCALL_BIT, "deny", 0)
    emit(BPF_JEQ_K, NR_CLONE3, "enosys", 0)
    emit(BPF_JEQ_K, NR_CLONE, "clone", 0)
    emit(BPF_JEQ_K, NR_PERSONALITY, "personality", 0)
    for nr in sorted(set(DENIED_SYSCALLS.values())):
        emit(BPF_JEQ_K, nr, "deny", 0)
    emit(BPF_RET_K, SECCOMP_RET_ALLOW)
    label("clone")
    emit(BPF_LD_W_ABS, 16)
    emit(BPF_JSET_K, CLONE_NAMESPACE_FLAGS, "deny", "allow")
    label("personality")
    emit(BPF_LD_W_ABS, 16)
    emit(BPF_JEQ_K, PERSONALITY_QUERY, "allow", "deny")
    label("allow")
    emit(BPF_RET_K, SECCOMP_RET_ALLOW)
    label("enosys")
    emit(BPF_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS)
    label("deny")
    emit(BPF_RET_K, deny_action)
    out = bytearray()
    for index, (op, jt, jf, k) in enumerate(code):
        jt, jf = (labels[j] - index - 1 if isinstance(j, str) else j for j in (jt, jf))
        if not (0 <= jt <= 255 and 0 <= jf <= 255):
            raise ValueError("seccomp filter jump out of range")
        out += struct.pack("=HBBI", op, jt, jf, k)
    return bytes(out)


def seccomp_unsupported():
    """Why the filter cannot describe this machine's syscalls, or None."""
    if platform.machine() != "x86_64" or sys.maxsize <= 2**32:
        bits = 64 if sys.maxsize > 2**32 else 32
        return f"no syscall table for {platform.machine()} with a {bits}-bit Python (only x86_64)"
    return None


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp():
    """Install the filter on this process (and so on every process it forks); the listener fd."""
    reason = seccomp_unsupported()
    if reason:
        raise OSError(errno.ENOSYS, reason)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    program = seccomp_filter()
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    listener = libc.syscall(
        ctypes.c_long(NR_SECCOMP),
        ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(SECCOMP_FILTER_FLAG_NEW_LISTENER),
        ctypes.byref(fprog),
    )
    if listener < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SET_MODE_FILTER, NEW_LISTENER): {os.strerror(err)}")
    return listener


SYSCALL_NAMES = {nr: name for name, nr in DENIED_SYSCALLS.items()}
SYSCALL_NAMES.update({NR_CLONE: "clone", NR_PERSONALITY: "personality"})


def denied_name(nr, arch, first_arg):
    if arch != AUDIT_ARCH_X86_64:
        return f"syscall {nr} of foreign arch {arch:#x}"
    if nr & X32_SYSCALL_BIT:
        return f"x32 syscall {nr & ~X32_SYSCALL_BIT}"
    if nr == NR_CLONE:
        return f"clone({first_arg & CLONE_NAMESPACE_FLAGS:#x})"
    return SYSCALL_NAMES.get(nr, f"syscall {nr}")


def answer_denied(listener):
    """Answer one notification from the filter with EPERM; the denied call's name, or None."""
    request = bytearray(NOTIF_SIZE)
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, request, True)
    except OSError:
        return None  # the calling task died (or a signal interrupted it) before we read it
    notif_id = struct.unpack_from("=Q", request, 0)[0]
    nr, arch = struct.unpack_from("=II", request, 16)
    first_arg = struct.unpack_from("=Q", request, 32)[0]
    response = struct.pack("=QqiI", notif_id, 0, -errno.EPERM, 0)
    with contextlib.suppress(OSError):
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, response)
    return denied_name(nr, arch, first_arg)


def read_message(fd):
    header = read_exact(fd, 4)
    if header is None:
        return None
    (size,) = struct.unpack(">I", header)
    body = read_exact(fd, size)
    if body is None:
        return None
    return json.loads(body)


def read_exact(fd, size):
    chunks, got = [], 0
    while got < size:
        chunk = os.read(fd, size - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def write_message(fd, message):
    body = json.dumps(message).encode()
    data = struct.pack(">I", len(body)) + body
    while data:
        data = data[os.write(fd, data) :]


def prctl(option, value):
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def user_tasks(uid):
    """Tasks (threads included) of a real uid on this machine, as RLIMIT_NPROC counts them."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return count


def set_limits(limits, nproc):
    cpu = max(1, int(limits["cpu_s"] + 0.999))
    mb = 1024 * 1024
    wanted = [
        # SIGXCPU at the soft limit; the kernel sends SIGKILL at the hard one.
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, limits["memory_mb"] * mb, limits["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, limits["file_size_mb"] * mb, limits["file_size_mb"] * mb),
        (resource.RLIMIT_NOFILE, limits["open_files"], limits["open_files"]),
        (resource.RLIMIT_NPROC, nproc, nproc),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    for which, soft, hard in wanted:
        resource.setrlimit(which, (soft, hard))


def run_child(request, workdir, out_w, err_w, preloaded, config, nproc):
    """In the forked child: become a session leader, confine, run the code, never return."""
    try:
        # Into the program's cgroup first, so that everything below is already accounted there.
        for fd in config.get("cgroup_fds", ()):
            os.write(fd, b"0")
        os.setsid()
        # The worker is not dumpable (so programs cannot ptrace it); the program itself may be.
        prctl(PR_SET_DUMPABLE, 1)
        os.chdir(workdir)
        stdin_path = os.path.join(workdir, ".stdin")
        with open(stdin_path, "w", encoding="utf-8") as f:
            f.write(request.get("stdin", ""))
        stdin_fd = os.open(stdin_path, os.O_RDONLY)
        os.unlink(stdin_path)
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        # Nothing but the program's own stdio survives: the worker's protocol pipes are closed.
        os.closerange(3, 65536)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(
            io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace"
        )
        sys.stderr = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False),
            encoding="utf-8",
            errors="backslashreplace",
            write_through=True,
        )
        os.environ["TMPDIR"] = workdir
        os.environ["HOME"] = workdir
        # Forked children would otherwise all draw the same random numbers.
        if "random" in preloaded:
            sys.modules["random"].seed()
        if "numpy.random" in sys.modules:
            sys.modules["numpy.random"].seed(int.from_bytes(os.urandom(4), "little"))
        for name in ("tempfile",):
            module = sys.modules.get(name)
            if module is not None:
                module.tempdir = None
        set_limits(request["limits"], nproc)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = ["<program>"]
    except BaseException:
        traceback.print_exc()
        os._exit(126)
    status = 0
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(request["code"], "<program>", "exec"), namespace)
    except SystemExit as exc:
        if exc.code is None:
            status = 0
        elif isinstance(exc.code, int):
            status = exc.code & 0xFF
        else:
            print(exc.code, file=sys.stderr)
            status = 1
    except BaseException as exc:
        # Start the traceback at the program, not at this function.
        with contextlib.suppress(BaseException):
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        status = 1
    if "threading" in sys.modules:
        # As at a normal interpreter exit, wait for the program's non-daemon threads.
        with contextlib.suppress(BaseException):
            sys.modules["threading"]._shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            if status == 0:
                status = 1
    os._exit(status)


class Collector:
    """Reads one program's stdout (capped) and stderr (tail) without blocking."""

    def __init__(self, out_r, err_r, max_output):
        self.fds = {out_r: "out", err_r: "err"}
        self.out = bytearray()
        self.err = bytearray()
        self.err_total = 0
        self.max_output = max_output
        self.overflow = False
        for fd in self.fds:
            os.set_blocking(fd, False)

    def drain(self, fd):
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            os.close(fd)
            del self.fds[fd]
            return
        if self.fds[fd] == "out":
            room = self.max_output - len(self.out)
            self.out += chunk[: max(room, 0)]
            if len(chunk) > room:
                self.overflow = True
        else:
            self.err_total += len(chunk)
            self.err += chunk
            del self.err[:-STDERR_TAIL_BYTES]
            if self.err_total > self.max_output:
                self.overflow = True

    def close(self):
        for fd in list(self.fds):
            os.close(fd)
        self.fds.clear()


class Worker:
    def __init__(self, config, listener):
        self.config = config
        self.listener = listener
        self.sandboxed = config["sandboxed"]
        self.tmp_root = config["tmp_root"]
        self.counter = 0
        self.preloaded = []
        if config.get("site_dir"):
            sys.path.append(config["site_dir"])
        for name in config.get("preload", DEFAULT_PRELOAD):
            try:
                __import__(name)
                self.preloaded.append(name)
            except Exception:  # best effort: a program that needs it imports it (and fails) itself
                continue
        # Orphans of a program re-parent to the worker, so it can reap (and find) them all.
        self.subreaper = prctl(PR_SET_CHILD_SUBREAPER, 1)
        # Same-uid programs cannot ptrace the worker or read its memory through /proc.
        prctl(PR_SET_DUMPABLE, 0)

    def handle(self, request):
        limits = request["limits"]
        self.counter += 1
        workdir = os.path.join(self.tmp_root, f"run-{self.counter}")
        os.mkdir(workdir, 0o700)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        if self.sandboxed:
            # The kernel counts RLIMIT_NPROC per user namespace (Linux >= 5.14), so in the sandbox
            # the count holds bwrap's init, this worker and the program's tasks.
            nproc = limits["max_processes"] + 2
        else:
            # Unsafe mode: the count is the user's, host-wide (and not enforced for root).
            nproc = user_tasks(os.getuid()) + limits["max_processes"]
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.close(out_r)
            os.close(err_r)
            run_child(request, workdir, out_w, err_w, self.preloaded, self.config, nproc)
        os.close(out_w)
        os.close(err_w)
        pidfd = os.pidfd_open(pid)
        collector = Collector(out_r, err_r, limits["max_output_bytes"])
        deadline = started + limits["wall_s"]
        timed_out = False
        status = None
        rusage = None
        denied = []
        watched = [pidfd] if self.listener is None else [pidfd, self.listener]
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([*collector.fds, *watched], [], [], remaining)
            for fd in ready:
                if fd == pidfd:
                    _, status, rusage = os.wait4(pid, 0)
                elif fd == self.listener:
                    name = answer_denied(fd)
                    if name and name not in denied and len(denied) < MAX_DENIED_REPORTED:
                        denied.append(name)
                else:
                    collector.drain(fd)
            if collector.overflow or status is not None:
                break
        wall = time.monotonic() - started
        os.close(pidfd)
        # Whatever the program already wrote is in the pipes; take it before killing stragglers.
        if status is not None:
            for fd in list(collector.fds):
                for _ in range(64):
                    if fd not in collector.fds:
                        break
                    before = len(collector.out) + collector.err_total
                    collector.drain(fd)
                    if len(collector.out) + collector.err_total == before:
                        break
        if status is None:
            # Timed out or over the output cap: take the program's own exit status first, so the
            # reaping of stragglers below cannot swallow it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _, status, rusage = os.wait4(pid, 0)
        clean = self.kill_leftovers(pid)
        collector.close()
        clean = self.wipe(workdir) and clean
        answer = self.result(collector, status, rusage, limits, timed_out, wall, clean)
        answer["denied"] = denied
        return answer

    def result(self, collector, status, rusage, limits, timed_out, wall, clean):
        stdout = collector.out.decode("utf-8", errors="replace")
        stderr_tail = collector.err.decode("utf-8", errors="replace")
        exit_code = None if status is None else os.waitstatus_to_exitcode(status)
        killed_by = None
        if timed_out:
            killed_by = "wall"
        elif collector.overflow:
            killed_by = "output"
        elif exit_code is not None and exit_code < 0 and rusage is not None:
            cpu_used = rusage.ru_utime + rusage.ru_stime
            if -exit_code == signal.SIGXCPU or cpu_used >= int(limits["cpu_s"] + 0.999) - 0.05:
                killed_by = "cpu"
        if killed_by is None and exit_code not in (0, None):
            for marker, name in LIMIT_MARKERS:
                if marker in stderr_tail:
                    killed_by = name
                    break
        return {
            "stdout": stdout,
            "stderr_tail": stderr_tail,
            "exit_code": exit_code,
            "timed_out": timed_out,
            "killed_by_limit": killed_by,
            "wall_s": wall,
            "recycle": not clean,
        }

    def kill_leftovers(self, pid):
        """SIGKILL every process the program started; True once none is left."""
        if self.sandboxed:
            return self.kill_all_in_namespace()
        return self.kill_descendants(pid)

    def kill_all_in_namespace(self):
        # In the sandbox's PID namespace every process but the worker and bwrap's init belongs to
        # the program, and kill(-1) reaches exactly those (it spares the caller and init).
        give_up = time.monotonic() + CLEANUP_S
        while time.monotonic() < give_up:
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)
            self.reap()
            if not self.other_processes():
                return True
            time.sleep(0.002)
        return False

    def other_processes(self):
        me = os.getpid()
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in (me, 1)]

    def kill_descendants(self, pid):
        # Outside a namespace, kill(-1) would hit the user's own processes. Kill the program's
        # process group, then whatever re-parented to the worker (it is a subreaper), repeatedly.
        give_up = time.monotonic() + CLEANUP_S
        while time.monotonic() < give_up:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            children = self.children_of(os.getpid())
            for child in children:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            self.reap()
            if not self.children_of(os.getpid()):
                return True
            time.sleep(0.002)
        return False

    def children_of(self, parent):
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if int(fields[1]) == parent:
                found.append(int(entry))
        return found

    def reap(self):
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def wipe(self, workdir):
        """Remove the program's folder and, in the sandbox, anything else it wrote to /tmp."""
        targets = [workdir]
        if self.sandboxed:
            targets = [os.path.join(self.tmp_root, n) for n in os.listdir(self.tmp_root)]
            targets += [os.path.join("/dev/shm", n) for n in list_dir("/dev/shm")]
        for path in targets:
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except FileNotFoundError:
                continue  # already gone: the program removed it itself
            except OSError:
                return False
        return True


def list_dir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def main():
    config = json.loads(sys.argv[1])
    # The protocol moves to private descriptors, so nothing a program inherits by accident (or a
    # stray print in the worker) can write into it.
    proto_in = os.dup(0)
    proto_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    # The filter goes on before any import, so the preloaded libraries already run under it.
    listener, seccomp_error = None, None
    if config.get("seccomp", True):
        try:
            listener = install_seccomp()
        except OSError as exc:
            seccomp_error = exc.strerror or str(exc)
    if seccomp_error and config["sandboxed"]:
        # Fail closed: the host refuses a sandbox that has no filter.
        write_message(proto_out, {"ready": False, "error": f"seccomp: {seccomp_error}"})
        return
    worker = Worker(config, listener)
    write_message(
        proto_out,
        {
            "ready": True,
            "preloaded": worker.preloaded,
            "pid": os.getpid(),
            "seccomp": listener is not None,
            "seccomp_error": seccomp_error,
        },
    )
    while True:
        request = read_message(proto_in)
        if request is None:
            return
        try:
            answer = worker.handle(request)
        except Exception:
            answer = {"error": traceback.format_exc(limit=5), "recycle": True}
        write_message(proto_out, answer)
        if answer.get("recycle"):
            return


if __name__ == "__main__":
    main()
