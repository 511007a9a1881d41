"""Scoring with trained reward models: step joins and label placement, the IRM on full texts
(eos added, sigmoid of the logit), the PRM's first errors."""

from __future__ import annotations

import math

import pytest

from infra.scoring import IrmScorer, PrmScorer, encode_steps, join_steps

PROMPT = "Below is an instruction. ### Instruction:\nTom buys 4 pens at 3 dollars each.\n"
STEPS = ["Step 1: 4 * 3 = 12.", "Step 2: He pays 12 dollars.", "The answer is: 12"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tasks.training.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_join_steps_rejoins_exact_slices_and_separates_stripped_steps():
    prompt = "P: go."
    text, ends = join_steps(prompt, ["\nStep 1: a.", "\nStep 2: b.\n"])
    assert text == "P: go.\nStep 1: a.\nStep 2: b.\n"
    assert [text[e] for e in ends] == [".", "."]
    assert text[: ends[0] + 1].endswith("Step 1: a.")
    text, ends = join_steps(prompt, ["Step 1: a.", "Step 2: b."])
    assert text == "P: go.\nStep 1: a.\nStep 2: b."
    assert text[: ends[1] + 1] == text
    _, ends = join_steps(prompt, ["Step 1: a.", "   "])
    assert ends[1] == -1  # a step with nothing visible has no token to carry its label


def test_steps_cut_off_by_max_length_have_no_position(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    full = encode_steps(tokenizer, PROMPT, STEPS, [True] * 3)
    cut = encode_steps(tokenizer, PROMPT, STEPS, [True] * 3, max_length=full["positions"][1])
    assert cut["positions"][0] == full["positions"][0]
    assert cut["positions"][1:] == [None, None]


def test_irm_scores_the_text_followed_by_eos(tiny):
    import torch

    scorer = IrmScorer.load(tiny, batch_size=1)
    texts = ["What is 2 + 3?", "What is 2 + 3 + 4, then doubled?"]
    logits = scorer.logits(texts)
    tokenizer = scorer.tokenizer
    for text, logit in zip(texts, logits, strict=True):
        with torch.no_grad():
            alone = scorer.model(**tokenizer(text + tokenizer.eos_token, return_tensors="pt"))
        assert logit == pytest.approx(float(alone.logits[0, 0]), abs=1e-5)
    # Batched with padding (right side): the classifier still reads each text's last token.
    scorer.batch_size = 2
    assert scorer.logits(texts) == pytest.approx(logits, abs=1e-5)
    assert scorer.scores(texts) == pytest.approx([1 / (1 + math.exp(-v)) for v in logits])


class _FixedPrm(PrmScorer):
    """Probabilities by step text: a step containing 'wrong' is judged wrong."""

    def __init__(self):
        """No model to load: `step_probabilities` below stands in for it."""

    def step_probabilities(self, prompts, steps):
        return [
            [0.1 if "wrong" in s else (None if s == "cut" else 0.9) for s in ss] for ss in steps
        ]


def test_first_errors():
    scorer = _FixedPrm()
    got = scorer.first_errors(["p"] * 3, [["ok", "wrong", "wrong"], ["ok", "ok"], ["cut", "wrong"]])
    assert got[0] == 1 and got[1] is None and math.isnan(got[2])


def test_on_cpu_scorers_load_in_float32_on_the_cpu_and_score_as_before(tiny, monkeypatch):
    import torch

    import infra.scoring as scoring

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert scoring.scoring_placement() == ("cpu", "float32")
    # The tiny checkpoint has no head: every load seeds its random init alike.
    torch.manual_seed(0)
    irm = IrmScorer.load(tiny, batch_size=1)
    torch.manual_seed(0)
    prm = PrmScorer.load(tiny, batch_size=1)
    for scorer in (irm, prm):
        weight = next(scorer.model.parameters())
        assert (weight.device.type, weight.dtype) == ("cpu", torch.float32)
    # The scores: those of the checkpoint loaded as before (float32, no placement).
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    torch.manual_seed(0)
    plain_irm = IrmScorer(
        scoring.load_model(AutoModelForSequenceClassification, str(tiny), irm.tokenizer),
        irm.tokenizer,
    )
    texts = ["What is 2 + 3?", "Tom buys 4 pens."]
    assert irm.logits(texts) == pytest.approx(plain_irm.logits(texts), abs=1e-6)
    assert all(type(v) is float for v in irm.scores(texts))
    torch.manual_seed(0)
    plain_prm = PrmScorer(
        scoring.load_model(AutoModelForTokenClassification, str(tiny), prm.tokenizer),
        prm.tokenizer,
    )
    got = prm.step_probabilities([PROMPT], [STEPS])
    assert got[0] == pytest.approx(plain_prm.step_probabilities([PROMPT], [STEPS])[0], abs=1e-6)
    assert all(type(v) is float for v in got[0])


class _Placed:
    """What a model was loaded with and moved to (no GPU needed)."""

    def __init__(self, kwargs):
        self.kwargs = kwargs
        self.moved_to: list = []
        self.config = type("Config", (), {})()

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        return cls(kwargs)

    def to(self, device):
        self.moved_to.append(device)
        return self

    def eval(self):
        return self


@pytest.mark.parametrize("bf16", [True, False])
def test_with_a_gpu_scorers_ask_for_cuda_and_bf16_where_it_has_it(tiny, monkeypatch, bf16):
    import torch
    import transformers

    import infra.scoring as scoring

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    assert scoring.scoring_placement() == ("cuda", str(dtype).removeprefix("torch."))
    monkeypatch.setattr(transformers, "AutoModelForSequenceClassification", _Placed)
    monkeypatch.setattr(transformers, "AutoModelForTokenClassification", _Placed)
    for scorer in (IrmScorer.load(tiny), PrmScorer.load(tiny)):
        assert scorer.model.kwargs == {"dtype": dtype}
        assert scorer.model.moved_to == ["cuda"]
    # A setting overrides auto; cached IRMs are kept apart by placement.
    forced = IrmScorer.load(tiny, device="cpu", dtype="float32")
    assert forced.model.kwargs == {"dtype": torch.float32} and forced.model.moved_to == ["cpu"]
    a = IrmScorer.cached(tiny, 64, device="cuda", dtype="bfloat16")
    assert a is IrmScorer.cached(tiny, 64, device="cuda", dtype="bfloat16")
    assert a is not IrmScorer.cached(tiny, 64, device="cpu", dtype="float32")
    scoring._loaded.clear()


def test_a_cuda_device_without_a_gpu_is_a_clear_error(monkeypatch):
    import torch

    from infra.scoring import scoring_placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        scoring_placement("cuda")
