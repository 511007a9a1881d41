"""A scripted fake engine for unit tests: replies are chosen by a function of the request."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass
class FakeResult:
    stdout: str
    stderr_tail: str = ""
    exit_code: int | None = 0
    timed_out: bool = False
    killed_by_limit: str | None = None
    wall_s: float = 0.01
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class FakeSandbox:
    """Runs nothing: `print(<literal>)` prints the literal, `/ 0` fails, `while True` times out."""

    def __init__(self):
        self.programs: list[str] = []

    def run_many(self, programs: list[str]) -> list[FakeResult]:
        self.programs.extend(programs)
        out = []
        for code in programs:
            if "/ 0" in code:
                out.append(FakeResult("", "ZeroDivisionError: division by zero", exit_code=1))
            elif "while True" in code:
                out.append(FakeResult("", exit_code=None, timed_out=True, killed_by_limit="wall"))
            else:
                printed = re.findall(r"print\((.*)\)", code)
                out.append(FakeResult("".join(f"{ast.literal_eval(p)}\n" for p in printed)))
        return out
