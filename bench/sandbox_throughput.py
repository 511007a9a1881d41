"""Sandboxed program executions per second for short PoT-like programs.

Measures the warm pool (`Sandbox.run_many`: forked children of long-lived bwrap fork servers)
on three kinds of program, and, for comparison, a cold one-shot `run_program` (a fresh bwrap
sandbox and interpreter per program). Target: at least 100 programs/s with full isolation.

    .venv/bin/python bench/sandbox_throughput.py --workers 2 --programs 1000
"""

from __future__ import annotations

import argparse
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--programs", type=int, default=1000, help="programs per kind")
    parser.add_argument("--cold", type=int, default=20, help="one-shot run_program calls")
    args = parser.parse_args()

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
            f"{time.perf_counter() - started:.2f} s"
        )
        for kind, code in PROGRAMS.items():
            # sympy's solve itself takes ~50 ms, so fewer of those keep the run short.
            batch = [code] * (args.programs // 10 if kind == "sympy_solve" else args.programs)
            started = time.perf_counter()
            results = sandbox.run_many(batch)
            elapsed = time.perf_counter() - started
            failed = sum(not r.ok for r in results)
            median_ms = sorted(r.wall_s for r in results)[len(results) // 2] * 1000
            print(
                f"warm pool {kind:15s} {len(batch) / elapsed:8.1f} programs/s  "
                f"(median in-sandbox wall {median_ms:.1f} ms, failed {failed})"
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
