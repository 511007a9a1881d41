"""Seed ingestion speed: GSM8K train + MATH train (14,973 rows) into a fresh EVOLFORGE_HOME.

    .venv/bin/python bench/ingest_bench.py [--data ../shared/data]

Prints wall time of the first ingest (parse, normalise, write parquet, update the catalog), of a
rerun (no new version), and of `evolforge sql "SELECT count(*) FROM seeds"` as a fresh process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    args = parser.parse_args()
    cli = str(Path(sys.executable).with_name("evolforge"))
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "EVOLFORGE_HOME": home, "EVOLFORGE_SHARED_DATA": args.data}
        first, out = timed([cli, "ingest", "gsm8k", "math"], env)
        print(out.strip().splitlines()[1])
        rerun, out = timed([cli, "ingest", "gsm8k", "math"], env)
        assert "no new version" in out, out
        versions = len(list((Path(home) / "datasets" / "seeds").iterdir()))
        query, out = timed([cli, "sql", "SELECT count(*) FROM seeds", "--format", "csv"], env)
        print(f"ingest GSM8K+MATH train (cold, process included): {first:.2f} s  [target < 20 s]")
        print(
            f"re-ingest, no new version (seeds versions on disk: {versions}): {rerun:.2f} s  [target < 5 s]"
        )
        print(
            f"evolforge sql count(*) (process included): {query:.2f} s -> {out.strip().splitlines()[-1]} rows  [target < 2 s]"
        )


if __name__ == "__main__":
    main()
