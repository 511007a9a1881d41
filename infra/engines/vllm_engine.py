"""The vLLM engine: offline `vllm.LLM` on local GPUs, for the paper-scale profile.

vLLM is an optional extra (`pip install 'evolforge[vllm]'`); importing it lazily keeps the rest
of the factory usable on machines without a GPU, and a missing install fails with a message
naming the extra.

Each request becomes one conversation for `LLM.chat` (the model's own chat template) with its
own `SamplingParams`. `n`, `seed` and `max_tokens` are always set explicitly: vLLM's
`max_tokens` default is 16, which would silently truncate every answer. JSON schemas use
structured outputs: `StructuredOutputsParams(json=...)` on vLLM >= 0.11, `GuidedDecodingParams`
on older releases (the field was renamed). Completions are validated with `jsonschema` anyway,
so an invalid one (e.g. truncated) comes back with `error` set and its text kept.

The engine holds the GPU only while it is the device's loaded engine (`infra.engines.lifecycle`):
`vllm.LLM` is built when the engine is first asked to generate, and `release()` shuts it down
and deletes it (its engine-core worker stopped, the distributed state torn down, `gc.collect()`,
`torch.cuda.empty_cache()` where CUDA is present) before an engine for another model loads on the
same GPU, and when the flow that used it ends. Every in-process vLLM engine starts at the first
visible GPU (`tensor_parallel_size` GPUs from there), so they all share one device: `vllm`.
"""

from __future__ import annotations

import gc
import importlib
import time
from types import ModuleType
from typing import Any

from infra.engines.base import ChatRequest, ChatResponse, Completion, schema_error
from infra.engines.lifecycle import ACCELERATORS

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


class VLLMEngine:
    # The device every in-process vLLM engine occupies (see the module's docstring).
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
    ):
        from infra.models import resolve_model

        vllm = import_vllm()
        resolved = resolve_model(model)
        self._vllm = vllm
        self._identity = resolved.identity
        self.batch_size = batch_size
        self._options: dict[str, Any] = {
            "model": resolved.path,
            "dtype": dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "seed": seed,
        }
        self.llm: Any = None  # built by `load`, while this engine holds the device

    def load(self) -> None:
        """Build the `vllm.LLM` (its weights and KV cache go onto the GPU)."""
        if self.llm is None:
            self.llm = self._vllm.LLM(**self._options)

    def release(self) -> None:
        """Shut the `vllm.LLM` down and delete it, returning its GPU memory; `load` reopens it."""
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
        params = [sampling_params(r, self._vllm) for r in requests]
        outputs: list[Any] = [None] * len(requests)
        chat = [i for i, r in enumerate(requests) if not r.raw]
        raw = [i for i, r in enumerate(requests) if r.raw]
        if chat:
            done = self.llm.chat(
                [list(requests[i].messages) for i in chat],
                [params[i] for i in chat],
                use_tqdm=False,
            )
            for i, out in zip(chat, done, strict=True):
                outputs[i] = out
        if raw:  # raw prompts skip the chat template: LLM.generate on the text
            done = self.llm.generate(
                [requests[i].prompt for i in raw], [params[i] for i in raw], use_tqdm=False
            )
            for i, out in zip(raw, done, strict=True):
                outputs[i] = out
        latency = time.perf_counter() - start
        return [to_response(r, out, latency) for r, out in zip(requests, outputs, strict=True)]


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
