"""The one interface every LLM engine implements.

A batch of chat requests goes in; one response per request comes out, in order, each holding
`n` completions with token counts and finish reasons, or an error. Stages never branch on the
engine kind: they receive an `Engine` built from an `EngineConfig` by `infra.engines.build_engine`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"sampling max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"sampling top_p must be in [0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"sampling temperature must be >= 0, got {self.temperature}")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass(frozen=True)
class ChatRequest:
    """One chat request. `messages` are `{"role": ..., "content": ...}` dicts."""

    messages: tuple[dict[str, str], ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    json_schema: dict[str, Any] | None = None
    # Version of the prompt template that produced the messages; part of the cache key.
    template_version: str = ""
    # A raw prompt: the one message's text goes to the model as it is, without the model's chat
    # template (a model fine-tuned on plain prompts, such as WizardMath's Alpaca format).
    raw: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))
        if self.raw and len(self.messages) != 1:
            raise ValueError(f"a raw prompt is one message, got {len(self.messages)}")

    @property
    def prompt(self) -> str:
        """The text of a raw request's prompt."""
        return self.messages[0]["content"]

    def key(self, model_identity: str) -> str:
        """Cache key: hash of (model identity, messages, sampling, schema, template version)."""
        fields: dict[str, Any] = {
            "model": model_identity,
            "messages": list(self.messages),
            "sampling": asdict(self.sampling),
            "schema": self.json_schema,
            "template": self.template_version,
        }
        if self.raw:  # only when set, so every chat request keeps the key it always had
            fields["raw"] = True
        payload = json.dumps(
            fields,
            sort_keys=True,
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class Completion:
    text: str
    finish_reason: FinishReason
    completion_tokens: int

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class ChatResponse:
    completions: list[Completion]
    prompt_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None  # set when the request failed; completions is then empty
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        """The first completion's text ('' for a failed request)."""
        return self.completions[0].text if self.completions else ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "completions": [asdict(c) for c in self.completions],
            "prompt_tokens": self.prompt_tokens,
            "latency_s": self.latency_s,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], cached: bool = False) -> ChatResponse:
        return cls(
            completions=[Completion(**c) for c in data["completions"]],
            prompt_tokens=data.get("prompt_tokens", 0),
            latency_s=data.get("latency_s", 0.0),
            error=data.get("error"),
            cached=cached,
        )


@runtime_checkable
class Engine(Protocol):
    """A batch chat engine."""

    @property
    def identity(self) -> str:
        """Model identity for cache keys: model id plus weights checksum or revision."""
        ...

    def generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        """One response per request, in order. Failures are responses with `error` set."""
        ...


def schema_error(text: str, schema: dict[str, Any]) -> str | None:
    """None when `text` is JSON that validates under `schema`, else a one-line reason."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg} at char {exc.pos})"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return f"schema violation: {exc.message}"
    return None
