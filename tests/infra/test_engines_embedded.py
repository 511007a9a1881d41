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


# -- speed machinery: pure helpers ----------------------------------------------------------


def test_auto_threads_uses_the_usable_cpus_unless_others_are_busy(monkeypatch):
    import infra.engines.cpu as cpu
    import infra.engines.embedded as embedded

    assert embedded.auto_threads(others=1.3, cpus=2) == 1
    assert embedded.auto_threads(others=0.1, cpus=2) == 2
    assert embedded.auto_threads(others=4.0, cpus=1) == 1  # one CPU: nothing to give up
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 3)  # e.g. taskset -c 0-2
    assert embedded.auto_threads(others=0.2) == 3


def test_contention_does_not_count_this_process_own_work():
    from infra.engines.cpu import Contention

    # (machine busy ticks, this process's ticks) at 100 ticks a second, one second apart
    looks = iter([(1000, 400), (1000, 400), (1200, 600), (1350, 650)])
    times = iter([0.0, 1.0, 2.0, 3.0])
    probe = Contention(0.0, read=lambda: next(looks), clock=lambda: next(times), hz=100)
    assert probe.others() == 0.0  # first look: nothing else ran
    assert probe.others() == 0.0  # two busy cores, both of them this process
    assert probe.others() == 1.0  # 150 ticks busy, 50 of them ours: one other core


def test_common_prefix_counts_equal_leading_tokens():
    from infra.engines.embedded import _common_prefix

    assert _common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert _common_prefix([1, 2], [1, 2, 3]) == 2
    assert _common_prefix([5], [1]) == 0


def test_stop_in_tail_sees_only_recent_text():
    from infra.engines.embedded import _stop_in_tail

    def decode(tokens):
        return "".join(chr(ord("a") + t) for t in tokens)

    tokens = [0] * 40 + [25, 25]  # "aaaa...zz"
    assert _stop_in_tail(decode, tokens, ("zz",))
    assert not _stop_in_tail(decode, tokens, ("xy",))
    # "b" long ago is outside the window of 4 * len("b") + 8 tokens: already handled then.
    assert not _stop_in_tail(decode, [1] + [0] * 40, ("b",))


def _full_sort_top_p(probs, top_p):
    sorted_probs, order = torch.sort(probs, descending=True)
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs[drop] = 0.0
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 50.0])  # 50: flat, nucleus past 512 words
def test_top_p_matches_a_full_sort(temperature):
    from infra.engines.embedded import _top_p

    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(5000, generator=generator) * 8 / temperature, dim=-1)
    for top_p in (0.5, 0.9, 0.95):
        expected = _full_sort_top_p(probs.clone(), top_p)
        got = _top_p(probs, top_p)
        assert torch.equal(got > 0, expected > 0)
        assert torch.allclose(got, expected)
    assert _top_p(probs, 1.0) is probs


def test_preallocated_layer_matches_concatenation():
    from transformers.cache_utils import DynamicLayer

    from infra.engines.embedded import _Cursor, _PreallocatedLayer

    generator = torch.Generator().manual_seed(1)

    def kv(rows, length):
        return (
            torch.randn(rows, 3, length, 4, generator=generator),
            torch.randn(rows, 3, length, 4, generator=generator),
        )

    cursor = _Cursor()
    layer, reference = _PreallocatedLayer(capacity=10, cursor=cursor), DynamicLayer()
    keys, values = kv(1, 3)  # a shared prefix of 3 columns, one row
    layer.update(keys, values)
    reference.update(keys, values)
    layer.expand_batch(2)
    reference.batch_repeat_interleave(2)
    keys, values = kv(2, 2)  # both rows append a block of two columns
    got, expected = layer.update(keys, values), reference.update(keys, values)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    # A decode step: each row writes its own column; the view grows to the furthest one.
    cursor.positions, cursor.length = torch.tensor([5, 3]), 6
    keys, values = kv(2, 1)
    got_keys, got_values = layer.update(keys, values)
    assert got_keys.shape == (2, 3, 6, 4) and layer.get_seq_length() == 6
    assert torch.equal(got_keys[0, :, 5], keys[0, :, 0])
    assert torch.equal(got_values[1, :, 3], values[1, :, 0])
    assert torch.equal(got_keys[:, :, :3], expected[0][:, :, :3])
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.keys.shape == (1, 3, 6, 4)
    assert torch.equal(layer.keys[0, :, 3], keys[1, :, 0])
    with pytest.raises(RuntimeError, match="KV cache full"):
        cursor.positions = None
        layer.update(*kv(1, 5))


# -- speed machinery: with the model ---------------------------------------------------------


def _few_shot(question: str, **sampling) -> ChatRequest:
    from tasks.templates import render_messages

    messages = render_messages("cot_fewshot", instruction=question)
    return ChatRequest(tuple(messages), SamplingParams(**sampling))


