"""vLLM engine: request -> SamplingParams mapping (with a fake vllm module), the lifecycle (one
model on the GPU at a time, released before the next loads and when the flow ends), and a GPU
run."""

from __future__ import annotations

import os
import sys
import threading
import types

import pytest
import torch

import infra.engines as engines
from infra.engines import EngineConfig, build_engine, release_accelerators
from infra.engines.base import ChatRequest, SamplingParams
from infra.engines.vllm_engine import import_vllm, sampling_params, to_response
from tests.fakes import FakeVLLM

SCHEMA = {"type": "object", "properties": {"verdict": {"enum": ["Equal", "Not Equal"]}}}


def _fake_vllm(structured: bool) -> types.ModuleType:
    class Recorder:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = Recorder
    params = types.ModuleType("vllm.sampling_params")
    if structured:
        params.StructuredOutputsParams = Recorder
    else:
        params.GuidedDecodingParams = Recorder
    vllm.sampling_params = params
    return vllm


def test_every_sampling_field_is_set_explicitly():
    request = ChatRequest(
        ({"role": "user", "content": "hi"},),
        SamplingParams(temperature=0.7, top_p=0.95, max_tokens=300, n=4, seed=9, stop=("###",)),
    )
    params = sampling_params(request, _fake_vllm(structured=True))
    assert params.kwargs == {
        "n": 4,
        "temperature": 0.7,
        "top_p": 0.95,
        "max_tokens": 300,  # vLLM's default is 16
        "seed": 9,
        "stop": ["###"],
    }


@pytest.mark.parametrize(
    ("structured", "field"), [(True, "structured_outputs"), (False, "guided_decoding")]
)
def test_json_schema_uses_structured_outputs_or_guided_decoding(structured, field):
    request = ChatRequest(({"role": "user", "content": "judge"},), json_schema=SCHEMA)
    params = sampling_params(request, _fake_vllm(structured))
    assert params.kwargs[field].kwargs == {"json": SCHEMA}
    assert params.kwargs["stop"] is None


def test_request_output_becomes_a_response():
    out = types.SimpleNamespace(
        prompt_token_ids=[1, 2, 3],
        outputs=[
            types.SimpleNamespace(
                text='{"verdict": "Equal"}', token_ids=[5, 6], finish_reason="stop"
            ),
            types.SimpleNamespace(text='{"verdict": "Eq', token_ids=[5], finish_reason="length"),
        ],
    )
    request = ChatRequest(({"role": "user", "content": "judge"},), json_schema=SCHEMA)
    response = to_response(request, out, 0.5)
    assert response.prompt_tokens == 3
    assert [c.finish_reason for c in response.completions] == ["stop", "length"]
    assert response.completions[1].text == '{"verdict": "Eq'  # kept, though invalid
    assert response.error.startswith("json_schema: sample 1 invalid")


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"pip install 'evolforge\[vllm\]'"):
        import_vllm()


def _has_gpu_vllm() -> bool:
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu_vllm(), reason="needs vLLM and a CUDA GPU")
def test_vllm_engine_generates_on_gpu():
    from infra.engines import EngineConfig, build_engine

    engine = build_engine(EngineConfig(kind="vllm", gpu_memory_utilization=0.3, max_model_len=2048))
    requests = [
        ChatRequest(({"role": "user", "content": "What is 2+3?"},), SamplingParams(max_tokens=64)),
        ChatRequest(({"role": "user", "content": "Is 0.5 equal to 1/2?"},), json_schema=SCHEMA),
        ChatRequest(
            ({"role": "user", "content": "Name a colour."},),
            SamplingParams(temperature=0.8, n=3, seed=1, max_tokens=16),
        ),
    ]
    first, judge, sampled = engine.generate(requests)
    assert first.ok and first.completions[0].completion_tokens > 0
    assert judge.ok, judge.error
    assert len(sampled.completions) == 3
    assert engine.generate(requests[2:])[0].completions == sampled.completions


@pytest.fixture()
def fake_vllm(monkeypatch):
    """The fake vllm package installed; no engine memoised or loaded before or after."""
    fake = FakeVLLM(reply=lambda text: f"re:{text}").install(monkeypatch)
    engines._engines.clear()
    yield fake
    release_accelerators()
    engines._engines.clear()


def _model(tmp_path, name: str) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


