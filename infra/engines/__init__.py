"""Engines chosen by configuration: `EngineConfig` -> `build_engine` -> `open_engine`.

Stages never branch on the engine kind. They receive an `EngineConfig` (a field of their flow's
parameter model) and call `open_engine(config, stage).generate(requests)`, which returns the
configured engine behind the crash-safe request cache in `EVOLFORGE_HOME/cache`.

The default kind, `auto`, is resolved when a configuration is validated
(`infra/engines/choice.py`): `vllm` where vLLM is installed (in this interpreter, or its CPU
build in `.venv-vllm`) and the CPU can run it, `embedded` everywhere else. A validated
`EngineConfig` never says `auto`.

`build_engine` is memoised per process on the configuration, so the embedded model is loaded
once however many stages and tasks use it. Implementations are imported lazily: vLLM and
transformers are only imported when their kind is built.

Lifetimes differ by what an engine holds (`infra/engines/lifecycle.py`). A vLLM engine holds an
accelerator: its weights go onto the GPU when it first generates, and it is released (the `LLM`
shut down and deleted, the memory returned) before an engine for another model loads there and
when the flow that used it ends (flows run in `engine_scope()`), so one process evaluates a base,
an SFT and an RL model one after another on one GPU. Where the factory's interpreter has no vLLM
but vLLM's own environment exists (`.venv-vllm`, or `$EVOLFORGE_VLLM_PYTHON`: the CPU build pins
another transformers), the `vllm` engine holds a worker process there instead
(`infra/engines/vllm_worker.py`), and releasing it stops the worker; a `vllm_server` engine holds
a vLLM OpenAI-compatible server it started (`infra/engines/vllm_server.py`), stopped the same
way. The embedded engine keeps its model in the
memo for the life of the process, deliberately: it lives in the process's own memory, not on a
device that another engine needs to itself; the stages of a flow, and their shards, use the same
model one after another, so a release per stage or flow would reload it again and again for the
few hundred MB it holds (the packaged SmolLM2; evaluating three such models keeps three). An
OpenAI-compatible engine holds connections only.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from infra.engines.base import (
    ChatRequest,
    ChatResponse,
    Completion,
    Engine,
    SamplingParams,
    schema_error,
)
from infra.engines.cached import CachedEngine
from infra.engines.lifecycle import engine_scope, release_accelerators


class EngineConfig(BaseModel):
    """Which LLM engine to use, and its options. Unused options are ignored by other kinds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["auto", "embedded", "vllm", "vllm_server", "openai"] = Field(
        "auto",
        title="Engine",
        description="auto (vllm where it is installed and the CPU runs it, else embedded; "
        "resolved when the run starts), embedded (CPU, transformers), vllm (offline vLLM: GPU, "
        "or its CPU build in a worker process), vllm_server (a vLLM OpenAI-compatible server "
        "this run starts and stops), openai (any compatible server)",
    )
    model: str | None = Field(
        None,
        title="Model",
        description="HF folder or hub id (embedded, vllm, vllm_server; empty: the packaged "
        "SmolLM2-135M-Instruct); the served model name (openai)",
    )

    # embedded + vllm
    batch_size: int = Field(64, ge=1, description="rows decoded together (embedded), chunk size")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto: bf16 where the CPU has native bf16, float32 elsewhere (embedded, "
        "and vllm when kind auto picks its CPU build); vllm and vllm_server: vLLM's choice for "
        "the model",
    )
    json_retries: int = Field(2, ge=0, description="embedded: re-tries of schema-invalid output")
    num_threads: int | None = Field(
        None, ge=1, description="embedded: torch CPU threads (empty: from the CPUs and the load)"
    )

    # vllm
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per model")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="vllm: share of GPU memory it may take"
    )
    max_model_len: int | None = Field(
        None, ge=1, description="vllm: context length (empty: the model's)"
    )
    enforce_eager: bool | None = Field(
        None,
        description="vllm, vllm_server: run without graph compilation (empty: eager on CPU, "
        "where it starts in ~20 s instead of ~90 s; compiled on GPU)",
    )
    kv_cache_gb: int = Field(
        1,
        ge=1,
        description="vllm, vllm_server on CPU: KV cache GiB (VLLM_CPU_KVCACHE_SPACE; vLLM's own "
        "default reserves a share of the machine's memory)",
    )
    startup_timeout_s: float = Field(
        600.0, gt=0, description="vllm worker, vllm_server: seconds to wait for the model to load"
    )

    # openai-compatible (max_concurrency, timeout_s, max_retries, backoff_s: vllm_server too)
    base_url: str | None = Field(None, description="openai: server URL (empty: $OPENAI_BASE_URL)")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai: name of the environment variable holding the key"
    )
    max_concurrency: int = Field(16, ge=1, description="openai: requests in flight")
    timeout_s: float = Field(120.0, gt=0, description="openai: seconds per request")
    max_retries: int = Field(4, ge=0, description="openai: retries of a failed request")
    backoff_s: float = Field(1.0, ge=0, description="openai: first retry delay (doubles)")
    revision: str | None = Field(None, description="openai: weights revision for cache keys")

    def fingerprint(self) -> dict[str, object]:
        """The settings that change outputs (not batch sizes, timeouts, concurrency, keys, vLLM's
        KV-cache size or eager/compiled mode, which change speed and memory only).
        The embedded engine's `auto` precision is resolved on this CPU (bf16 here, float32
        there), since the two give different samples. A local model (a folder, a .gguf) is
        named by its content (`infra.models.local_identity`), not its path; a server by the
        model it serves (and `revision`), not its URL, as in the request cache's keys."""
        data = self.model_dump(include={"kind", "model", "dtype", "revision"})
        if self.kind != "openai":
            from infra.models import is_local_model, local_identity

            if is_local_model(self.model):
                assert self.model is not None
                data["model"] = local_identity(Path(self.model).expanduser().resolve())
        if self.kind == "embedded" and self.dtype == "auto":
            from infra.engines.cpu import choose_dtype

            data["dtype"] = choose_dtype("auto")[0]
        return data

    @model_validator(mode="wrap")
    @classmethod
    def _resolve_auto(cls, data: object, handler: Any) -> EngineConfig:
        """`kind: auto` (the default) becomes the engine this machine runs best
        (`infra/engines/choice.py`), so the configuration, its fingerprint and the request
        cache's keys name the engine that actually runs."""
        if isinstance(data, dict) and data.get("kind", "auto") == "auto":
            from infra.engines.choice import remember, resolve_auto

            return remember(handler(resolve_auto(data)))
        return handler(data)

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.kind == "openai" and not self.model:
            raise ValueError("engine kind 'openai' needs `model` (the name the server serves)")
        if self.api_key_env.startswith(("sk-", "sk_")):
            raise ValueError("api_key_env names an environment variable; do not put a key in it")
        return self


