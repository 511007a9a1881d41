"""The shared text formats: Alpaca prompts, answer lines, step joins, IRM inputs, the split."""

from __future__ import annotations

import pytest

from tasks.training import formats


def test_alpaca_prompt_is_wizardmath_with_the_trigger():
    prompt = formats.alpaca_prompt("  What is 2 + 3?\n")
    assert prompt.startswith("Below is an instruction that describes a task. Write a response")
    assert "\n\n### Instruction:\nWhat is 2 + 3?\n\n### Response:" in prompt
    assert prompt.endswith("### Response: Let's think step by step.")
    assert formats.alpaca_prompt("Q?", formats.POT_TRIGGER).endswith(
        "### Response: Let's write a program."
    )
    assert formats.alpaca_prompt("Q?", None).endswith("### Response:")


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ("Step 1: 2 + 3 = 5.", "5", "Step 1: 2 + 3 = 5.\nThe answer is: 5"),
        ("Step 1: 5.\nThe answer is: 5\nThanks for asking!", "5", "Step 1: 5.\nThe answer is: 5"),
        ("  So the answer is 7.  ", "7", "So the answer is 7."),
    ],
)
def test_with_answer_line_ends_on_the_final_line(text, answer, expected):
    assert formats.with_answer_line(text, answer) == expected


def test_join_steps_rejoins_exact_slices_and_separates_stripped_steps():
    prompt = "P: go."
    text, ends = formats.join_steps(prompt, ["\nStep 1: a.", "\nStep 2: b.\n"])
    assert text == "P: go.\nStep 1: a.\nStep 2: b.\n"
    assert [text[e] for e in ends] == [".", "."]
    assert text[: ends[0] + 1].endswith("Step 1: a.")
    text, ends = formats.join_steps(prompt, ["Step 1: a.", "Step 2: b."])
    assert text == "P: go.\nStep 1: a.\nStep 2: b."
    assert text[: ends[1] + 1] == text
    _, ends = formats.join_steps(prompt, ["Step 1: a.", "   "])
    assert ends[1] == -1  # a step with nothing visible has no token to carry its label


def test_irm_text_is_prompt_then_instruction():
    assert formats.irm_text(" Evolved? ", "Parent?") == formats.irm_prompt("Parent?") + "Evolved?"
    assert formats.NO_PARENT in formats.irm_prompt(None)
    assert formats.irm_prompt("P").endswith("### Evolved instruction:\n")


def test_held_out_roots_are_stable_and_never_empty_or_everything():
    roots = [f"seed-{i}" for i in range(200)]
    test = formats.held_out_roots(roots, 0.2, seed=0)
    assert 20 < len(test) < 60  # about a fifth
    assert formats.held_out_roots(reversed(roots), 0.2, seed=0) == test  # order does not matter
    assert formats.held_out_roots(roots, 0.2, seed=1) != test
    # Adding roots does not move the others across the line (a hash per root).
    more = formats.held_out_roots([*roots, "new-a", "new-b"], 0.2, seed=0)
    assert more - {"new-a", "new-b"} == test
    # Tiny runs still have both sides; fractions 0 and 1 are what they say.
    assert len(formats.held_out_roots(["a", "b"], 0.01)) == 1
    assert len(formats.held_out_roots(["a", "b"], 0.99)) == 1
    assert formats.held_out_roots(roots, 0.0) == frozenset()
    assert formats.held_out_roots(roots, 1.0) == frozenset(roots)
    with pytest.raises(ValueError, match="test fraction"):
        formats.held_out_roots(roots, 1.5)
