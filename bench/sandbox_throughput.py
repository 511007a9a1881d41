"""Sandboxed program executions per second for short PoT-like programs.

Measures the warm pool (`Sandbox.run_many`: forked children of long-lived bwrap fork servers)
on three kinds of program, and, for comparison, a cold one-shot `run_program` (a fresh bwrap
sandbox and interpreter per program). Target: at least 300 trivial programs/s with full
isolation on 2 cores. Besides programs/s it reports the CPU time one program costs (the sandbox
processes' and this process's), which moves much less than the rate on a machine shared with
other work.

    .venv/bin/python bench/sandbox_throughput.py --workers 2 --programs 1000

`--compare-with DIR` measures another checkout of the project (e.g. `git archive <commit>` of
the code before a change) against this one, interleaved round by round in one session, on the
trivial program only:

    mkdir /tmp/old && git archive <commit> | tar -x -C /tmp/old
    .venv/bin/python bench/sandbox_throughput.py --compare-with /tmp/old --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from infra.sandbox import Sandbox, SandboxLimits, isolation_available, run_program

PROGRAMS = {
    "trivial": "print(sum(range(10)))",
    "fractions_math": (
        "from fractions import Fraction\nimport math\n"
        "price = Fraction(3, 4) * 120 + Fraction(2, 5) * 35\n"
        "print(price, math.gcd(84, 36), round(math.sqrt(2) * 100, 2))"
    ),
    "sympy_solve": (
        "from sympy import symbols, Eq, solve\nx = symbols('x')\nprint(solve(Eq(3 * x + 7, 25), x)[0])"
    ),
}
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def sandbox_cpu_s(sandbox: Sandbox) -> float:
    """CPU seconds of the sandboxes' processes so far, programs they reaped included."""
    total = 0.0
    for worker in list(sandbox._all):
        launcher = psutil.Process(worker.proc.pid)
        for process in [launcher, *launcher.children(recursive=True)]:
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def measure(sandbox: Sandbox, code: str, count: int) -> dict:
    sandbox.run_many([code] * 20)  # first forks of a fresh worker are slower
    cpu_before, host_before = sandbox_cpu_s(sandbox), sum(os.times()[:2])
    started = time.perf_counter()
    results = sandbox.run_many([code] * count)
    elapsed = time.perf_counter() - started
    cpu = sandbox_cpu_s(sandbox) - cpu_before + sum(os.times()[:2]) - host_before
    return {
        "rate": count / elapsed,
        "cpu_ms": cpu / count * 1000,
        "median_ms": sorted(r.wall_s for r in results)[len(results) // 2] * 1000,
        "failed": sum(not r.ok for r in results),
    }


def one_round(workers: int, programs: int) -> None:
    """The trivial program once, as JSON on stdout (run in a child by --compare-with)."""
    available, reason = isolation_available()
    if not available:
        raise SystemExit(f"sandbox unavailable: {reason}")
    with Sandbox(SandboxLimits(), workers=workers) as sandbox:
        sandbox.warm_up()
        print(json.dumps(measure(sandbox, PROGRAMS["trivial"], programs)))


def compare(other: Path, rounds: int, workers: int, programs: int) -> None:
    trees = {"before": other.resolve(), "after": PROJECT_ROOT}
    found = {name: [] for name in trees}
    print(f"trivial programs, {workers} workers, {programs} per round; before = {trees['before']}")
    print(f"{'round':>5} {'tree':>6} {'programs/s':>11} {'CPU ms/program':>15} {'median ms':>10}")
    for index in range(1, rounds + 1):
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=str(tree))
            cmd = [sys.executable, __file__, "--one-round", "--workers", str(workers)]
            cmd += ["--programs", str(programs)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            figures = json.loads(out.strip().splitlines()[-1])
            found[name].append(figures)
            print(
                f"{index:>5} {name:>6} {figures['rate']:11.1f} {figures['cpu_ms']:15.2f} "
                f"{figures['median_ms']:10.2f}"
                + (f"  failed {figures['failed']}" * bool(figures["failed"]))
            )
    for name, runs in found.items():
        rates = [r["rate"] for r in runs]
        cpu = [r["cpu_ms"] for r in runs]
        print(
            f"{name:>6}: programs/s best {max(rates):.1f}, median {statistics.median(rates):.1f}; "
            f"CPU ms/program best {min(cpu):.2f}, median {statistics.median(cpu):.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--programs", type=int, default=1000, help="programs per kind")
    parser.add_argument("--cold", type=int, default=20, help="one-shot run_program calls")
    parser.add_argument(
        "--compare-with", type=Path, help="another checkout to measure, interleaved"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --compare-with")
    parser.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_round:
        return one_round(args.workers, args.programs)
    if args.compare_with:
        return compare(args.compare_with, args.rounds, args.workers, args.programs)

    available, reason = isolation_available()
    print(f"isolation: {available} ({reason})")
    if not available:
        raise SystemExit("bubblewrap sandbox unavailable; nothing to measure")

    limits = SandboxLimits()
    started = time.perf_counter()
    with Sandbox(limits, workers=args.workers) as sandbox:
        sandbox.warm_up()
        print(
            f"pool start ({args.workers} workers, imports included): "
            f"{time.perf_counter() - started:.2f} s; bound: {getattr(sandbox, 'bound', '?')}"
        )
        for kind, code in PROGRAMS.items():
            # sympy's solve itself takes ~50 ms, so fewer of those keep the run short.
            count = args.programs // 10 if kind == "sympy_solve" else args.programs
            figures = measure(sandbox, code, count)
            print(
                f"warm pool {kind:15s} {figures['rate']:8.1f} programs/s  "
                f"(CPU {figures['cpu_ms']:.2f} ms/program, median in-sandbox wall "
                f"{figures['median_ms']:.1f} ms, failed {figures['failed']})"
            )

    started = time.perf_counter()
    for _ in range(args.cold):
        result = run_program(PROGRAMS["trivial"], limits)
        assert result.ok, result
    elapsed = time.perf_counter() - started
    print(
        f"cold run_program  trivial         {args.cold / elapsed:8.1f} programs/s  "
        f"({elapsed / args.cold * 1000:.0f} ms each: new bwrap + interpreter + imports)"
    )


if __name__ == "__main__":
    main()
