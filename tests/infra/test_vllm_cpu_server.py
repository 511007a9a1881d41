"""The `vllm_server` engine on the real vLLM CPU build: vLLM's OpenAI-compatible server started on
127.0.0.1 from its own environment, waited for, used through the OpenAI engine and stopped by its
pid; a server that dies while starting (one line with its log's tail); a server killed mid-batch
(the rerun, on a fresh server, sends only the requests whose answers were not cached); and the
evaluation flow against a managed server. One server serves the module (float32)."""

from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import replace
from pathlib import Path

import pytest

import infra.engines as engines
from infra.engines import CachedEngine, EngineConfig, build_engine, release_accelerators
from infra.engines.base import ChatRequest, SamplingParams
from storage.request_cache import open_request_cache
from tests.infra.vllm_cpu import packaged_folder, text, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(models_dir):
    """(config, engine): the packaged SmolLM2 behind a managed vLLM server (started lazily)."""
    vllm_python()
    engines._engines.clear()
    config = EngineConfig(
        kind="vllm_server",
        model=packaged_folder(models_dir),
        dtype="float32",
        max_concurrency=4,
        max_retries=1,
        backoff_s=0.1,
    )
    yield config, build_engine(config)
    release_accelerators()
    engines._engines.clear()


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies, not yet reaped, do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_a_server_that_dies_while_starting_says_why_in_one_line(tmp_path):
    vllm_python()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    engine = build_engine(EngineConfig(kind="vllm_server", model=str(broken)))
    try:
        with pytest.raises(RuntimeError) as failed:
            engine.generate([ChatRequest(text("hi"))])
    finally:
        release_accelerators()
        engines._engines.clear()
    message = str(failed.value)
    assert "\n" not in message
    assert f"vLLM server for {broken} exited with code" in message
    log = Path(message.split("(log ", 1)[1].split(": ", 1)[0])
    assert log.is_file() and message.split(f"{log}: ", 1)[1].strip(" )")  # kept, its tail quoted
    assert engine.proc is None
    log.unlink()


def test_chat_raw_seeded_n_stop_and_schema_through_the_server(served):
    _, engine = served
    schema = {
        "type": "object",
        "properties": {"verdict": {"enum": ["Equal", "Not Equal"]}},
        "required": ["verdict"],
        "additionalProperties": False,
    }
    requests = [
        ChatRequest(text("What is 2+3?"), SamplingParams(max_tokens=24)),
        ChatRequest(
            ({"role": "user", "content": "### Instruction:\nWhat is 2+3?\n\n### Response: "},),
            SamplingParams(max_tokens=24),
            raw=True,
        ),
        ChatRequest(
            text("Name a colour."), SamplingParams(temperature=0.9, n=3, seed=7, max_tokens=12)
        ),
        ChatRequest(text("Is 0.5 equal to 1/2? Answer in JSON."), json_schema=schema),
    ]
    chat, raw, sampled, judged = engine.generate(requests)
    pid = engine.proc.pid
    print(f"vLLM server started in {engine.startup_s:.1f} s (pid {pid}, {engine.base_url})")
    assert all(r.ok for r in (chat, raw, sampled, judged)), [r.error for r in requests]
    assert chat.text and raw.text and chat.prompt_tokens > raw.prompt_tokens - 10
    assert len(sampled.completions) == 3 and len({c.text for c in sampled.completions}) > 1
    assert json.loads(judged.text)["verdict"] in ("Equal", "Not Equal")
    # Seeded samples repeat; a stop string ends the text before it.
    assert engine.generate([requests[2]])[0].completions == sampled.completions
    word = next(w for w in chat.text.split()[1:] if chat.text.index(w) > 0)
    stop = replace(requests[0], sampling=replace(requests[0].sampling, stop=(word,)))
    assert engine.generate([stop])[0].text == chat.text[: chat.text.index(word)]
    assert engine.proc.pid == pid  # one server for all of it


class Spy:
    """Counts the requests that reach the engine; on call `kill_on`, kills the server's process
    group (SIGKILL) shortly after the call starts."""

    def __init__(self, engine, kill_on: int | None = None):
        self.engine, self.kill_on = engine, kill_on
        self.calls, self.sent = 0, 0

    @property
    def identity(self) -> str:
        return self.engine.identity

    def generate(self, requests):
        self.calls += 1
        self.sent += len(requests)
        if self.calls == self.kill_on:
            pgid = self.engine.proc.pid
            threading.Timer(0.5, os.killpg, (pgid, signal.SIGKILL)).start()
        return self.engine.generate(requests)


def test_a_server_killed_mid_batch_and_a_rerun_that_sends_only_the_missing(served):
    _, engine = served
    requests = [
        ChatRequest(text(f"Tell a long story about a {animal}."), SamplingParams(max_tokens=48))
        for animal in ("cat", "dog", "fox", "owl", "bee", "cow", "elk", "yak", "ant", "hen")
    ]
    engine.generate(requests[:1])  # the server is up
    old, old_log = engine.proc.pid, engine.log_path
    killing = Spy(engine, kill_on=2)
    with pytest.raises(RuntimeError, match=rf"vLLM server pid {old} exited with code -9 while"):
        CachedEngine(killing, open_request_cache(), "killed", chunk_size=4).generate(requests)
    assert killing.calls == 2 and not group_alive(old)
    assert old_log.is_file()  # a dead server's log stays (the error names it)
    old_log.unlink()

    # The rerun: a fresh server (the dead one is noticed and replaced), only what is missing sent.
    spy = Spy(engine)
    rerun = CachedEngine(spy, open_request_cache(), "rerun", chunk_size=4)
    responses = rerun.generate(requests)
    assert engine.proc.pid != old
    assert all(r.ok for r in responses)
    assert spy.sent == len(requests) - 4  # the first chunk was cached before the kill
    assert rerun.stats["hits"] == 4 and rerun.stats["misses"] == len(requests) - 4


def test_the_evaluation_flow_against_a_managed_vllm_server(
    served, prefect_harness, evolforge_home, shared_data
):
    import polars as pl

    from flows.evaluation import EvaluationParams, evaluation
    from storage.datasets import DatasetStore

    config, engine = served
    params = EvaluationParams.model_validate(
        {
            "models": ["base"],
            "benchmarks": ["gsm8k"],
            "modes": ["cot"],
            "limit": 3,
            "sandbox": {"workers": 1},
            "decoding": {"cot_max_tokens": 96},
            "engine": config,
        }
    )
    state = evaluation(params)
    results = DatasetStore(evolforge_home).read(state.eval_results)
    assert results.height == 3
    assert results["error"].null_count() == 3, results["error"].to_list()
    assert set(results["engine_identity"]) == {engine.identity}
    assert results.filter(pl.col("completion_tokens") > 0).height == 3
    scores = DatasetStore(evolforge_home).read(state.eval_scores)
    assert scores.select("model", "benchmark", "mode", "n").rows() == [("base", "gsm8k", "cot", 3)]
    # The flow's end released the engine: the server is stopped.
    assert engine.proc is None
