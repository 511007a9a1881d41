"""What the instruction reward model (IRM) reads, and its scores of (instruction, parent) pairs.

The IRM reads the template `irm.txt` rendered with the parent instruction (`irm_prompt`), then
the evolved instruction (`irm_text`): trl's RewardTrainer concatenates the IRM set's `prompt` and
`chosen`/`rejected` columns the same way. The format lives here, beside the evolutions the IRM
judges and below training, because Active Evol-Instruct's elimination (a data stage) scores
evolutions with a trained IRM; the IRM set (`tasks.training.formats` re-exports `irm_prompt`),
the IRM's held-out accuracy and the RL reward score the same text through `InstructionReward`.
The model itself runs in `infra.scoring.IrmScorer`, which scores full texts.
"""

from __future__ import annotations

from collections.abc import Sequence

from infra.scoring import IrmScorer
from tasks.templates import load_template

IRM_TEMPLATE = "irm"
NO_PARENT = "(none: a seed problem)"


def irm_prompt(parent: str | None) -> str:
    """What the IRM reads before the instruction it scores: the parent it was evolved from."""
    rendered = load_template(IRM_TEMPLATE).render(parent=(parent or NO_PARENT).strip())
    return rendered.rstrip("\n") + "\n"


def irm_text(instruction: str, parent: str | None) -> str:
    """The full IRM input, as trl's RewardTrainer builds it from `prompt` + `chosen`."""
    return irm_prompt(parent) + instruction.strip()


class InstructionReward:
    """A trained IRM on (instruction, parent) pairs: `logits` (raw) and `scores` (in (0, 1))."""

    def __init__(self, scorer: IrmScorer):
        self.scorer = scorer

    def texts(self, instructions: Sequence[str], parents: Sequence[str | None]) -> list[str]:
        if len(instructions) != len(parents):
            raise ValueError(f"{len(instructions)} instructions vs {len(parents)} parents")
        return [irm_text(i, p) for i, p in zip(instructions, parents, strict=True)]

    def logits(self, instructions: Sequence[str], parents: Sequence[str | None]) -> list[float]:
        return self.scorer.logits(self.texts(instructions, parents))

    def scores(self, instructions: Sequence[str], parents: Sequence[str | None]) -> list[float]:
        return self.scorer.scores(self.texts(instructions, parents))
