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
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

from infra.engines.base import ChatRequest, ChatResponse, Completion, schema_error

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
        self.llm = vllm.LLM(
            model=resolved.path,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
        )

    @property
    def identity(self) -> str:
        return self._identity

    def generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        if not requests:
            return []
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