@pytest.mark.slow
def test_few_shot_prefix_is_shared_and_changes_nothing(engine, monkeypatch):
    import infra.engines.embedded as embedded

    requests = [
        _few_shot("What is 15 + 27?", max_tokens=12),
        _few_shot(
            "A train travels 60 miles per hour for 3 hours. How far does it go?", max_tokens=12
        ),
        _few_shot("What is 9 * 8?", temperature=0.8, seed=5, max_tokens=12),
    ]
    ids, prefix = engine._encode(requests[0])
    assert prefix > 300 and ids[:prefix] == engine._encode(requests[1])[0][:prefix]
    assert engine._encode(_ask("Hi"))[1] == 0  # one message: no prefix
    shared = engine.generate(requests)
    monkeypatch.setattr(embedded, "MIN_SHARED_PREFIX", 10**9)
    assert engine._encode(requests[0])[1] == 0
    unshared = engine.generate(requests)
    assert all(r.ok for r in shared)
    assert [r.text for r in shared] == [r.text for r in unshared]
    monkeypatch.undo()
    alone = engine.generate([requests[2]])[0]
    assert alone.text == shared[2].text


@pytest.mark.slow
def test_small_prefix_groups_share_one_batch_and_change_nothing(engine, monkeypatch):
    """Requests with different few-shot prefixes, one of each (evolve: a template per
    operation), are decoded in one batch without a shared prefix, not one batch per prefix;
    their texts are those each gives decoded alone (with its prefix shared)."""
    from tasks.templates import render_messages

    question = "What is 15 + 27?"
    requests = [
        _few_shot(question, max_tokens=12),
        ChatRequest(
            tuple(render_messages("pot", instruction=question)), SamplingParams(max_tokens=12)
        ),
    ]
    assert all(engine._encode(r)[1] > 0 for r in requests)
    calls = []
    decode = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda b, r, s: (calls.append(s), decode(b, r, s)))
    together = engine.generate(requests)
    assert calls == [0]  # one batch, no shared prefix
    calls.clear()
    alone = [engine.generate([r])[0] for r in requests]
    assert len(calls) == 2 and all(s > 0 for s in calls)
    assert all(r.ok for r in together)
    assert [r.text for r in together] == [r.text for r in alone]


@pytest.mark.slow
def test_stop_string_cuts_at_first_occurrence_in_long_output(engine):
    request = _ask("Count from 1 to 30, separated by commas.", max_tokens=80, stop=("12",))
    (response,) = engine.generate([request])
    completion = response.completions[0]
    assert completion.finish_reason == "stop"
    assert "12" not in completion.text and "11" in completion.text


@pytest.mark.slow
def test_threads_follow_the_load_when_not_fixed(engine, monkeypatch):
    import infra.engines.embedded as embedded

    assert engine.num_threads >= 1
    before, auto = torch.get_num_threads(), engine._auto_threads
    engine._auto_threads = True
    try:
        monkeypatch.setattr(embedded, "auto_threads", lambda: 1)
        engine.generate([_ask("Hi", max_tokens=2)])
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(embedded, "auto_threads", lambda: 2)
        engine.generate([_ask("Hi", max_tokens=2)])
        assert torch.get_num_threads() == 2
    finally:
        engine._auto_threads = auto
        torch.set_num_threads(before)


@pytest.mark.slow
def test_auto_dtype_follows_the_cpu_and_names_its_precision(model_home, monkeypatch, caplog):
    import logging

    import infra.engines.cpu as cpu
    from infra.engines.embedded import EmbeddedEngine

    monkeypatch.setenv("EVOLFORGE_MODELS", str(model_home / "models"))
    reference = None
    for flags, expected in (("avx2 fma", "float32"), ("avx2 avx512f avx512_bf16", "bfloat16")):
        fake = cpu.CpuInfo("Faked CPU", frozenset(flags.split()))
        monkeypatch.setattr("infra.engines.embedded.read_cpu_info", lambda fake=fake: fake)
        with caplog.at_level(logging.INFO, logger="evolforge.engines"):
            engine = EmbeddedEngine(batch_size=4, dtype="auto")
        assert engine.dtype == expected
        assert next(engine.model.parameters()).dtype == getattr(torch, expected)
        assert any(
            f"torch {expected}" in r.getMessage() and "Faked CPU" in r.getMessage()
            for r in caplog.records
        )
        if expected == "float32":
            reference = engine.identity
        else:
            # Another precision gives other outputs: its cached responses must not be shared.
            assert engine.identity == reference + "+torch-bfloat16"
        (response,) = engine.generate([_ask("What is 2+3?", max_tokens=8)])
        assert response.ok and response.completions[0].completion_tokens > 0


@pytest.mark.slow
def test_a_raw_prompt_skips_the_chat_template(engine):
    prompt = "Below is an instruction.\n\n### Instruction:\nWhat is 2+3?\n\n### Response:"
    raw = ChatRequest(
        ({"role": "user", "content": prompt},), SamplingParams(max_tokens=8), raw=True
    )
    ids, prefix = engine._encode(raw)
    assert ids == list(engine.tokenizer(prompt)["input_ids"]) and prefix == 0
    chat_ids, _ = engine._encode(ChatRequest(({"role": "user", "content": prompt},)))
    assert len(chat_ids) > len(ids)  # the chat template adds its role markers
    (response,) = engine.generate([raw])
    assert response.ok and response.prompt_tokens == len(ids)
