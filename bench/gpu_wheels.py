"""The wheels the device check carries to a lent machine (`bench/gpu_wheels.txt`), in parts that
each fit one run's carry. Standard library only: it runs on the device before anything is
installed.

    python bench/gpu_wheels.py download [--python 3.12]   # here (`make gpu-wheels`)
    python bench/gpu_wheels.py missing                     # which listed packages are absent
    python bench/gpu_wheels.py install                     # on the device: the absent ones

`download` fetches the pinned wheels with `pip download --no-deps` for CPython `--python` on
x86-64 manylinux into `.gpu-check/wheels/` (ignored by git) and splits them into
`part1`, `part2`, ... of at most `--part-mib` MiB each: a run carries at most 64 MiB with the tree,
and pyarrow, polars' runtime and duckdb are 25-55 MB each, so the whole set (about 146 MB for
3.12) cannot travel in one run. `install` installs, with `pip install --no-index --no-deps
--target .gpu-check/site-packages`, every wheel present under `.gpu-check/wheels/*/` whose
package the image (or an earlier install) does not already have; the image's own packages are
never replaced.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "bench" / "gpu_wheels.txt"
WHEELS = ROOT / ".gpu-check" / "wheels"
# "site-packages" in the name is load-bearing: dill (datasets' fingerprints) pickles a module by
# reference only when its file is under the interpreter's prefix or a `site-packages` folder; from
# any other folder it pickles pyarrow by value and fails (PicklingError on MonthDayNano).
SITE = ROOT / ".gpu-check" / "site-packages"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_12_x86_64",
    "manylinux2010_x86_64",
)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(path: Path = LIST) -> dict[str, str]:
    """{normalized name: version} of the list's `name==version` lines."""
    out: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, ver = line.partition("==")
        if not sep or not name.strip() or not ver.strip():
            raise ValueError(f"{path.name}: not a name==version line: {raw!r}")
        out[normalize(name.strip())] = ver.strip()
    return out


def wheel_name(path: Path) -> str:
    """The normalized distribution name of a wheel file."""
    return normalize(path.name.split("-", 1)[0])


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def split_parts(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """First-fit decreasing: the files in as few parts of at most `limit` bytes as it finds."""
    parts: list[list[str]] = []
    room: list[int] = []
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        if size > limit:
            raise ValueError(f"{name} is {size / 2**20:.1f} MiB, over a part's {limit / 2**20} MiB")
        for i, free in enumerate(room):
            if size <= free:
                parts[i].append(name)
                room[i] -= size
                break
        else:
            parts.append([name])
            room.append(limit - size)
    return parts


def download(python: str, dest: Path, part_mib: float) -> int:
    wanted = pinned()
    staging = dest / "all"
    staging.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", python, "--implementation", "cp", *platforms,
        "--dest", str(staging), *(f"{n}=={v}" for n, v in wanted.items()),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    files = {p.name: p for p in staging.glob("*.whl") if wheel_name(p) in wanted}
    got = {wheel_name(p) for p in files.values()}
    if got != set(wanted):
        raise SystemExit(f"missing wheels: {sorted(set(wanted) - got)}")
    for old in dest.glob("part*"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    parts = split_parts({n: p.stat().st_size for n, p in files.items()}, int(part_mib * 2**20))
    total = 0
    for i, names in enumerate(parts, 1):
        folder = dest / f"part{i}"
        folder.mkdir()
        size = 0
        for name in names:
            files[name].rename(folder / name)
            size += (folder / name).stat().st_size
        total += size
        rel = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
        packages = ", ".join(sorted(wheel_name(Path(n)) for n in names))
        print(f"{rel}: {size / 2**20:.1f} MiB  ({packages})")
    for f in staging.iterdir():
        f.unlink()
    staging.rmdir()
    print(
        f"{len(files)} wheels for CPython {python}, {total / 2**20:.1f} MiB in {len(parts)} parts"
    )
    print("carry one part per run (bench/gpu_check.sh install), the last with the check itself")
    return 0


def missing(names: dict[str, str]) -> list[str]:
    return [n for n in names if installed(n) is None]


def install(wheels: Path, target: Path, quiet: bool) -> int:
    wanted = pinned()
    absent = set(missing(wanted))
    files = sorted(p for p in wheels.glob("*/*.whl") if wheel_name(p) in absent)
    if files:
        target.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
            "--disable-pip-version-check", "--target", str(target), *map(str, files),
        ]  # fmt: skip
        if quiet:
            cmd.append("-q")
        subprocess.run(cmd, check=True)
    done = [wheel_name(f) for f in files]
    print(f"installed: {' '.join(done) or 'nothing'} (Python {sys.version.split()[0]})")
    still = [n for n in absent if n not in done]
    if still:
        print(f"still absent (their part not carried yet): {' '.join(sorted(still))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch the wheels here, split into parts")
    d.add_argument("--python", default="3.12", help="the device's CPython version (3.11, 3.12)")
    d.add_argument("--dest", type=Path, default=WHEELS)
    d.add_argument("--part-mib", type=float, default=56.0, help="largest part in MiB")
    sub.add_parser("missing", help="the listed packages this Python lacks")
    i = sub.add_parser("install", help="install the carried wheels of absent packages")
    i.add_argument("--wheels", type=Path, default=WHEELS)
    i.add_argument("--target", type=Path, default=SITE)
    i.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "download":
        if not re.fullmatch(r"3\.\d+", args.python):
            parser.error(f"--python {args.python!r}: want MAJOR.MINOR, e.g. 3.12")
        return download(args.python, args.dest, args.part_mib)
    if args.command == "missing":
        print(" ".join(missing(pinned())) or "nothing missing")
        return 0
    return install(args.wheels, args.target, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
