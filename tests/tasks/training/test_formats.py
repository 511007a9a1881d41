"""The shared text formats: Alpaca prompts, answer lines, the split."""

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
