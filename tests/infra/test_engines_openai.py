"""The OpenAI-compatible engine against a scripted faulty server on loopback."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from infra.engines import EngineConfig, build_engine
from infra.engines.base import ChatRequest, SamplingParams
from infra.engines.cached import CachedEngine
from infra.engines.openai_engine import OpenAIEngine
from storage.request_cache import RequestCache
from tests.infra.fault_server import RETRY_AFTER_S, FaultServer, behaviour

SECRET = "sk-test-secret-4c1b9e"
# The client's deadline per attempt. The server never answers the requests meant to time out
# (it holds them), so their failure does not depend on this figure; it only has to be far
# beyond what a loopback answer takes on a loaded machine (0.5 s was not, under `make test`
# beside a vLLM server), at the cost of 3 x TIMEOUT_S for each chunk of requests with held ones.
TIMEOUT_S = 3.0


@pytest.fixture
def server():
    with FaultServer() as srv:
        yield srv


def _engine(server, monkeypatch, **overrides) -> OpenAIEngine:
    monkeypatch.setenv("EVOLFORGE_TEST_KEY", SECRET)
    options = dict(
        kind="openai",
        model="test-model",
        base_url=server.base_url,
        api_key_env="EVOLFORGE_TEST_KEY",
        max_concurrency=32,
        timeout_s=TIMEOUT_S,
        max_retries=2,
        backoff_s=0.01,
    )
    options.update(overrides)
    # Built directly rather than through build_engine's memo: each test has its own server.
    from infra.engines import _build

    return _build(EngineConfig(**options))


def _requests(count: int, **sampling) -> list[ChatRequest]:
    params = SamplingParams(max_tokens=32, **sampling)
    return [ChatRequest(({"role": "user", "content": f"item {i}"},), params) for i in range(count)]


@pytest.mark.slow  # ~30 s: 3 chunks of requests (2 + the rerun's) wait out 3 held attempts each
@pytest.mark.timeout(120)
def test_faulty_batch_then_rerun_sends_only_failures(server, monkeypatch, tmp_path):
    requests = _requests(200)
    kinds = Counter(behaviour(r.messages[-1]["content"]) for r in requests)
    assert 40 <= kinds[1] + kinds[2] + kinds[3] <= 80  # the mix really has ~30% failures
    cache = RequestCache(tmp_path / "cache")
    cached = CachedEngine(_engine(server, monkeypatch), cache, stage="faults")
    responses = cached.generate(requests)

    assert len(responses) == 200
    failed = {
        r.messages[-1]["content"]
        for r, resp in zip(requests, responses, strict=True)
        if not resp.ok
    }
    expected_failed = {
        r.messages[-1]["content"]
        for r in requests
        if behaviour(r.messages[-1]["content"]) in (1, 2, 3)
    }
    assert failed == expected_failed
    for request, response in zip(requests, responses, strict=True):
        kind = behaviour(request.messages[-1]["content"])
        if kind == 1:
            assert response.error.startswith("HTTP 500") and "3 attempts" in response.error
        elif kind == 2:
            assert response.error.startswith("timeout")
        elif kind == 3:
            assert response.error.startswith("malformed response")
        else:
            assert response.ok and response.text == f"echo: {request.messages[-1]['content']} #0"
            assert response.completions[0].finish_reason == ("length" if kind == 4 else "stop")
            assert response.completions[0].truncated == (kind == 4)
            assert response.prompt_tokens == 7 and response.completions[0].completion_tokens == 4

    # Retry-After was honoured: the retry of a 429 came at least that long after it.
    by_content: dict[str, list[float]] = {}
    for entry in server.log:
        by_content.setdefault(entry["content"], []).append(entry["t"])
    for content, times in by_content.items():
        if behaviour(content) == 0:
            assert len(times) >= 2 and times[1] - times[0] >= RETRY_AFTER_S * 0.9
        elif behaviour(content) in (1, 2, 3):
            assert len(times) == 3  # one try + max_retries, no more (the client never retries)
        else:
            # One call, unless a machine slower than TIMEOUT_S allows made the client retry.
            assert 1 <= len(times) <= 3
    assert cached.stats["failures"] == len(expected_failed)
    assert len(cache) == 200 - len(expected_failed)
    assert set(cache.failures()) == {
        r.key(cached.identity) for r in requests if r.messages[-1]["content"] in expected_failed
    }

    # The key went to the server, and nowhere on disk.
    assert {entry["auth"] for entry in server.log} == {f"Bearer {SECRET}"}
    for path in (tmp_path / "cache").glob("*"):
        assert SECRET not in path.read_text()
    assert SECRET not in cached.identity and SECRET not in repr(cached.engine)

    server.log.clear()
    rerun = CachedEngine(_engine(server, monkeypatch), cache, stage="faults").generate(requests)
    assert set(server.contents()) == expected_failed
    assert sum(r.cached for r in rerun) == 200 - len(expected_failed)


def test_payload_carries_sampling_n_seed_stop_and_schema(server, monkeypatch):
    engine = _engine(server, monkeypatch)
    schema = {"type": "object", "properties": {"verdict": {"enum": ["Equal", "Not Equal"]}}}
    ok_content = next(f"judge {i}" for i in range(100) if behaviour(f"judge {i}") >= 5)
    request = ChatRequest(
        ({"role": "user", "content": ok_content},),
        SamplingParams(temperature=0.7, top_p=0.9, max_tokens=12, n=3, seed=42, stop=("\n\n",)),
        json_schema=schema,
    )
    (response,) = engine.generate([request])
    assert response.ok and len(response.completions) == 3
    assert response.completions[0].text == '{"verdict": "Equal"}'
    body = server.log[-1]["body"]
    assert body["n"] == 3 and body["seed"] == 42 and body["max_tokens"] == 12
    assert body["stop"] == ["\n\n"] and body["temperature"] == 0.7 and body["top_p"] == 0.9
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == schema


def test_schema_invalid_answer_is_an_error_with_text_kept(server, monkeypatch):
    engine = _engine(server, monkeypatch)
    ok_content = next(f"judge {i}" for i in range(100) if behaviour(f"judge {i}") >= 5)
    request = ChatRequest(
        ({"role": "user", "content": ok_content},),
        json_schema={"type": "object", "required": ["score"]},
    )
    (response,) = engine.generate([request])
    assert not response.ok and "schema violation" in response.error
    assert response.text == '{"verdict": "Equal"}'


def test_generate_works_inside_a_running_event_loop(server, monkeypatch):
    engine = _engine(server, monkeypatch)
    requests = [r for r in _requests(20) if behaviour(r.messages[-1]["content"]) >= 5][:3]

    async def caller():
        return engine.generate(requests)

    responses = asyncio.run(caller())
    assert [r.text for r in responses] == [
        f"echo: {r.messages[-1]['content']} #0" for r in requests
    ]


def test_unreachable_server_fails_every_request_cleanly(monkeypatch):
    monkeypatch.setenv("NO_KEY", "x")
    engine = OpenAIEngine(
        "m",
        base_url="http://127.0.0.1:9/v1",
        api_key_env="NO_KEY",
        max_retries=1,
        backoff_s=0.01,
        timeout_s=2,
    )
    responses = engine.generate(_requests(3))
    assert all(r.error.startswith("connection error") for r in responses)


def test_build_engine_memoises_per_config(monkeypatch):
    config = EngineConfig(kind="openai", model="m", base_url="http://127.0.0.1:9/v1")
    assert build_engine(config) is build_engine(config)
    assert build_engine(config).identity == "openai:m"


def test_a_raw_prompt_uses_the_completions_endpoint():
    engine = OpenAIEngine("served", base_url="http://127.0.0.1:9/v1", api_key_env="NO_SUCH_KEY")
    raw = ChatRequest(({"role": "user", "content": "### Instruction:\nx"},), raw=True)
    payload = engine._payload(raw)
    assert payload["prompt"] == "### Instruction:\nx" and "messages" not in payload
    assert "messages" in engine._payload(ChatRequest(({"role": "user", "content": "x"},)))
