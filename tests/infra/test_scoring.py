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
