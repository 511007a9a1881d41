"""The demo's data flow on a local Ray cluster with the data home on S3, against the same flow
run locally: the overhead of Ray + S3 on a real workload (the embedded model, 8 seeds, 8 rounds).

    .venv/bin/python bench/cluster_demo.py [--workers 1] [--cpus 1] [--flow data]

It starts a cluster with `flows.cluster.up` (a head and `--workers` worker nodes of `--cpus`
CPUs each, a Prefect server and a moto S3 server with a bucket, all on loopback), then runs

    evolforge run --config configs/demo.yaml --flow data

twice: locally (threads, a fresh home on the local disk), then with `--set executor.kind=ray
--set executor.address=...` and `EVOLFORGE_HOME=s3://evolforge/<run>` (a fresh local folder).
Both runs use the same Prefect server and one converted model folder (`EVOLFORGE_MODELS`), so
neither pays the model's conversion; each Ray worker process loads the model once, and that is
part of the overhead measured. It prints both wall times, the ratio, whether the two runs wrote
the same versions, and the CPU model; the cluster is stopped by its pids at the end.
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

from infra.engines.cpu import read_cpu_info  # noqa: E402


def run(args: list[str], env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(
            args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    elapsed = time.perf_counter() - start
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(args[-6:])} failed (exit {code}); log {log}:\n{tail}")
    return elapsed


def versions(env: dict[str, str]) -> dict[str, str]:
    """name -> current version of every dataset in the home `env` names."""
    code = (
        "import json; from storage.datasets import DatasetStore; from storage.settings import home;"
        "s = DatasetStore(home());"
        "print(json.dumps({n: s.latest(n).version for n in s.names()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="worker nodes besides the head")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs each node offers to Ray")
    parser.add_argument("--flow", default="data", help="the demo's flow to run")
    args = parser.parse_args()
    from flows import cluster

    work = Path(tempfile.mkdtemp(prefix="cluster-demo-"))
    print(f"CPU: {read_cpu_info().model} ({os.cpu_count()} cores)  date: {time.strftime('%F')}")
    print(f"work folder: {work}")
    state = cluster.up(work / "cluster", workers=args.workers, cpus=args.cpus, s3=True)
    try:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("EVOLFORGE_", "AWS_"))}
        base.update(
            EVOLFORGE_MODELS=str(work / "models"),
            PREFECT_API_URL=state.exports["PREFECT_API_URL"],
            PYTHONPATH=str(ROOT),
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        command = [
            sys.executable, "-m", "flows.cli", "run", "--config", "configs/demo.yaml",
            "--flow", args.flow,
        ]  # fmt: skip
        # The model converted once, outside both timings.
        subprocess.run(
            [sys.executable, "-c", "from infra.models import resolve_model; resolve_model(None)"],
            env={**base, "EVOLFORGE_HOME": str(work / "warm")}, cwd=ROOT, check=True,
        )  # fmt: skip
        local_env = {**base, "EVOLFORGE_HOME": str(work / "local-home")}
        local_s = run(command, local_env, work / "local.log")
        print(f"local (threads, home on the local disk): {local_s:.1f} s")
        remote_env = {
            **base,
            **state.exports,
            "EVOLFORGE_HOME": f"s3://{cluster.S3_BUCKET}/demo",
            "EVOLFORGE_CACHE": str(work / "s3-local"),
        }
        sets = ["--set", "executor.kind=ray", "--set", f"executor.address={state.ray_address}"]
        ray_s = run(command + sets, remote_env, work / "ray-s3.log")
        nodes = args.workers + 1
        print(f"ray ({nodes} nodes x {args.cpus} CPU) + home on S3 (moto): {ray_s:.1f} s")
        print(f"ray + S3 / local: {ray_s / local_s:.2f}x the local wall time")
        same = versions(local_env) == versions(remote_env)
        print(f"same versions in both homes: {same}")
    finally:
        cluster.down(state)


if __name__ == "__main__":
    main()
