"""The start-up check: build one sandbox and look, from inside and from the host, that every
protection is in force (probed once per process); the pools use what it found."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

from infra.sandbox import runtime as sandbox_runtime
from infra.sandbox.cgroups import ProgramCgroup, cgroup_tree
from infra.sandbox.driver import Worker, WorkerLost
from infra.sandbox.ids import SANDBOX_UID, sandbox_ids
from infra.sandbox.layout import PROC_READ_ONLY, Isolation, find_layout
from infra.sandbox.limits import SandboxLimits
from infra.sandbox.worker import DENIED_SYSCALLS, seccomp_unsupported

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


_probe_lock = threading.Lock()


def _host_ids(pid: int) -> tuple[set[int], set[int]]:
    """Real, effective, saved and filesystem uids and gids of a host process."""
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
    gids = re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()
    return {int(u) for u in uids}, {int(g) for g in gids}


def _check_probe(worker: Worker, answer: dict, cgroup: ProgramCgroup | None) -> str | None:
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


def _probe_isolation() -> tuple[Isolation | None, str]:
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
    layout, why = find_layout(uid, gid)
    if layout is None:
        return None, why
    tree, cgroup_reason = cgroup_tree()
    isolation = Isolation(bwrap, layout, uid, gid, tree, cgroup_reason, "")
    limits = SandboxLimits(wall_s=20, cpu_s=10)
    cgroup = None
    worker = None
    try:
        if tree is not None:
            cgroup = ProgramCgroup(tree, limits)
        worker = Worker(limits, isolation, cgroup=cgroup, preload=[], capture_stderr=True)
        try:
            worker.wait_ready()
            host_uids, host_gids = _host_ids(worker.proc.pid)
            answer = worker.execute(PROBE_PROGRAM, "", limits)
        except WorkerLost as exc:
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
            isolation = Isolation(bwrap, layout, uid, gid, None, problem, "")
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
    isolation = Isolation(
        bwrap, layout, uid, gid, isolation.cgroup, isolation.cgroup_reason, description
    )
    return isolation, description


class _ProbeResult(tuple):
    """(available, reason), carrying what the probe found for the pools to use."""

    isolation: Isolation | None


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


def current_isolation() -> Isolation | None:
    with _probe_lock:
        return _probe().isolation
