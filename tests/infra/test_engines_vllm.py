"""vLLM engine: request -> SamplingParams mapping (with a fake vllm module) and a GPU run."""

from __future__ import annotations

import sys
import types

import pytest

from infra.engines.base import ChatRequest, SamplingParams
from infra.engines.vllm_engine import import_vllm, sampling_params, to_response

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


def test_raw_prompts_go_to_generate_and_chats_to_chat_in_request_order():
    from infra.engines.vllm_engine import VLLMEngine

    calls = []

    def output(text):
        sample = types.SimpleNamespace(text=text, finish_reason="stop", token_ids=[1, 2])
        return types.SimpleNamespace(prompt_token_ids=[7], outputs=[sample])

    class FakeLLM:
        def chat(self, conversations, params, use_tqdm):
            calls.append(("chat", len(conversations)))
            return [output(f"chat:{c[-1]['content']}") for c in conversations]

        def generate(self, prompts, params, use_tqdm):
            calls.append(("generate", len(prompts)))
            return [output(f"raw:{p}") for p in prompts]

    engine = VLLMEngine.__new__(VLLMEngine)
    engine.llm, engine._vllm = FakeLLM(), _fake_vllm(structured=True)
    requests = [
        ChatRequest(({"role": "user", "content": "a"},)),
        ChatRequest(({"role": "user", "content": "### Instruction:\nb"},), raw=True),
        ChatRequest(({"role": "user", "content": "c"},)),
    ]
    texts = [r.text for r in engine.generate(requests)]
    assert texts == ["chat:a", "raw:### Instruction:\nb", "chat:c"]
    assert sorted(calls) == [("chat", 2), ("generate", 1)]
