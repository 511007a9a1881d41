"""A scripted fake engine for unit tests: replies are chosen by a function of the request."""

from __future__ import annotations

from collections.abc import Callable

from infra.engines.base import ChatRequest, ChatResponse, Completion


class ScriptedEngine:
    """Answers each request with `reply(request, sample_index)`; counts what it was asked.

    `reply` may return a string (a completion that stopped normally), a `Completion`, or raise
    to simulate a failed request (the response then carries the error).
    """

    def __init__(
        self, reply: Callable[[ChatRequest, int], str | Completion], identity: str = "scripted"
    ):
        self._reply = reply
        self._identity = identity
        self.calls: list[ChatRequest] = []

    @property
    def identity(self) -> str:
        return self._identity

    def generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        responses = []
        for request in requests:
            self.calls.append(request)
            try:
                completions = []
                for i in range(request.sampling.n):
                    out = self._reply(request, i)
                    if isinstance(out, str):
                        out = Completion(
                            text=out, finish_reason="stop", completion_tokens=len(out.split())
                        )
                    completions.append(out)
                prompt_tokens = sum(len(m["content"].split()) for m in request.messages)
                responses.append(ChatResponse(completions=completions, prompt_tokens=prompt_tokens))
            except Exception as exc:
                responses.append(ChatResponse(completions=[], error=f"{type(exc).__name__}: {exc}"))
        return responses


def last_user_message(request: ChatRequest) -> str:
    return next(m["content"] for m in reversed(request.messages) if m["role"] == "user")
