"""Per-program bounds across all of a program's processes: one cgroup per worker, where the
machine gives the factory one (cgroup v1 as root, or a delegated cgroup v2 folder)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from infra.sandbox.limits import MIB, SandboxLimits
from infra.sandbox.logs import log

# A cgroup v2 folder delegated to the factory, or "none" to use rlimits only (see `cgroup_tree`).
CGROUP_ENV = "EVOLFORGE_SANDBOX_CGROUP"


@dataclass(frozen=True)
class CgroupTree:
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


class ProgramCgroup:
    """One worker's cgroup: each program's processes join it (through `join_fds`) at start."""

    def __init__(self, tree: CgroupTree, limits: SandboxLimits) -> None:
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
def cgroup_tree() -> tuple[CgroupTree | None, str]:
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
            tree = CgroupTree(
                2, (parent,), "memory.max", "memory.swap.max", "memory.events", "cgroup.procs"
            )
        else:
            dirs = _own_cgroup_v1_dirs()
            if set(dirs) != {"memory", "pids"}:
                return (
                    None,
                    "no cgroup v1 memory and pids hierarchies (and no cgroup v2 folder given)",
                )
            tree = CgroupTree(
                1,
                (dirs["memory"], dirs["pids"]),
                "memory.limit_in_bytes",
                "memory.memsw.limit_in_bytes",
                "memory.oom_control",
                "tasks",
            )
        _sweep_stale(tree.parents)
        ProgramCgroup(tree, SandboxLimits()).remove()  # can it create, limit and open one?
    except OSError as exc:
        return None, f"cannot create cgroups: {exc}"
    return tree, tree.describe()
