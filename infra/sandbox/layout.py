"""What a sandbox is made of: the folders bubblewrap mounts (the runtime `make` built, else the
live interpreter), its command line and environment, and the isolation the probe found."""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from infra.sandbox import runtime as sandbox_runtime
from infra.sandbox.cgroups import CgroupTree
from infra.sandbox.ids import SANDBOX_UID
from infra.sandbox.limits import MIB
from infra.sandbox.logs import log_once

SITE_DIR = "/opt/evolforge/site"
# Covered read-only in the sandbox's /proc, whatever uid the program has.
PROC_READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus")
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
class Layout:
    """What the sandbox mounts to run the interpreter and the preloaded packages."""

    python: str  # interpreter path inside the sandbox
    binds: tuple[tuple[str, str], ...]  # (host source, sandbox destination), read-only
    hide: tuple[str, ...]  # folders covered with an empty tmpfs
    description: str


def find_layout(uid: int, gid: int) -> tuple[Layout | None, str]:
    """The runtime `make` built, else the live interpreter; None and why if uid cannot reach it."""
    runtime = sandbox_runtime.load()
    if runtime is not None:
        binds = [(str(runtime.site_dir), SITE_DIR)]
        if runtime.python_dir is not None:
            binds.insert(0, (str(runtime.python_dir), runtime.prefix))
        layout = Layout(runtime.python, tuple(binds), (), f"runtime {runtime.root}")
        installed = sandbox_runtime.package_versions(sandbox_runtime.installed_packages())
        stale = {k: v for k, v in installed.items() if runtime.packages.get(k) != v}
        if stale:
            log_once(
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
        layout = Layout(python, tuple(binds), tuple(hide), f"live interpreter {python}")
    for source, _ in layout.binds:
        blocked = sandbox_runtime.blocked_for(source, uid, gid)
        if blocked:
            return None, (
                f"the sandbox user (uid {uid}) cannot reach {source}: {blocked} is not searchable; "
                "build the sandbox runtime with `make sandbox-runtime` "
                f"(or set {sandbox_runtime.RUNTIME_ENV} to one it can reach)"
            )
    return layout, layout.description


def bwrap_command(bwrap: str, layout: Layout, argv: list[str], tmp_mb: int) -> list[str]:
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


def host_env() -> dict[str, str]:
    # bwrap itself (and an unsafe worker) starts from this, never from os.environ.
    return dict(SANDBOX_ENV, PATH="/usr/local/bin:/usr/bin:/bin")


@dataclass(frozen=True)
class Isolation:
    """How workers are isolated here, as the start-up probe found it."""

    bwrap: str
    layout: Layout
    uid: int
    gid: int
    cgroup: CgroupTree | None
    cgroup_reason: str
    description: str
