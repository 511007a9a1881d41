"""Shard throughput on a local Ray cluster: the same sharded stage on 1 node, then on 2 nodes.

    .venv/bin/python bench/cluster_throughput.py [--shards 16] [--delay 2.0] [--cpus 1]

Each measurement starts a cluster with `flows.cluster.up` (a head alone, then a head + one
worker node, `--cpus` CPUs each, and a Prefect server), runs one sharded stage in a Prefect
flow with `executor: {kind: ray}` on a fresh data home, and stops the cluster by its pids. Each
shard asks an OpenAI-compatible scripted server on loopback (tests/scripted_server.py) one
question, which it answers after sleeping `--delay` seconds: the engine is the bottleneck, as on
a real cluster, so the ratio shows how well shards spread over nodes (target: >= 1.7x at 2
nodes). The figures include Ray's and Prefect's overheads per task run (a task run's state
changes go to the Prefect server). Starting each node's worker process (imports) is left out:
a warm-up of two shards per node, in the same run, goes first and is timed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402

from infra.engines import ChatRequest, EngineConfig, SamplingParams  # noqa: E402
from infra.engines.cpu import read_cpu_info  # noqa: E402
from tasks.records import Record  # noqa: E402
from tasks.stage import Shard, StageContext, StageOutput, stage  # noqa: E402


class Answer(Record):
    """One prompt and the sleeping engine's answer."""

    id: pl.String
    answer: pl.String


@stage(outputs={"answers": Answer}, shard=Shard("prompts", rows=1))
def answer_prompts(ctx: StageContext, prompts: pl.DataFrame, engine: EngineConfig) -> StageOutput:
    llm = ctx.engine(engine)
    requests = [
        ChatRequest(({"role": "user", "content": text},), SamplingParams(max_tokens=8))
        for text in prompts["text"]
    ]
    answers = [response.text for response in llm.generate(requests)]
    rows = [{"id": i, "answer": a} for i, a in zip(prompts["id"], answers, strict=True)]
    return StageOutput({"answers": Answer.frame(rows)})


def measure(address: str, base_url: str, shards: int, nodes: int) -> dict[str, float]:
    """One timed run of `answer_prompts` over `shards` shards (in the cluster's environment),
    after a warm-up of two shards per node that starts each node's worker process."""
    from prefect import flow

    from storage.datasets import DatasetStore
    from storage.settings import home
    from tasks.executors import ExecutorSettings, executor_scope

    def prompts(name: str, count: int) -> object:
        ids = [f"{name}{i:03d}" for i in range(count)]
        frame = pl.DataFrame({"id": ids, "text": ids})
        store = DatasetStore(home())
        return store.write("prompts", frame, stage="bench", code_version=name, params={}).ref

    warm, timed = prompts("w", 2 * nodes), prompts("q", shards)
    engine = EngineConfig(kind="openai", model="scripted", base_url=base_url, max_concurrency=1)

    @flow(name="cluster_throughput")
    def run() -> tuple[float, float]:
        with executor_scope(ExecutorSettings(kind="ray", address=address)):
            started = time.monotonic()
            answer_prompts(prompts=warm, engine=engine)
            warmed = time.monotonic()
            result = answer_prompts(prompts=timed, engine=engine)
            assert result.stats["shards"]["new"] == shards, result.stats
            return warmed - started, time.monotonic() - warmed

    warmup, seconds = run()
    return {
        "warmup_s": round(warmup, 2),
        "seconds": round(seconds, 2),
        "shards_per_s": round(shards / seconds, 3),
    }


def measure_main() -> None:
    """`python -c "from bench.cluster_throughput import measure_main; measure_main()" ...`"""
    address, base_url = sys.argv[1], sys.argv[2]
    print(json.dumps(measure(address, base_url, int(sys.argv[3]), int(sys.argv[4]))))


def one(nodes: int, args: argparse.Namespace, base_url: str, root: Path) -> dict[str, float]:
    from flows import cluster

    state = cluster.up(root / f"cluster-{nodes}", workers=nodes - 1, cpus=args.cpus)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
        env.update(
            state.exports,
            EVOLFORGE_HOME=str(root / f"home-{nodes}"),
            OPENAI_API_KEY="bench",
            PYTHONPATH=str(ROOT),
        )
        code = "from bench.cluster_throughput import measure_main; measure_main()"
        argv = [sys.executable, "-c", code, state.ray_address, base_url]
        argv += [str(args.shards), str(nodes)]
        done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the run on {nodes} node(s) failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        cluster.down(state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--delay", type=float, default=2.0, help="engine seconds per request")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs of each node")
    args = parser.parse_args()
    from tests.scripted_server import ScriptedServer

    print(f"CPU: {read_cpu_info().model} ({os.cpu_count()} cores)  date: {time.strftime('%F')}")
    print(f"{args.shards} shards, one request each, {args.delay} s per request, {args.cpus} CPU(s)")
    with tempfile.TemporaryDirectory(prefix="efbench-") as tmp, ScriptedServer(args.delay) as srv:
        results = {nodes: one(nodes, args, srv.base_url, Path(tmp)) for nodes in (1, 2)}
    for nodes, figures in results.items():
        print(
            f"{nodes} node(s): {figures['seconds']:7.2f} s  {figures['shards_per_s']:.3f} shards/s"
            f"  (before it, {2 * nodes} warm-up shards: {figures['warmup_s']:.2f} s)"
        )
    print(f"speedup at 2 nodes: {results[1]['seconds'] / results[2]['seconds']:.2f}x (target 1.7x)")


if __name__ == "__main__":
    main()
