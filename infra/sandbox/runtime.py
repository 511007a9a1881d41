"""The sandbox's own copy of the Python installation and of the preloaded packages.

Programs run as an unprivileged host user (see `infra.sandbox.ids`), and bubblewrap, started as that
user, can only mount what that user can reach. The venv's interpreter usually cannot be reached:
here it lives under /root/.pyenv and /root is mode 0700. `make` therefore builds a runtime folder
(by default `.venv/sandbox-runtime`, or `$EVOLFORGE_SANDBOX_RUNTIME`):

    python/   the base installation (interpreter, libpython, standard library; no site-packages,
              test suite, Tk or IDLE), mounted read-only in the sandbox at its original prefix
              (its libpython is found through an absolute RUNPATH)
    site/     sympy, mpmath, numpy (and numpy.libs) from the venv, mounted at /opt/evolforge/site
    runtime.json

Files are hard links where the filesystem allows (no extra space) and copies otherwise; folders
are mode 0755 and files world-readable. Rebuild with `make sandbox-runtime` (or
`.venv/bin/python -m infra.sandbox`) after changing the venv's numpy or sympy: the sandbox
warns when the runtime's package versions differ from the venv's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import stat
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from infra.sandbox.ids import sandbox_ids

RUNTIME_ENV = "EVOLFORGE_SANDBOX_RUNTIME"
MANIFEST = "runtime.json"
FORMAT = 1
# Packages mounted read-only into the sandbox for PoT programs (those installed in the venv).
PRELOADED_PACKAGES = ("sympy", "mpmath", "numpy")
# Parts of the standard library that PoT programs never need.
STDLIB_SKIP = {"site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip"}


@dataclass(frozen=True)
class Runtime:
    root: Path
    prefix: str  # the base installation's original prefix: where python/ is mounted
    python: str  # the interpreter, as a path inside the sandbox
    python_dir: Path | None  # None when the prefix is under /usr (the /usr mount already has it)
    site_dir: Path
    packages: dict[str, str]


def default_location() -> Path:
    configured = os.environ.get(RUNTIME_ENV)
    return Path(configured) if configured else Path(sys.prefix) / "sandbox-runtime"


def load(location: Path | None = None) -> Runtime | None:
    """The runtime at `location` (default: `default_location()`), or None if none is built."""
    root = location or default_location()
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT:
        return None
    return Runtime(
        root=root,
        prefix=manifest["prefix"],
        python=manifest["python"],
        python_dir=root / "python" if manifest["copied_interpreter"] else None,
        site_dir=root / "site",
        packages=manifest["packages"],
    )


def installed_packages() -> dict[str, Path]:
    """The preloaded packages' folders in this interpreter's environment, by name."""
    found = {}
    for name in PRELOADED_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            found[name] = Path(next(iter(spec.submodule_search_locations))).resolve()
    return found


def package_versions(names) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def blocked_for(path: str | os.PathLike, uid: int, gid: int) -> str | None:
    """The first folder on the way to `path` that uid/gid cannot search, or None.

    Only mode bits are checked (no ACLs): enough to name the folder that makes a mount fail.
    """
    current = Path("/")
    for part in Path(os.path.realpath(path)).parts[1:]:
        try:
            st = os.stat(current)
        except OSError as exc:
            return f"{current} ({exc.strerror})"
        if st.st_uid == uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid == gid:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return f"{current} (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid})"
        current = current / part
    return None


def _link_or_copy(src: str, dst: str) -> None:
    st = os.stat(src)
    if st.st_mode & stat.S_IROTH:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem, or protected_hardlinks: copy it instead
    shutil.copy2(src, dst)
    os.chmod(dst, stat.S_IMODE(st.st_mode) | 0o444)


def _copy_tree(src: Path, dst: Path, skip=frozenset()) -> None:
    def ignore(folder, names):
        if not skip or Path(folder) != src:
            return []
        return [n for n in names if n in skip or n.startswith("config-")]

    shutil.copytree(src, dst, symlinks=True, ignore=ignore, copy_function=_link_or_copy)


def _open_up(root: Path) -> None:
    for folder, _, _ in os.walk(root):
        os.chmod(folder, 0o755)


def build(location: Path | None = None) -> Runtime:
    """Build the runtime for this interpreter and venv at `location`, replacing any old one."""
    root = (location or default_location()).absolute()
    prefix = os.path.realpath(sys.base_prefix)
    executable = os.path.realpath(sys.executable)
    if not executable.startswith(prefix + os.sep):
        raise RuntimeError(f"the interpreter {executable} is not inside its prefix {prefix}")
    packages = installed_packages()
    staging = root.with_name(f"{root.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    copied = not (prefix == "/usr" or prefix.startswith("/usr/"))
    if copied:
        python = staging / "python"
        (python / "bin").mkdir(parents=True)
        _link_or_copy(executable, str(python / "bin" / os.path.basename(executable)))
        libdir = Path(sysconfig.get_config_var("LIBDIR") or Path(prefix) / "lib")
        (python / "lib").mkdir()
        for lib in sorted(libdir.glob("libpython*.so*")) if libdir.is_dir() else []:
            target = python / "lib" / lib.name
            if lib.is_symlink():
                os.symlink(os.readlink(lib), target)
            else:
                _link_or_copy(str(lib), str(target))
        stdlib = Path(sysconfig.get_paths(vars={"base": prefix, "platbase": prefix})["stdlib"])
        _copy_tree(stdlib, python / "lib" / stdlib.name, skip=STDLIB_SKIP)
    site = staging / "site"
    site.mkdir()
    for name, folder in packages.items():
        _copy_tree(folder, site / name)
        libs = folder.with_name(f"{name}.libs")  # vendored shared libraries of manylinux wheels
        if libs.is_dir():
            _copy_tree(libs, site / libs.name)
    manifest = {
        "format": FORMAT,
        "prefix": prefix,
        "python": executable,
        "copied_interpreter": copied,
        "python_version": sys.version.split()[0],
        "packages": package_versions(packages),
        "built_from": sys.executable,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.chmod(staging / MANIFEST, 0o644)
    _open_up(staging)
    old = root.with_name(f"{root.name}.old-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(root, old)
    os.rename(staging, root)
    shutil.rmtree(old, ignore_errors=True)
    runtime = load(root)
    assert runtime is not None
    return runtime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the sandbox's Python runtime.")
    parser.add_argument(
        "--dest", type=Path, help=f"default: ${RUNTIME_ENV} or <venv>/sandbox-runtime"
    )
    args = parser.parse_args(argv)
    runtime = build(args.dest)
    packages = ", ".join(f"{k} {v}" for k, v in runtime.packages.items()) or "none"
    where = "copied" if runtime.python_dir else "used from /usr"
    print(f"sandbox runtime at {runtime.root}: python {runtime.prefix} ({where}); {packages}")
    if os.geteuid() == 0:
        uid, gid = sandbox_ids()
        blocked = blocked_for(runtime.root, uid, gid)
        if blocked:
            raise SystemExit(
                f"the sandbox user (uid {uid}) cannot reach {runtime.root}: {blocked} is not "
                f"searchable. Set {RUNTIME_ENV} to a folder outside private homes and rebuild."
            )
