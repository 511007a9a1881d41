"""Throughput of the embedded engine, raw and through the request cache.

Runs the first N GSM8K test questions with "Let's think step by step." (greedy, max 256 new
tokens) and prints:

- raw: output tokens/s of `EmbeddedEngine.generate` on its own;
- cached cold: the same requests through `open_engine` (cache lookups, chunking, appends)
  and the ratio cached/raw (the layer should cost under 5%);
- cached warm: the rerun, answered entirely from the cache (seconds, engine calls);
- peak RSS of the process.

    .venv/bin/python bench/engine_throughput.py [--n 64] [--batch-size 64] [--dtype auto]

It uses a temporary EVOLFORGE_HOME for the cache; converted models are reused from
EVOLFORGE_MODELS (default: the usual home's models folder).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from infra.settings import home, shared_data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--raw-only", action="store_true")
    args = parser.parse_args()

    # Models stay in the usual home (converted once); the cache goes to a throwaway home.
    os.environ.setdefault("EVOLFORGE_MODELS", str(home() / "models"))
    os.environ["EVOLFORGE_HOME"] = tempfile.mkdtemp(prefix="evolforge-bench-")

    from infra.engines import EngineConfig, build_engine, open_engine
    from infra.engines.base import ChatRequest, SamplingParams

    path = shared_data_dir() / "gsm8k" / "test.jsonl"
    questions = [json.loads(line)["question"] for line in path.open()][: args.n]
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    requests = [
        ChatRequest(({"role": "user", "content": f"{q}\nLet's think step by step."},), sampling)
        for q in questions
    ]
    config = EngineConfig(
        kind="embedded", batch_size=args.batch_size, dtype=args.dtype, num_threads=args.threads
    )
    t0 = time.perf_counter()
    engine = build_engine(config)
    print(f"model: {engine.identity}  dtype: {engine.dtype}  load: {time.perf_counter() - t0:.1f}s")

    engine.generate(requests[:2])  # warm up kernels outside the timed runs
    t0 = time.perf_counter()
    raw = engine.generate(requests)
    raw_s = time.perf_counter() - t0
    raw_tokens = sum(c.completion_tokens for r in raw for c in r.completions)
    raw_tps = raw_tokens / raw_s
    print(f"raw:         {raw_tokens} output tokens in {raw_s:.1f}s = {raw_tps:.1f} tok/s")
    print(f"peak RSS:    {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.raw_only:
        return

    cached = open_engine(config, stage="bench")
    t0 = time.perf_counter()
    cold = cached.generate(requests)
    cold_s = time.perf_counter() - t0
    cold_tokens = sum(c.completion_tokens for r in cold for c in r.completions)
    cold_tps = cold_tokens / cold_s
    print(
        f"cached cold: {cold_tokens} output tokens in {cold_s:.1f}s = {cold_tps:.1f} tok/s "
        f"(ratio cached/raw {cold_tps / raw_tps:.3f})"
    )
    t0 = time.perf_counter()
    warm = open_engine(config, stage="bench-warm").generate(requests)
    warm_s = time.perf_counter() - t0
    assert all(r.cached for r in warm)
    print(f"cached warm: {len(warm)} requests in {warm_s:.3f}s, all from cache")
    print(f"peak RSS:    {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"cache dir:   {Path(os.environ['EVOLFORGE_HOME']) / 'cache'}")


if __name__ == "__main__":
    main()
