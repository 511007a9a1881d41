"""Any OpenAI-compatible chat server (vLLM serve, SGLang, llama.cpp server, OpenAI) as an engine.

Requests go out concurrently through `AsyncOpenAI`, at most `max_concurrency` at a time. This
module is the only retry owner: the client is built with `max_retries=0`, and each request is
retried here on 429, 5xx, timeouts, connection errors and unparseable responses, with
exponential backoff plus jitter, waiting at least what a `Retry-After` header asks. Other 4xx
errors fail at once. A request that still fails comes back with `error` set, never raises.

Choices made here:

- **n > 1** uses the API's `n` in one call (vLLM, SGLang and OpenAI support it). Token usage is
  reported per call, so each completion gets an even share of `completion_tokens`.
- **Truncation**: `finish_reason == "length"` is kept as "length"; everything else that ended
  normally is "stop".
- **JSON schema** goes as `response_format={"type": "json_schema", ...}` and every returned
  completion is validated with `jsonschema`; an invalid one sets `error` and keeps the text.
- **Secrets**: the API key is read from the environment variable named by `api_key_env`
  (default `OPENAI_API_KEY`) when the engine is built; it is never part of the identity (cache
  keys), a log line or an error message.
- **Identity** is `openai:<model>` plus `@<revision>` when configured, so the cache is shared
  by every server that serves the same weights.

`generate` is synchronous. It runs its own event loop, or, when the calling thread already has
one running (a notebook, an async Prefect task), runs that loop in a worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import time
from typing import Any

from infra.engines.base import ChatRequest, ChatResponse, Completion, schema_error

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIEngine:
    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 16,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        revision: str | None = None,
    ):
        if not model:
            raise ValueError("the openai engine needs a model name")
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        # A local server usually ignores the key, but the client insists on one.
        self._api_key = os.environ.get(api_key_env) or "EMPTY"
        self.max_concurrency = max_concurrency
        self.chunk_size = max_concurrency * 4
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._identity = f"openai:{model}" + (f"@{revision}" if revision else "")

    @property
    def identity(self) -> str:
        return self._identity

    def __repr__(self) -> str:
        return f"OpenAIEngine(model={self.model!r}, base_url={self.base_url!r})"

    def generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        if not requests:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(requests))
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self.agenerate(requests)).result()

    async def agenerate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(
            base_url=self.base_url, api_key=self._api_key, max_retries=0, timeout=self.timeout_s
        )
        semaphore = asyncio.Semaphore(self.max_concurrency)
        try:
            return await asyncio.gather(
                *(self._one(client, semaphore, request) for request in requests)
            )
        finally:
            await client.close()

    async def _one(self, client, semaphore: asyncio.Semaphore, request: ChatRequest):
        import openai

        attempt = 0
        while True:
            start = time.perf_counter()
            wait: float | None = None
            async with semaphore:
                try:
                    call = (
                        client.completions.create(**self._payload(request))
                        if request.raw
                        else client.chat.completions.create(**self._payload(request))
                    )
                    raw = await asyncio.wait_for(call, timeout=self.timeout_s)
                    response = self._response(request, raw)
                    response.latency_s = time.perf_counter() - start
                    return response
                except openai.APIStatusError as exc:
                    error = f"HTTP {exc.status_code}: {_short(exc.message)}"
                    if exc.status_code in RETRYABLE_STATUS:
                        wait = _retry_after(exc.response.headers) or 0.0
                    else:
                        return ChatResponse(completions=[], error=error)
                except (TimeoutError, openai.APITimeoutError):
                    error = f"timeout after {self.timeout_s}s"
                    wait = 0.0
                except openai.APIConnectionError as exc:
                    error = f"connection error: {_short(str(exc))}"
                    wait = 0.0
                except (
                    ValueError,
                    KeyError,
                    TypeError,
                    AttributeError,
                    IndexError,
                    openai.APIResponseValidationError,
                ) as exc:
                    error = f"malformed response: {type(exc).__name__}: {_short(str(exc))}"
                    wait = 0.0
            if attempt >= self.max_retries:
                return ChatResponse(completions=[], error=f"{error} (after {attempt + 1} attempts)")
            backoff = min(self.max_backoff_s, self.backoff_s * 2**attempt)
            await asyncio.sleep(max(wait, backoff * (0.5 + random.random() / 2)))
            attempt += 1

    def _payload(self, request: ChatRequest) -> dict[str, Any]:
        s = request.sampling
        payload: dict[str, Any] = {
            "model": self.model,
            # a raw prompt goes to the completions endpoint, without the chat template
            **({"prompt": request.prompt} if request.raw else {"messages": list(request.messages)}),
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "n": s.n,
            "seed": s.seed,
        }
        if s.stop:
            payload["stop"] = list(s.stop)
        if request.json_schema is not None:
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": request.json_schema},
            }
        return payload

    def _response(self, request: ChatRequest, raw) -> ChatResponse:
        if isinstance(raw, str) or not getattr(raw, "choices", None):
            raise ValueError("response has no choices")
        choices = sorted(raw.choices, key=lambda c: c.index)
        usage = raw.usage
        completion_tokens = usage.completion_tokens if usage else 0
        share = completion_tokens // max(1, len(choices))
        completions = [
            Completion(
                text=(choice.text if request.raw else choice.message.content) or "",
                finish_reason="length" if choice.finish_reason == "length" else "stop",
                completion_tokens=share,
            )
            for choice in choices
        ]
        error = None
        if request.json_schema is not None:
            problems = [schema_error(c.text, request.json_schema) for c in completions]
            bad = [(k, p) for k, p in enumerate(problems) if p is not None]
            if bad:
                error = f"json_schema: sample {bad[0][0]} invalid: {bad[0][1]}"
        return ChatResponse(
            completions=completions,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            error=error,
        )


def _retry_after(headers) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date; the exponential backoff applies instead


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"
