"""Throughput of the embedded engine: raw, through the request cache, against `model.generate`.

Runs the first N GSM8K test questions with "Let's think step by step." (greedy, max 256 new
tokens) and prints:

- raw: output tokens/s of `EmbeddedEngine.generate` on its own, and the peak RSS after it (the
  engine's own: nothing heavier ran before);
- generate: output tokens/s of plain transformers `model.generate` on the same requests (same
  model, dtype and threads; one left-padded batch per --batch-size), the yardstick for a machine
  whose load changes from run to run;
- layer cold: the same requests through `open_engine` (cache lookups, chunking, appends) with an
  empty cache, and the ratio layer/raw (the layer should cost under 5%);
- layer warm: the rerun, answered entirely from the cache (seconds);
- long prompts: --long-n questions in the few-shot CoT template (`cot_fewshot`, ~600 prompt
  tokens), with the shared few-shot prefix computed once per batch and, for comparison, with
  prefix sharing turned off.

Each figure is printed with the 1-minute load average at its start: the machine is shared.

    .venv/bin/python bench/engine_throughput.py [--n 64] [--max-tokens 256] [--batch-size 64]
        [--dtype auto] [--threads N] [--long-n 16] [--skip-generate] [--raw-only]

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

from storage.settings import home, shared_data_dir


def _load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tokens(responses) -> int:
    return sum(c.completion_tokens for r in responses for c in r.completions)


def _plain_generate(engine, requests, batch_size: int, max_tokens: int) -> tuple[int, float]:
    """Output tokens and seconds of transformers' own greedy `generate`, batch by batch."""
    import torch

    tokenizer, model = engine.tokenizer, engine.model
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = engine.pad_id
    texts = [
        tokenizer.apply_chat_template(list(r.messages), add_generation_prompt=True, tokenize=False)
        for r in requests
    ]
    produced = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True
            ).to(model.device)
            out = model.generate(
                **batch,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=engine.pad_id,
                eos_token_id=sorted(engine.eos_ids),
            )
            new = out[:, batch["input_ids"].shape[1] :]
            for row in new.tolist():
                # Count up to and including the first EOS, as the engine does.
                ends = [i for i, t in enumerate(row) if t in engine.eos_ids]
                produced += ends[0] + 1 if ends else len(row)
    return produced, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--long-n", type=int, default=16, help="few-shot requests (0: skip)")
    parser.add_argument("--skip-generate", action="store_true", help="no model.generate baseline")
    parser.add_argument("--raw-only", action="store_true")
    args = parser.parse_args()

    # Models stay in the usual home (converted once); the cache goes to a throwaway home.
    os.environ.setdefault("EVOLFORGE_MODELS", str(home() / "models"))
    os.environ["EVOLFORGE_HOME"] = tempfile.mkdtemp(prefix="evolforge-bench-")

    import infra.engines.embedded as embedded
    from infra.engines import EngineConfig, build_engine, open_engine
    from infra.engines.base import ChatRequest, SamplingParams
    from tasks.templates import render_messages

    path = shared_data_dir() / "gsm8k" / "test.jsonl"
    questions = [json.loads(line)["question"] for line in path.open()]
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    requests = [
        ChatRequest(({"role": "user", "content": f"{q}\nLet's think step by step."},), sampling)
        for q in questions[: args.n]
    ]
    config = EngineConfig(
        kind="embedded", batch_size=args.batch_size, dtype=args.dtype, num_threads=args.threads
    )
    t0 = time.perf_counter()
    engine = build_engine(config)
    print(
        f"model: {engine.identity}  dtype: {engine.dtype}  threads: {engine.num_threads}  "
        f"load: {time.perf_counter() - t0:.1f}s  ({_load()})"
    )
    print(f"requests: {len(requests)}  max_tokens: {args.max_tokens}  batch: {args.batch_size}")
    engine.generate(requests[:2])  # warm up kernels outside the timed runs

    load = _load()
    t0 = time.perf_counter()
    raw = engine.generate(requests)
    raw_s = time.perf_counter() - t0
    raw_tps = _tokens(raw) / raw_s
    print(
        f"raw:         {_tokens(raw)} output tokens in {raw_s:.1f}s = {raw_tps:.1f} tok/s  ({load})"
    )
    print(f"peak RSS:    {_rss_mib():.0f} MiB (after raw, batch {args.batch_size})")
    if not args.skip_generate:
        load = _load()
        tokens, seconds = _plain_generate(engine, requests, args.batch_size, args.max_tokens)
        print(
            f"generate:    {tokens} output tokens in {seconds:.1f}s = "
            f"{tokens / seconds:.1f} tok/s  ({load})"
        )

    if args.raw_only:
        return

    cached = open_engine(config, stage="bench")
    load = _load()
    t0 = time.perf_counter()
    cold = cached.generate(requests)
    cold_s = time.perf_counter() - t0
    cold_tps = _tokens(cold) / cold_s
    print(
        f"layer cold:  {_tokens(cold)} output tokens in {cold_s:.1f}s = {cold_tps:.1f} tok/s, "
        f"ratio layer/raw {cold_tps / raw_tps:.3f}  ({load})"
    )
    same = sum(a.text == b.text for a, b in zip(raw, cold, strict=True))
    print(f"             {same}/{len(raw)} texts identical to raw")
    t0 = time.perf_counter()
    warm = open_engine(config, stage="bench-warm").generate(requests)
    warm_s = time.perf_counter() - t0
    if not all(r.cached for r in warm):
        raise SystemExit("warm rerun was not answered entirely from the cache")
    print(f"layer warm:  {len(warm)} requests in {warm_s:.3f}s, all from the cache")

    if args.long_n:
        long_requests = [
            ChatRequest(tuple(render_messages("cot_fewshot", instruction=q)), sampling)
            for q in questions[args.n : args.n + args.long_n]
        ]
        prompt_tokens = [len(engine._encode(r)[0]) for r in long_requests]
        shared = engine._encode(long_requests[0])[1]
        print(
            f"long:        {len(long_requests)} few-shot prompts, "
            f"{min(prompt_tokens)}-{max(prompt_tokens)} tokens, shared prefix {shared}"
        )
        for label, minimum in (("shared", embedded.MIN_SHARED_PREFIX), ("unshared", 10**9)):
            embedded.MIN_SHARED_PREFIX = minimum
            load = _load()
            t0 = time.perf_counter()
            out = engine.generate(long_requests)
            seconds = time.perf_counter() - t0
            print(
                f"long {label:8} {_tokens(out)} output tokens in {seconds:.1f}s = "
                f"{_tokens(out) / seconds:.1f} tok/s  ({load})"
            )
    print(f"peak RSS:    {_rss_mib():.0f} MiB (whole run)")


if __name__ == "__main__":
    main()
