"""The vLLM engine: offline `vllm.LLM` on local GPUs for the paper-scale profile, or vLLM's CPU
build.

vLLM is an optional extra (`pip install 'evolforge[vllm]'`); importing it lazily keeps the rest
of the factory usable on machines without a GPU. Where this interpreter has no vLLM but vLLM's
own environment exists (`make vllm-venv`: `.venv-vllm` beside the checkout, or
`$EVOLFORGE_VLLM_PYTHON`), the `vllm.LLM` lives in a worker process there (`VLLMWorker`, the
other side in `infra.engines.vllm_worker`) and the same requests go to it over a pipe; with
neither, the engine fails with a message naming the extra and the environment. On a CPU (in
process or in the worker) the graph is not compiled unless `enforce_eager` is set false, and the
KV cache gets `kv_cache_gb` GiB.

Each request becomes one conversation for `LLM.chat` (the model's own chat template) with its
own `SamplingParams`. `n`, `seed` and `max_tokens` are always set explicitly: vLLM's
`max_tokens` default is 16, which would silently truncate every answer. JSON schemas use
structured outputs: `StructuredOutputsParams(json=...)` on vLLM >= 0.11, `GuidedDecodingParams`
on older releases (the field was renamed). Completions are validated with `jsonschema` anyway,
so an invalid one (e.g. truncated) comes back with `error` set and its text kept.

The engine holds the GPU only while it is the device's loaded engine (`infra.engines.lifecycle`):
`vllm.LLM` (or the worker) is built when the engine is first asked to generate, and `release()`
stops the worker by its pid, or shuts the `LLM` down and deletes it (its engine-core worker stopped, the distributed state torn down, `gc.collect()`,
`torch.cuda.empty_cache()` where CUDA is present) before an engine for another model loads on the
same GPU, and when the flow that used it ends. Every in-process vLLM engine starts at the first
visible GPU (`tensor_parallel_size` GPUs from there), so they all share one device: `vllm`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import select
import signal
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from infra.engines.base import ChatRequest, ChatResponse, Completion, schema_error
from infra.engines.lifecycle import ACCELERATORS

log = logging.getLogger("evolforge.engines")

INSTALL_HINT = "the vllm engine needs vLLM and a CUDA GPU: pip install 'evolforge[vllm]'"


def import_vllm() -> ModuleType:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return vllm


def sampling_params(request: ChatRequest, vllm: ModuleType) -> Any:
    """Map one request onto `vllm.SamplingParams`, with structured outputs for a schema."""
    s = request.sampling
    kwargs: dict[str, Any] = {
        "n": s.n,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_tokens": s.max_tokens,
        "seed": s.seed,
        "stop": list(s.stop) or None,
    }
    if request.json_schema is not None:
        params_module = getattr(vllm, "sampling_params", None)
        structured = getattr(params_module, "StructuredOutputsParams", None)
        guided = getattr(params_module, "GuidedDecodingParams", None)
        if structured is not None:
            kwargs["structured_outputs"] = structured(json=request.json_schema)
        elif guided is not None:
            kwargs["guided_decoding"] = guided(json=request.json_schema)
        else:
            raise ImportError(
                "this vLLM has neither StructuredOutputsParams nor GuidedDecodingParams"
            )
    return vllm.SamplingParams(**kwargs)


def run_requests(llm: Any, vllm: ModuleType, requests: list[ChatRequest]) -> list[Any]:
    """One `vllm.RequestOutput` per request, in order: chat requests through `LLM.chat` (the
    model's chat template), raw prompts through `LLM.generate` (the text as it is). Used in
    process and by the worker in vLLM's own environment (`infra.engines.vllm_worker`)."""
    params = [sampling_params(r, vllm) for r in requests]
    outputs: list[Any] = [None] * len(requests)
    chat = [i for i, r in enumerate(requests) if not r.raw]
    raw = [i for i, r in enumerate(requests) if r.raw]
    if chat:
        done = llm.chat(
            [list(requests[i].messages) for i in chat], [params[i] for i in chat], use_tqdm=False
        )
        for i, out in zip(chat, done, strict=True):
            outputs[i] = out
    if raw:
        done = llm.generate(
            [requests[i].prompt for i in raw], [params[i] for i in raw], use_tqdm=False
        )
        for i, out in zip(raw, done, strict=True):
            outputs[i] = out
    return outputs


def request_to_dict(request: ChatRequest) -> dict[str, Any]:
    """What the worker needs of a request (`infra.engines.vllm_worker.request_from_dict`)."""
    return {
        "messages": list(request.messages),
        "sampling": asdict(request.sampling),
        "json_schema": request.json_schema,
        "raw": request.raw,
    }


def output_from_dict(data: dict[str, Any]) -> Any:
    """A worker's output (`infra.engines.vllm_worker.output_to_dict`) shaped as the
    `vllm.RequestOutput` fields `to_response` reads."""
    return SimpleNamespace(
        prompt_token_ids=range(data["prompt_tokens"]),
        outputs=[
            SimpleNamespace(
                text=o["text"], finish_reason=o["finish_reason"], token_ids=range(o["tokens"])
            )
            for o in data["outputs"]
        ],
    )


def vllm_identity(model_identity: str, dtype: str) -> str:
    """A vLLM engine's cache identity: the weights and `+vllm-<dtype>`, so its answers never
    stand in for the embedded engine's (another implementation, other samples). The worker, the
    in-process engine and a managed server of one model and dtype share it."""
    return f"{model_identity}+vllm-{dtype}"


class VLLMEngine:
    # The device every vLLM engine occupies (see the module's docstring).
    device = "vllm"

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        batch_size: int = 256,
        seed: int = 0,
        enforce_eager: bool | None = None,
        kv_cache_gb: int = 1,
        startup_timeout_s: float = 600.0,
    ):
        from infra.models import resolve_model

        try:
            vllm: ModuleType | None = import_vllm()
            python = None
        except ImportError as exc:
            from infra.engines.vllm_process import BUILD_HINT, find_vllm_python

            vllm, python = None, find_vllm_python()
            if python is None:
                raise ImportError(f"{exc}; or {BUILD_HINT}") from exc
        resolved = resolve_model(model)
        self._vllm = vllm
        self._python = python  # the vLLM environment's interpreter when vLLM runs in a worker
        self._identity = vllm_identity(resolved.identity, dtype)
        self.batch_size = batch_size
        self.kv_cache_gb = kv_cache_gb
        self.startup_timeout_s = startup_timeout_s
        self._options: dict[str, Any] = {
            "model": resolved.path,
            "dtype": dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "seed": seed,
            "enforce_eager": enforce_eager,  # None: `llm_options` picks by device
        }
        self.llm: Any = None  # built by `load`, while this engine holds the device
        self.worker: VLLMWorker | None = None

    @property
    def in_process(self) -> bool:
        return self._python is None

    def load(self) -> None:
        """Build the `vllm.LLM` (its weights and KV cache go onto the GPU), or start the worker
        that holds it in vLLM's environment."""
        if self.in_process:
            if self.llm is None:
                import torch

                from infra.engines.vllm_cpu import llm_options

                device = "cuda" if torch.cuda.is_available() else "cpu"
                if device == "cpu":  # vLLM's CPU build in this interpreter
                    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gb)
                options = llm_options(self._options, device)
                self.llm = self._vllm.LLM(**options)  # type: ignore[union-attr]
        elif self.worker is None or not self.worker.alive:
            assert self._python is not None
            if self.worker is not None:
                self.worker.stop()
            self.worker = VLLMWorker(
                self._python, self._options, self.kv_cache_gb, self.startup_timeout_s
            )

    def release(self) -> None:
        """Shut the `vllm.LLM` down and delete it, returning its GPU memory, or stop the worker
        by its pid; `load` reopens it."""
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.stop()
        llm, self.llm = self.llm, None
        if llm is None:
            return
        _shut_down(llm)
        del llm  # the last reference: what the LLM holds goes with it at the collection below
        _destroy_distributed_state()
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def identity(self) -> str:
        return self._identity

    def generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        if not requests:
            return []
        with ACCELERATORS.using(self):
            return self._generate(requests)

    def _generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        start = time.perf_counter()
        if self.in_process:
            outputs = run_requests(self.llm, self._vllm, requests)
        else:
            self.load()  # a worker that died since the last call starts again
            assert self.worker is not None
            outputs = [output_from_dict(o) for o in self.worker.generate(requests)]
        latency = time.perf_counter() - start
        return [to_response(r, out, latency) for r, out in zip(requests, outputs, strict=True)]