def _ask(model: str, text: str = "hi") -> list:
    config = EngineConfig(kind="vllm", model=model)
    return build_engine(config).generate([ChatRequest(({"role": "user", "content": text},))])


def test_raw_prompts_go_to_generate_and_chats_to_chat_in_request_order(fake_vllm, tmp_path):
    engine = build_engine(EngineConfig(kind="vllm", model=_model(tmp_path, "m")))
    requests = [
        ChatRequest(({"role": "user", "content": "a"},)),
        ChatRequest(({"role": "user", "content": "### Instruction:\nb"},), raw=True),
        ChatRequest(({"role": "user", "content": "c"},)),
    ]
    texts = [r.text for r in engine.generate(requests)]
    assert texts == ["re:a", "re:### Instruction:\nb", "re:c"]
    calls = sorted(e[:1] + e[2:] for e in fake_vllm.events if e[0] in ("chat", "generate"))
    assert calls == [("chat", 2), ("generate", 1)]


def test_the_engine_loads_when_it_first_generates(fake_vllm, tmp_path):
    engine = build_engine(EngineConfig(kind="vllm", model=_model(tmp_path, "m")))
    assert engine.llm is None and fake_vllm.events == []
    engine.generate([])
    assert fake_vllm.events == []


def test_another_model_releases_the_first_before_it_loads(fake_vllm, tmp_path, monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    a, b = _model(tmp_path, "a"), _model(tmp_path, "b")
    assert _ask(a)[0].text == "re:hi"
    _ask(a, "again")  # the same model: no reload
    assert _ask(b)[0].text == "re:hi"
    # a was shut down, and no reference to its LLM was left (the memo keeps the engine object,
    # which no longer holds one), before b's LLM was built.
    assert fake_vllm.lifecycle() == [
        ("open", a, []),
        ("shutdown", a),
        ("destroy_model_parallel",),
        ("open", b, []),
    ]
    assert emptied == [True]
    memo = {config.model: engine for config, engine in engines._engines.items()}
    assert memo[a].llm is None and memo[b].llm is not None
    # The end of the flow (engine_scope) releases what is still loaded.
    release_accelerators()
    assert fake_vllm.lifecycle()[-2:] == [("shutdown", b), ("destroy_model_parallel",)]
    assert fake_vllm.alive() == [] and memo[b].llm is None and emptied == [True, True]
    # A released engine loads again when asked.
    assert _ask(a)[0].text == "re:hi" and fake_vllm.lifecycle()[-1] == ("open", a, [])


def test_a_model_waits_for_the_calls_in_flight_on_another(tmp_path, monkeypatch):
    entered, go = threading.Event(), threading.Event()

    def reply(text):
        if text == "slow":
            entered.set()
            assert go.wait(10)
        return text

    fake = FakeVLLM(reply).install(monkeypatch)
    engines._engines.clear()
    a, b = _model(tmp_path, "a"), _model(tmp_path, "b")
    try:
        first = threading.Thread(target=_ask, args=(a, "slow"))
        first.start()
        assert entered.wait(10)
        second = threading.Thread(target=_ask, args=(b, "fast"))
        second.start()
        second.join(0.3)
        assert second.is_alive()  # b waits: a is generating
        assert [e[0] for e in fake.lifecycle()] == ["open"]
        go.set()
        first.join(10)
        second.join(10)
        assert [e[:2] for e in fake.lifecycle()] == [
            ("open", a),
            ("shutdown", a),
            ("destroy_model_parallel",),
            ("open", b),
        ]
    finally:
        go.set()
        release_accelerators()
        engines._engines.clear()


@pytest.mark.parametrize("cuda", [False, True])
def test_in_process_on_a_cpu_runs_eager_with_a_bounded_kv_cache(
    fake_vllm, tmp_path, monkeypatch, cuda
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0")  # restored after the test
    engine = build_engine(EngineConfig(kind="vllm", model=_model(tmp_path, "m"), kv_cache_gb=3))
    engine.generate([ChatRequest(({"role": "user", "content": "hi"},))])
    options = engine.llm.options
    if cuda:  # a GPU: compiled, its memory share, vLLM's own KV-cache sizing
        assert "enforce_eager" not in options and options["gpu_memory_utilization"] == 0.9
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "0"
    else:
        assert options["enforce_eager"] is True and "gpu_memory_utilization" not in options
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"
