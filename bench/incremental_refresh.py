"""Nightly incremental refresh: a run on N seeds, then on N + 10% more seeds dropped into the
inbox. Prints the engine requests each run sent (misses of the request cache) and, per stage,
how many shards were new vs reused in the second run.

    .venv/bin/python bench/incremental_refresh.py [--seeds 100] [--rounds 8]

The engine is a scripted OpenAI-compatible server on loopback (tests/scripted_server.py), so the
figures count requests, not model speed: which work is repeated is decided by the factory's
caches, whatever the engine. Each run is a real `evolforge run --config configs/nightly.yaml`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.engines.cpu import read_cpu_info  # noqa: E402
from storage.settings import shared_data_dir  # noqa: E402
from tests.scripted_server import ScriptedServer  # noqa: E402


def write_inbox(inbox: Path, questions: list[dict], name: str) -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    with (inbox / name).open("w", encoding="utf-8") as out:
        for row in questions:
            answer = row["answer"].split("####")[-1].strip()
            out.write(json.dumps({"question": row["question"], "answer": answer}) + "\n")


def run(home: Path, server: ScriptedServer, rounds: int) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "EVOLFORGE_"))}
    env.update(EVOLFORGE_HOME=str(home), OPENAI_API_KEY="bench")
    sets = {
        "engine.kind": "openai",
        "engine.model": "scripted",
        "engine.base_url": server.base_url,
        "engine.max_concurrency": 4,
        "evolution.rounds": rounds,
    }
    args = [sys.executable, "-m", "flows.cli", "run", "--flow", "data"]
    args += ["--config", "configs/nightly.yaml"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    start = time.monotonic()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return proc.stdout, time.monotonic() - start


def stage_lines(summary: str) -> list[str]:
    block = summary.split("stages (computed vs cache hits", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in block.splitlines()[1:] if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    rows = [
        json.loads(line)
        for line in (shared_data_dir() / "gsm8k" / "train.jsonl").read_text().splitlines()
    ]
    extra = max(1, args.seeds // 10)
    with tempfile.TemporaryDirectory() as tmp, ScriptedServer() as server:
        home = Path(tmp) / "home"
        write_inbox(home / "inbox", rows[: args.seeds], "night-1.jsonl")
        _, t1 = run(home, server, args.rounds)
        sent_first = server.count
        write_inbox(home / "inbox", rows[args.seeds : args.seeds + extra], "night-2.jsonl")
        second, t2 = run(home, server, args.rounds)
        sent_second = server.count - sent_first
    print(f"CPU: {read_cpu_info().model}  date: {time.strftime('%Y-%m-%d')}")
    print(f"seeds: {args.seeds} + 8 sample, then +{extra} ({extra / (args.seeds + 8):.1%} more)")
    print(f"run 1: {sent_first} engine requests sent (all misses), {t1:.0f} s")
    print(
        f"run 2: {sent_second} engine requests sent = {sent_second / sent_first:.1%} of run 1, "
        f"{t2:.0f} s"
    )
    print("run 2 per stage:")
    for line in stage_lines(second):
        print("  " + re.sub(r"\s+", " ", line))


if __name__ == "__main__":
    main()
