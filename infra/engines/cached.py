"""`CachedEngine`: any engine behind the request cache, with per-stage accounting.

Stages call `open_engine(config, stage).generate(requests)` and get this wrapper. For a batch it
looks every request up in the cache by `ChatRequest.key(engine.identity)`, sends only the misses
to the engine (each distinct key once, even when a batch repeats a request), in chunks of
`chunk_size`, and appends each chunk's responses to the cache as soon as it returns. So a run
killed mid-batch loses at most one chunk, and its rerun sends only what is missing.

Failed responses are returned to the caller and written to the cache with their error, but they
are not hits: the next run retries them.

Counts (hits, misses, failures, prompt and completion tokens, engine seconds) are kept per
instance (`stats`): a stage opens its engine through its context and reports that engine's
counts, so two stages (or two runs) in one process never mix their numbers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from infra.engines.base import ChatRequest, ChatResponse, Engine

if TYPE_CHECKING:
    from storage.request_cache import RequestCache


@dataclass
class StageStats:
    requests: int = 0
    hits: int = 0
    misses: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0

    def add(self, other: StageStats) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


class CachedEngine:
    """Implements `Engine` on top of another engine and a `RequestCache`."""

    def __init__(
        self, engine: Engine, cache: RequestCache, stage: str, chunk_size: int | None = None
    ):
        if not stage:
            raise ValueError("CachedEngine needs a stage name for its accounting")
        self.engine = engine
        self.cache = cache
        self.stage = stage
        self.chunk_size = (
            chunk_size or getattr(engine, "chunk_size", None) or getattr(engine, "batch_size", 64)
        )
        self._stats = StageStats()
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        return self.engine.identity

    @property
    def stats(self) -> dict[str, float]:
        with self._lock:
            return asdict(self._stats)

    def generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        identity = self.engine.identity
        keys = [request.key(identity) for request in requests]
        found = {
            key: ChatResponse.from_dict(data, cached=True)
            for key, data in self.cache.get_many(keys).items()
        }
        todo: dict[str, ChatRequest] = {}
        for key, request in zip(keys, requests, strict=True):
            if key not in found and key not in todo:
                todo[key] = request

        delta = StageStats(
            requests=len(requests), hits=len(requests) - sum(1 for key in keys if key not in found)
        )
        items = list(todo.items())
        for start in range(0, len(items), self.chunk_size):
            chunk = items[start : start + self.chunk_size]
            t0 = time.perf_counter()
            responses = self.engine.generate([request for _, request in chunk])
            elapsed = time.perf_counter() - t0
            if len(responses) != len(chunk):
                raise RuntimeError(
                    f"engine {identity} returned {len(responses)} responses for {len(chunk)} "
                    "requests"
                )
            self.cache.put_many(
                [
                    (key, response.to_dict())
                    for (key, _), response in zip(chunk, responses, strict=True)
                ],
                stage=self.stage,
                engine=identity,
            )
            chunk_stats = StageStats(engine_seconds=elapsed)
            for (key, _), response in zip(chunk, responses, strict=True):
                found[key] = response
                chunk_stats.prompt_tokens += response.prompt_tokens
                chunk_stats.completion_tokens += sum(
                    c.completion_tokens for c in response.completions
                )
                if not response.ok:
                    chunk_stats.failures += 1
            self._record(chunk_stats)
        delta.misses = len(requests) - delta.hits
        self._record(delta)
        return [found[key] for key in keys]

    def _record(self, delta: StageStats) -> None:
        with self._lock:
            self._stats.add(delta)
