"""The embedded engine with the real SmolLM2-135M (slow: loads the model), plus its pure helpers."""

from __future__ import annotations

import json

import pytest
import torch

from infra.engines.base import ChatRequest, SamplingParams
from infra.engines.embedded import _unpack_mask, row_seed

JUDGE_SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"enum": ["Equal", "Not Equal"]}},
    "required": ["verdict"],
}


def _ask(text: str, **sampling) -> ChatRequest:
    return ChatRequest(({"role": "user", "content": text},), SamplingParams(**sampling))


def test_row_seed_depends_only_on_seed_sample_and_attempt():
    assert row_seed(1, 0, 0) == row_seed(1, 0, 0)
    assert len({row_seed(1, 0, 0), row_seed(1, 1, 0), row_seed(2, 0, 0), row_seed(1, 0, 1)}) == 4


def test_unpack_mask_reads_little_endian_bits():
    mask = _unpack_mask(bytes([0b00000101, 0b10000000]), 16)
    assert mask.tolist() == [True, False, True] + [False] * 12 + [True]


@pytest.fixture(scope="module")
def engine(model_home):
    from infra.engines.embedded import EmbeddedEngine

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOLFORGE_MODELS", str(model_home / "models"))
        yield EmbeddedEngine(batch_size=8, dtype="float32")


@pytest.mark.slow
def test_chat_generation_counts_tokens_and_stops(engine):
    (response,) = engine.generate([_ask("What is 2+3?", max_tokens=32)])
    assert response.ok and "5" in response.text
    completion = response.completions[0]
    assert completion.finish_reason == "stop" and 0 < completion.completion_tokens < 32
    assert response.prompt_tokens > 5 and response.latency_s > 0
    assert engine.identity.startswith("SmolLM2-135M-Instruct@gguf-sha256:")


@pytest.mark.slow
def test_max_tokens_truncates_with_finish_length(engine):
    (response,) = engine.generate([_ask("Write a long story about a dragon.", max_tokens=5)])
    assert response.completions[0].finish_reason == "length"
    assert response.completions[0].completion_tokens == 5


@pytest.mark.slow
def test_seeded_samples_are_reproducible_and_batch_independent(engine):
    sampled = _ask("Name a colour.", temperature=0.9, n=3, seed=7, max_tokens=12)
    other = _ask("Write a haiku about the sea.", temperature=0.9, seed=3, max_tokens=20)
    alone = engine.generate([sampled])[0]
    in_batch = engine.generate([other, sampled, _ask("What is 7*6?", max_tokens=8)])[1]
    assert len(alone.completions) == 3
    assert len({c.text for c in alone.completions}) > 1  # n samples differ from each other
    assert [c.text for c in in_batch.completions] == [c.text for c in alone.completions]
    reseeded = engine.generate(
        [_ask("Name a colour.", temperature=0.9, n=3, seed=8, max_tokens=12)]
    )
    assert [c.text for c in reseeded[0].completions] != [c.text for c in alone.completions]


@pytest.mark.slow
def test_greedy_n_gives_n_copies(engine):
    (response,) = engine.generate([_ask("What is 2+3?", max_tokens=16, n=2)])
    assert len(response.completions) == 2
    assert response.completions[0] == response.completions[1]


@pytest.mark.slow
def test_stop_string_cuts_the_text(engine):
    request = _ask("Count from 1 to 10, separated by commas.", max_tokens=40, stop=("5",))
    (response,) = engine.generate([request])
    completion = response.completions[0]
    assert completion.finish_reason == "stop"
    assert "5" not in completion.text and "4" in completion.text


@pytest.mark.slow
def test_json_schema_judge_output_parses(engine):
    request = ChatRequest(
        (
            {"role": "system", "content": "Answer with JSON only."},
            {"role": "user", "content": "Are these equal? A: 1/2  B: 0.5"},
        ),
        SamplingParams(max_tokens=24),
        json_schema=JUDGE_SCHEMA,
    )
    (response,) = engine.generate([request])
    assert response.ok, response.error
    assert json.loads(response.text)["verdict"] in {"Equal", "Not Equal"}


@pytest.mark.slow
def test_schema_failure_keeps_text_and_sets_error(engine):
    # 3 tokens cannot hold the object: every try is cut short, and the response says so.
    request = ChatRequest(
        ({"role": "user", "content": "Judge."},),
        SamplingParams(max_tokens=3),
        json_schema=JUDGE_SCHEMA,
    )
    (response,) = engine.generate([request])
    assert not response.ok and response.error.startswith("json_schema: sample 0 invalid after 3")
    assert response.text.startswith("{") and response.completions[0].finish_reason == "length"


@pytest.mark.slow
def test_batch_of_mixed_lengths_keeps_order(engine):
    questions = [f"What is {i} + {i}?" for i in range(1, 11)] + ["Explain gravity " * 20]
    responses = engine.generate([_ask(q, max_tokens=16) for q in questions])
    assert len(responses) == 11 and all(r.ok for r in responses)
    alone = engine.generate([_ask(questions[3], max_tokens=16)])[0]
    assert responses[3].text == alone.text
    assert torch.get_num_threads() >= 1