_engines: dict[EngineConfig, Engine] = {}
_engines_lock = threading.Lock()
_built_here = threading.local()


def build_engine(config: EngineConfig) -> Engine:
    """The engine for `config`, built once per process (a Ray worker process keeps it across
    the shards it runs)."""
    with _engines_lock:
        engine = _engines.get(config)
        if engine is None:
            engine = _engines[config] = _build(config)
            _built_here.count = builds() + 1
        return engine


def builds() -> int:
    """How many engines this thread has built (a shard runs on one thread: its manifest
    records the builds it caused, exactly, even with other shards on other threads)."""
    return getattr(_built_here, "count", 0)


def _build(config: EngineConfig) -> Engine:
    if config.kind == "embedded":
        from infra.engines.embedded import EmbeddedEngine

        return EmbeddedEngine(
            config.model,
            batch_size=config.batch_size,
            dtype=config.dtype,
            num_threads=config.num_threads,
            json_retries=config.json_retries,
        )
    if config.kind in ("vllm", "vllm_server"):
        # What both vLLM kinds take: the model, its precision and placement, the CPU settings.
        vllm_options = config.model_dump(
            include={
                "dtype",
                "tensor_parallel_size",
                "gpu_memory_utilization",
                "max_model_len",
                "enforce_eager",
                "kv_cache_gb",
                "startup_timeout_s",
            }
        )
        if config.kind == "vllm":
            from infra.engines.vllm_engine import VLLMEngine

            return VLLMEngine(config.model, batch_size=config.batch_size, **vllm_options)
        from infra.engines.vllm_server import VLLMServerEngine

        return VLLMServerEngine(config.model, **vllm_options, **_client_options(config))
    from infra.engines.openai_engine import OpenAIEngine

    return OpenAIEngine(
        config.model,
        base_url=config.base_url,
        api_key_env=config.api_key_env,
        **_client_options(config),
        revision=config.revision,
    )


def _client_options(config: EngineConfig) -> dict[str, object]:
    """How an HTTP client of an OpenAI-compatible server behaves (openai, vllm_server)."""
    return config.model_dump(include={"max_concurrency", "timeout_s", "max_retries", "backoff_s"})


def engines_in(value: object) -> list[EngineConfig]:
    """The engine configurations anywhere in a value (a flow's or a stage's parameters: models,
    dicts, lists), each once, in order of appearance."""
    if isinstance(value, EngineConfig):
        return [value]
    if isinstance(value, BaseModel):
        value = [getattr(value, name) for name in type(value).model_fields]
    elif isinstance(value, dict):
        value = list(value.values())
    found: list[EngineConfig] = []
    if isinstance(value, list | tuple):
        for item in value:
            found += [e for e in engines_in(item) if e not in found]
    return found


def describe_engines(params: object) -> list[str]:
    """One line per engine a run's parameters use: its kind, model and precision, and, where
    `kind: auto` chose that kind on this machine, why."""
    from infra.engines.choice import choice_made, from_auto

    choice = choice_made()
    lines = []
    for engine in engines_in(params):
        line = f"engine: {engine.kind}, model {engine.model or 'packaged SmolLM2-135M-Instruct'}"
        line += f", dtype {engine.dtype}"
        if choice is not None and from_auto(engine):
            line += f" (kind auto: {choice.reason})"
        lines.append(line)
    return lines


def open_engine(config: EngineConfig, stage: str) -> CachedEngine:
    """The configured engine behind the request cache, counting under `stage`."""
    from storage.request_cache import open_request_cache

    return CachedEngine(build_engine(config), open_request_cache(), stage)


__all__ = [
    "CachedEngine",
    "ChatRequest",
    "ChatResponse",
    "Completion",
    "Engine",
    "EngineConfig",
    "SamplingParams",
    "build_engine",
    "builds",
    "describe_engines",
    "engine_scope",
    "engines_in",
    "open_engine",
    "release_accelerators",
    "schema_error",
]
