"""CachedEngine: misses only, chunked appends, failures retried, stats, and a SIGKILL mid-batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from infra.engines import EngineConfig, open_engine
from infra.engines.base import ChatRequest, SamplingParams
from infra.engines.cached import CachedEngine
from storage.request_cache import RequestCache
from tests.fakes import ScriptedEngine, last_user_message

REPO = Path(__file__).resolve().parents[2]


def _requests(count: int, **sampling) -> list[ChatRequest]:
    params = SamplingParams(max_tokens=16, **sampling)
    return [
        ChatRequest(({"role": "user", "content": f"question {i}"},), params) for i in range(count)
    ]


def _echo(request: ChatRequest, sample: int) -> str:
    return f"answer to {last_user_message(request)} #{sample}"


def test_rerun_makes_zero_engine_calls(tmp_path):
    engine = ScriptedEngine(_echo)
    cached = CachedEngine(engine, RequestCache(tmp_path), stage="solve", chunk_size=4)
    first = cached.generate(_requests(10, n=2))
    assert len(engine.calls) == 10
    assert [r.completions[1].text for r in first][:2] == [
        "answer to question 0 #1",
        "answer to question 1 #1",
    ]
    again = CachedEngine(engine, RequestCache(tmp_path), stage="solve").generate(_requests(10, n=2))
    assert len(engine.calls) == 10
    assert all(r.cached for r in again)
    assert [r.to_dict()["completions"] for r in again] == [
        r.to_dict()["completions"] for r in first
    ]


def test_duplicates_in_a_batch_are_sent_once(tmp_path):
    engine = ScriptedEngine(_echo)
    cached = CachedEngine(engine, RequestCache(tmp_path), stage="s")
    requests = _requests(3) + _requests(3)
    responses = cached.generate(requests)
    assert len(engine.calls) == 3 and len(responses) == 6
    assert responses[0].text == responses[3].text


def test_model_identity_is_part_of_the_key(tmp_path):
    cache = RequestCache(tmp_path)
    a = ScriptedEngine(_echo, identity="model-a")
    b = ScriptedEngine(_echo, identity="model-b")
    CachedEngine(a, cache, "s").generate(_requests(2))
    CachedEngine(b, cache, "s").generate(_requests(2))
    assert len(a.calls) == 2 and len(b.calls) == 2


def test_failures_are_returned_recorded_and_retried(tmp_path):
    broken = {"question 1", "question 3"}

    def flaky(request, sample):
        if last_user_message(request) in broken:
            raise RuntimeError("server said no")
        return _echo(request, sample)

    engine = ScriptedEngine(flaky)
    cache = RequestCache(tmp_path)
    cached = CachedEngine(engine, cache, stage="judge", chunk_size=2)
    responses = cached.generate(_requests(5))
    assert [r.ok for r in responses] == [True, False, True, False, True]
    assert responses[1].error == "RuntimeError: server said no"
    assert len(cache.failures()) == 2
    stats = cached.stats
    assert stats["hits"] == 0 and stats["misses"] == 5 and stats["failures"] == 2
    assert stats["engine_seconds"] > 0 and stats["completion_tokens"] > 0

    broken.clear()
    engine.calls.clear()
    retried = CachedEngine(engine, cache, stage="judge").generate(_requests(5))
    assert sorted(last_user_message(r) for r in engine.calls) == ["question 1", "question 3"]
    assert all(r.ok for r in retried)
    assert cache.failures() == {}


def test_each_instance_counts_only_its_own_requests(tmp_path):
    # Stages report the counters of the engine they opened: two instances over one cache (two
    # stages, or two runs in one process) never mix their numbers.
    engine = ScriptedEngine(_echo)
    cache = RequestCache(tmp_path)
    first = CachedEngine(engine, cache, stage="evolve")
    first.generate(_requests(4))
    second = CachedEngine(engine, cache, stage="evolve")
    second.generate(_requests(6))
    assert (first.stats["requests"], first.stats["hits"], first.stats["misses"]) == (4, 0, 4)
    assert (second.stats["requests"], second.stats["hits"], second.stats["misses"]) == (6, 4, 2)


def test_open_engine_uses_home_cache(evolforge_home, monkeypatch):
    import infra.engines as engines

    fake = ScriptedEngine(_echo, identity="fake@1")
    monkeypatch.setattr(engines, "build_engine", lambda config: fake)
    wrapped = engines.open_engine(EngineConfig(), stage="seeds")
    wrapped.generate(_requests(2))
    assert list((evolforge_home / "cache" / "requests").glob("seg-*.jsonl"))
    assert wrapped.stage == "seeds" and wrapped.identity == "fake@1"


def test_open_engine_signature_is_what_stages_use():
    assert open_engine.__code__.co_varnames[:2] == ("config", "stage")


CHILD = textwrap.dedent(
    """
    import sys, time
    from infra.engines.base import ChatRequest, SamplingParams
    from infra.engines.cached import CachedEngine
    from storage.request_cache import RequestCache
    from tests.fakes import ScriptedEngine, last_user_message

    def slow(request, sample):
        time.sleep(0.05)
        return "ok " + last_user_message(request)

    requests = [
        ChatRequest(({"role": "user", "content": f"question {i}"},), SamplingParams(max_tokens=8))
        for i in range(60)
    ]
    engine = ScriptedEngine(slow)
    CachedEngine(engine, RequestCache(sys.argv[1]), stage="kill", chunk_size=4).generate(requests)
    print("finished")
    """
)


def _cached_records(root: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in root.glob("seg-*.jsonl"))


def test_sigkill_mid_batch_resumes_with_only_missing_requests(tmp_path):
    root = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], cwd=REPO, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not root.exists() or _cached_records(root) < 12):
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    done = _cached_records(root)
    assert 12 <= done < 60, "the child was killed too late to test a resume"
    # A crash in the middle of a write leaves a torn last record; it must be ignored.
    segment = next(root.glob("seg-*.jsonl"))
    with segment.open("ab") as fh:
        fh.write(b'{"key":"' + b"f" * 64 + b'","ok":true,"respo')

    engine = ScriptedEngine(lambda r, s: "ok " + last_user_message(r))
    requests = _requests_like_child()
    responses = CachedEngine(engine, RequestCache(root), stage="kill").generate(requests)
    assert len(engine.calls) == 60 - done
    assert all(r.ok for r in responses)
    assert [r.text for r in responses] == [f"ok question {i}" for i in range(60)]
    assert sum(r.cached for r in responses) == done
    keys = [
        json.loads(line)["key"]
        for p in root.glob("seg-*.jsonl")
        for line in p.read_bytes().splitlines()
        if line.endswith(b"}")
    ]
    assert len(keys) == len(set(keys)) == 60


def _requests_like_child() -> list[ChatRequest]:
    return [
        ChatRequest(({"role": "user", "content": f"question {i}"},), SamplingParams(max_tokens=8))
        for i in range(60)
    ]


@pytest.mark.parametrize("bad", [{"kind": "openai"}, {"batch_size": 0}, {"kind": "tgi"}])
def test_engine_config_rejects_bad_values(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        EngineConfig(**bad)


def test_engine_config_refuses_a_key_in_api_key_env():
    with pytest.raises(ValueError, match="names an environment variable"):
        EngineConfig(kind="openai", model="m", api_key_env="sk-secret")


def test_raw_prompts_are_one_message_and_their_own_cache_entries():
    message = ({"role": "user", "content": "Below is an instruction."},)
    chat, raw = ChatRequest(message), ChatRequest(message, raw=True)
    assert chat.key("m") != raw.key("m")
    assert raw.prompt == "Below is an instruction."
    with pytest.raises(ValueError, match="a raw prompt is one message"):
        ChatRequest(
            ({"role": "system", "content": "s"}, {"role": "user", "content": "u"}), raw=True
        )
