"""The text formats every training set and trainer shares, written once.

- **Prompts** are WizardMath's Alpaca prompt (template `alpaca.txt`): "Below is an instruction
  that describes a task. ... ### Instruction: {instruction} ### Response:" followed by a trigger,
  " Let's think step by step." for chain-of-thought and " Let's write a program." for
  program-of-thought (MAmmoTH). The SFT set, the PRM steps, the RL prompts and the model-backed
  reward all render prompts here, so a model is scored on the text it was trained on.
- **Answers** end with WizardMath's final line "The answer is: X" (`with_answer_line`).
- **Steps** are joined after the prompt by `infra.scoring.join_steps`, which also says where
  each step ends (the PRM puts its label on the token holding a step's last visible character).
- **IRM inputs** are the template `irm.txt` (the parent instruction) followed by the evolved
  instruction (`irm_prompt`, `irm_text`): written in `tasks.evolution.instruction_reward`, below
  training, because elimination scores evolutions with a trained IRM; re-exported here.
- **Held-out roots**: a seed and every instruction evolved from it fall on the same side of the
  split (`held_out_roots`), in every training set, because all of them draw from one hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from tasks.evolution.instruction_reward import NO_PARENT as NO_PARENT
from tasks.evolution.instruction_reward import irm_prompt as irm_prompt
from tasks.evolution.instruction_reward import irm_text as irm_text
from tasks.solutions.answers import extract_answer_is
from tasks.templates import load_template

ALPACA_TEMPLATE = "alpaca"
COT_TRIGGER = "Let's think step by step."
POT_TRIGGER = "Let's write a program."
ANSWER_PREFIX = "The answer is: "


def alpaca_prompt(instruction: str, trigger: str | None = COT_TRIGGER) -> str:
    """WizardMath's Alpaca prompt for an instruction, ending with "### Response:" + trigger."""
    text = load_template(ALPACA_TEMPLATE).render(
        instruction=instruction.strip(), trigger=f" {trigger.strip()}" if trigger else ""
    )
    return text.rstrip("\n")


def with_answer_line(text: str, answer: str) -> str:
    """The solution ending on its "The answer is: X" line (anything after it is cut), or with
    that line added (X = `answer`) when the text states none."""
    body = text.strip()
    if extract_answer_is(body) is not None:
        lines = body.splitlines()
        for i in range(len(lines) - 1, -1, -1):
            if extract_answer_is(lines[i]) is not None:
                return "\n".join(lines[: i + 1]).strip()
    return f"{body}\n{ANSWER_PREFIX}{answer.strip()}"


def pot_completion(program: str) -> str:
    """A program-of-thought rationale: the program in a fenced block (MAmmoTH)."""
    return f"```python\n{program.strip()}\n```"


def _unit_hash(root: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{root}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def held_out_roots(roots: Iterable[str], fraction: float, seed: int = 0) -> frozenset[str]:
    """The root seeds whose lineages form the test split: those whose seeded hash is below
    `fraction`. With two roots or more and 0 < fraction < 1, each side gets at least one root
    (the lowest hash goes to test, the highest to train), so a tiny run still has both.

    Call it with every root (the seeds), not the roots of one training set: then each set
    draws the same line and no seed's lineage is on both sides of any two sets.
    """
    unique = sorted({r for r in roots if r is not None})
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"test fraction must be in [0, 1], got {fraction}")
    hashes = {r: _unit_hash(r, seed) for r in unique}
    test = {r for r in unique if hashes[r] < fraction}
    if len(unique) >= 2 and 0.0 < fraction < 1.0:
        ordered = sorted(unique, key=lambda r: hashes[r])
        test.add(ordered[0])
        test.discard(ordered[-1])
    return frozenset(test)
