"""Fakes for unit tests: a scripted engine (replies chosen by a function of the request), a
stand-in for the `vllm` package that records its engines' lifecycle, and a scripted sandbox."""

from __future__ import annotations

import ast
import re
import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


class FakeVLLM:
    """A stand-in for the `vllm` package (`install` puts it in `sys.modules`): `LLM(model=...)`
    answers `chat` and `generate` with `reply(text)` (the last user message, or the raw prompt)
    and records its lifecycle in `events`: ("open", model, the models whose LLM objects are still
    alive at that moment), ("chat" | "generate", model, prompts), ("shutdown", model) and
    ("destroy_model_parallel",)."""

    def __init__(self, reply: Callable[[str], str] = lambda text: "The answer is: 0"):
        self.events: list[tuple[Any, ...]] = []
        self.llms: list[weakref.ref] = []
        fake = self

        def output(text: str, prompt: str) -> types.SimpleNamespace:
            sample = types.SimpleNamespace(
                text=text, finish_reason="stop", token_ids=list(range(len(text.split())))
            )
            return types.SimpleNamespace(prompt_token_ids=prompt.split(), outputs=[sample])

        class LLM:
            def __init__(self, model: str, **options: Any):
                fake.events.append(("open", model, fake.alive()))
                self.model, self.options = model, options
                fake.llms.append(weakref.ref(self))

            def chat(self, conversations, params, use_tqdm=True):
                fake.events.append(("chat", self.model, len(conversations)))
                texts = [c[-1]["content"] for c in conversations]
                return [output(reply(t), t) for t in texts]

            def generate(self, prompts, params, use_tqdm=True):
                fake.events.append(("generate", self.model, len(prompts)))
                return [output(reply(p), p) for p in prompts]

            def shutdown(self):
                fake.events.append(("shutdown", self.model))

        class Recorder:
            def __init__(self, **kwargs: Any):
                self.kwargs = kwargs

        vllm = types.ModuleType("vllm")
        vllm.LLM, vllm.SamplingParams = LLM, Recorder
        params = types.ModuleType("vllm.sampling_params")
        params.StructuredOutputsParams = Recorder
        vllm.sampling_params = params
        distributed = types.ModuleType("vllm.distributed")
        state = types.ModuleType("vllm.distributed.parallel_state")
        state.destroy_model_parallel = lambda: fake.events.append(("destroy_model_parallel",))
        vllm.distributed, distributed.parallel_state = distributed, state
        self.modules = {
            "vllm": vllm,
            "vllm.sampling_params": params,
            "vllm.distributed": distributed,
            "vllm.distributed.parallel_state": state,
        }

    def install(self, monkeypatch: Any) -> FakeVLLM:
        for name, module in self.modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        return self

    def alive(self) -> list[str]:
        """The models whose LLM objects have not been garbage-collected."""
        return [llm().model for llm in self.llms if llm() is not None]

    def lifecycle(self) -> list[tuple[Any, ...]]:
        """The events without the generation calls."""
        return [e for e in self.events if e[0] not in ("chat", "generate")]


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
