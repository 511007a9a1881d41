"""What the IRM reads (the rendered parent, then the instruction) and the pair scorer over a
text scorer; the training formats re-export the same functions."""

from __future__ import annotations

import pytest

from tasks.evolution import instruction_reward as ir


def test_irm_text_is_prompt_then_instruction():
    assert ir.irm_text(" Evolved? ", "Parent?") == ir.irm_prompt("Parent?") + "Evolved?"
    assert ir.NO_PARENT in ir.irm_prompt(None)
    assert ir.irm_prompt("P").endswith("### Evolved instruction:\n")


def test_the_training_formats_render_the_same_irm_text():
    from tasks.training import formats

    assert formats.irm_prompt is ir.irm_prompt and formats.irm_text is ir.irm_text


class _Texts:
    """A text scorer that records what it was given: logit = text length."""

    def __init__(self):
        self.seen: list[str] = []

    def logits(self, texts):
        self.seen.extend(texts)
        return [float(len(t)) for t in texts]

    def scores(self, texts):
        self.seen.extend(texts)
        return [0.5 for _ in texts]


def test_pairs_are_scored_on_their_irm_text():
    texts = _Texts()
    reward = ir.InstructionReward(texts)
    assert reward.scores(["A?", "B?"], ["P?", None]) == [0.5, 0.5]
    assert texts.seen == [ir.irm_text("A?", "P?"), ir.irm_text("B?", None)]
    assert reward.logits(["A?"], ["P?"]) == [float(len(ir.irm_text("A?", "P?")))]
    with pytest.raises(ValueError, match="2 instructions vs 1 parents"):
        reward.scores(["A?", "B?"], ["P?"])