class VLLMWorker:
    """A vLLM engine in a worker process of vLLM's own environment (`infra.engines.vllm_worker`),
    reached over two pipes; started by the constructor, which returns once the model is loaded."""

    def __init__(
        self, python: str, options: dict[str, Any], kv_cache_gb: int, startup_timeout_s: float
    ):
        from infra.engines.vllm_process import child_env, log_tail, start_process, worker_command

        self._lock = threading.Lock()
        self.log_path = Path(tempfile.mkstemp(prefix="evolforge-vllm-worker-", suffix=".log")[1])
        self.failed = False  # a generate call came back with an error
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        start = time.perf_counter()
        try:
            self.proc = start_process(
                worker_command(
                    python,
                    [
                        "worker",
                        "--options",
                        json.dumps(options),
                        "--fd-in",
                        str(to_child_r),
                        "--fd-out",
                        str(from_child_w),
                    ],
                ),
                self.log_path,
                child_env(kv_cache_gb),
                pass_fds=(to_child_r, from_child_w),
                death_signal=signal.SIGKILL,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._out = os.fdopen(to_child_w, "w", buffering=1)
        self._in = os.fdopen(from_child_r, "r")
        log.info("vLLM worker pid %d started (log %s)", self.proc.pid, self.log_path)
        try:
            ready = self._receive(startup_timeout_s, "starting")
        except BaseException:
            self.stop(keep_log=True)
            raise
        if "error" in ready:
            self.stop(keep_log=True)
            raise RuntimeError(
                f"vLLM worker failed to load {options['model']}: {ready['error']} "
                f"(log {self.log_path}: {log_tail(self.log_path)})"
            )
        self.device = ready.get("device", "?")
        self.startup_s = time.perf_counter() - start
        log.info(
            "vLLM worker pid %d ready on %s in %.1f s", self.proc.pid, self.device, self.startup_s
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def generate(self, requests: list[ChatRequest]) -> list[dict[str, Any]]:
        with self._lock:
            message = {"op": "generate", "requests": [request_to_dict(r) for r in requests]}
            try:
                self._out.write(json.dumps(message) + "\n")
                self._out.flush()
            except BrokenPipeError:
                pass  # the worker is gone: `_receive` says how
            reply = self._receive(None, "generating")
        if "error" in reply:
            self.failed = True  # its log, with the traceback, stays
            raise RuntimeError(
                f"vLLM worker pid {self.pid}: {reply['error']} (log {self.log_path})"
            )
        outputs = reply["outputs"]
        if len(outputs) != len(requests):
            raise RuntimeError(
                f"vLLM worker pid {self.pid} returned {len(outputs)} outputs for {len(requests)}"
            )
        return outputs

    def _receive(self, timeout_s: float | None, doing: str) -> dict[str, Any]:
        """The worker's next line, waiting at most `timeout_s` (None: as long as it lives)."""
        from infra.engines.vllm_process import log_tail

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            ready, _, _ = select.select([self._in], [], [], 1.0)
            if ready:
                line = self._in.readline()
                if line:
                    return json.loads(line)
            if ready or not self.alive:
                code = self.proc.wait(10)
                raise RuntimeError(
                    f"vLLM worker pid {self.pid} exited with code {code} while {doing} "
                    f"(log {self.log_path}: {log_tail(self.log_path)})"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"vLLM worker pid {self.pid} not ready after {timeout_s:.0f} s "
                    f"(log {self.log_path}: {log_tail(self.log_path)})"
                )

    def stop(self, keep_log: bool = False) -> None:
        """Close its input (it exits at the end of it) and end its process group by pid. The log
        of a worker stopped while healthy goes; one that failed or died keeps it (its errors
        name it)."""
        from infra.engines.vllm_process import stop_process

        healthy = self.alive and not keep_log and not self.failed
        for stream in (self._out, self._in) if hasattr(self, "_in") else ():
            with contextlib.suppress(OSError):
                stream.close()
        stop_process(self.proc)
        if healthy:
            self.log_path.unlink(missing_ok=True)
        log.info("vLLM worker pid %d stopped", self.proc.pid)


def _shut_down(llm: Any) -> None:
    """`LLM.shutdown()` where the release has it, else its V1 engine core's (which stops the
    engine-core worker process)."""
    shutdown = getattr(llm, "shutdown", None)
    if not callable(shutdown):
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        shutdown()


def _destroy_distributed_state() -> None:
    """Tear down the model-parallel groups and the distributed environment a vLLM engine set up
    in this process (in-process workers; a worker process takes its own with it)."""
    try:
        state = importlib.import_module("vllm.distributed.parallel_state")
    except ImportError:
        return
    for name in ("destroy_model_parallel", "destroy_distributed_environment"):
        destroy = getattr(state, name, None)
        if callable(destroy):
            destroy()


def to_response(request: ChatRequest, output: Any, latency_s: float) -> ChatResponse:
    """Turn a `vllm.RequestOutput` into a ChatResponse (validating JSON when asked)."""
    completions = [
        Completion(
            text=o.text,
            finish_reason="length" if o.finish_reason == "length" else "stop",
            completion_tokens=len(o.token_ids),
        )
        for o in output.outputs
    ]
    error = None
    if request.json_schema is not None:
        for k, completion in enumerate(completions):
            problem = schema_error(completion.text, request.json_schema)
            if problem is not None:
                error = f"json_schema: sample {k} invalid: {problem}"
                break
    return ChatResponse(
        completions=completions,
        prompt_tokens=len(output.prompt_token_ids or []),
        latency_s=latency_s,
        error=error,
    )
