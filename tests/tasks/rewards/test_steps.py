"""The step segmenter: steps re-join to the text; numbered steps, lines, computed-result
sentences; code blocks and LaTeX never split."""

from __future__ import annotations

import json

import pytest

from tasks.rewards.steps import segment_steps


def check(text: str) -> list[str]:
    steps = segment_steps(text)
    assert "".join(steps) == text
    assert all(s.strip() for s in steps)
    return [s.strip() for s in steps]


def test_numbered_steps_with_continuation_lines_and_answer_line():
    text = (
        "Step 1: The muffins cost 4 * 3 = 12 dollars.\n"
        "   (four muffins at three dollars)\n"
        "Step 2: The cookies cost 5 * 2 = 10 dollars.\n\n"
        "Step 3: Together 12 + 10 = 22.\n"
        "The answer is: 22"
    )
    assert check(text) == [
        "Step 1: The muffins cost 4 * 3 = 12 dollars.\n   (four muffins at three dollars)",
        "Step 2: The cookies cost 5 * 2 = 10 dollars.",
        "Step 3: Together 12 + 10 = 22.",
        "The answer is: 22",
    ]


def test_numbered_steps_run_together_on_one_line():
    # SmolLM2 often writes every step on one line
    assert check("Step 1: 3+4=7. Step 2: 7*2=14. The answer is: 14") == [
        "Step 1: 3+4=7.",
        "Step 2: 7*2=14.",
        "The answer is: 14",
    ]


def test_list_numbering_and_leading_blank_lines():
    text = "  \n1. Compute 2 + 3 = 5.\n2) Double it: 5 * 2 = 10.\n\nThe answer is: 10\n"
    steps = segment_steps(text)
    assert "".join(steps) == text
    assert steps[0].startswith("  \n1.")  # leading whitespace belongs to the first step
    assert [s.strip() for s in steps][1:] == ["2) Double it: 5 * 2 = 10.", "The answer is: 10"]


def test_lines_and_sentences_ending_in_a_computed_result():
    text = (
        "First, the muffins cost 4 * 3 = 12 dollars. Then the cookies cost 5 * 2 = 10 dollars. "
        "So she spends the rest of it. Mr. Smith agrees.\nThe answer is: 22"
    )
    assert check(text) == [
        "First, the muffins cost 4 * 3 = 12 dollars.",
        "Then the cookies cost 5 * 2 = 10 dollars.",
        "So she spends the rest of it. Mr. Smith agrees.",  # no computed result: one step
        "The answer is: 22",
    ]


def test_gsm8k_calculator_annotations_and_decimals():
    text = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May. She sold 48+24 = <<48+24=72>>72 clips "
        "altogether.\nThe price is 2.5 dollars each, 3.5 in May.\n#### 72"
    )
    assert check(text) == [
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.",
        "She sold 48+24 = <<48+24=72>>72 clips altogether.",
        "The price is 2.5 dollars each, 3.5 in May.",
        "#### 72",
    ]


def test_pot_code_block_stays_one_step():
    text = (
        "Let's write a program.\n```python\nx = 1.5\n\n# 1. double it\nprint(x * 2)\n```\n"
        "The answer is 3"
    )
    assert check(text) == [
        "Let's write a program.",
        "```python\nx = 1.5\n\n# 1. double it\nprint(x * 2)\n```",
        "The answer is 3",
    ]


def test_unclosed_code_block_runs_to_the_end():
    text = "Here is code:\n```python\nfor i in range(3):\n    print(i)\n\nprint(2)"
    assert check(text) == [
        "Here is code:",
        "```python\nfor i in range(3):\n    print(i)\n\nprint(2)",
    ]


def test_latex_display_math_and_environments_are_not_split():
    text = (
        "We have $3x - 7 = 11$. Adding 7 gives $3x = 18$. So $x = 6$.\n\n"
        "$$\nx = \\frac{18}{3}\n\n= 6\n$$\n"
        "\\begin{align}\na &= 1. \\\\\nb &= 2.\n\\end{align}\n"
        "Also \\[ y = 2. \\]\nThe answer is: $\\boxed{6}$"
    )
    assert check(text) == [
        "We have $3x - 7 = 11$.",
        "Adding 7 gives $3x = 18$.",
        "So $x = 6$.",
        "$$\nx = \\frac{18}{3}\n\n= 6\n$$",
        "\\begin{align}\na &= 1. \\\\\nb &= 2.\n\\end{align}",
        "Also \\[ y = 2. \\]",
        "The answer is: $\\boxed{6}$",
    ]


def test_inline_math_period_does_not_split():
    # the ". " inside $...$ is not a sentence end
    assert check("Let $a = 5. B = 2$ hold. Then we go on. Done.") == [
        "Let $a = 5. B = 2$ hold.",
        "Then we go on. Done.",
    ]


def test_answer_sentence_inside_a_line_is_its_own_step():
    assert check("She has 3 apples left over. The answer is 3.") == [
        "She has 3 apples left over.",
        "The answer is 3.",
    ]


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t"])
def test_no_visible_text_has_no_steps(text):
    assert segment_steps(text) == []


def test_single_line_without_breaks_is_one_step():
    assert segment_steps("Just one thing") == ["Just one thing"]


def test_windows_line_endings_rejoin():
    check("Step 1: 1 + 1 = 2.\r\nStep 2: 2 + 2 = 4.\r\nThe answer is: 4")


def test_real_reference_solutions_rejoin(shared_data):
    """GSM8K and MATH reference solutions (a sample) re-join; every GSM8K line is a step and
    MATH's one-paragraph prose is cut after sentences that end in a result."""
    for name, field in (("gsm8k/train.jsonl", "answer"), ("math/train.jsonl", "solution")):
        lines = (shared_data / name).read_text(encoding="utf-8").splitlines()[:400]
        several = 0
        for text in (json.loads(line)[field] for line in lines):
            steps = segment_steps(text)
            assert "".join(steps) == text
            assert all(s.strip() for s in steps)
            if name.startswith("gsm8k"):
                assert len(steps) >= len([x for x in text.splitlines() if x.strip()])
            several += len(steps) > 1
        assert several > 0.5 * len(lines), name


def test_messy_outputs_of_the_demo_model():
    """Verbatim SmolLM2-135M solutions from a demo run."""
    repeated_answer = (
        "Step 1: The bakery sells 4 muffins and has 2 cookies.\n"
        "Step 2: The bakery sells 4 muffins and has 2 cookies.\n"
        "Step 3: The bakery sells 4 cookies and has 2 muffins.\n"
        "The answer is: 4 + 2 = 6.\nThe answer is: 6"
    )
    assert len(check(repeated_answer)) == 5  # each answer line is a step of its own
    continuation = (
        "Step 1: The total distance traveled is 2.5 + 1.5 = 4.0 miles.\n"
        "Step 2: To convert it to miles, we multiply by 1.5.\n"
        "So, 4.0 miles is equal to 0.25 miles.\nThe answer is: 0.25"
    )
    assert check(continuation)[1] == (
        "Step 2: To convert it to miles, we multiply by 1.5.\nSo, 4.0 miles is equal to 0.25 miles."
    )
    latex = "Step 1: The equation is $x - 7 = 11$, so $x = 17.$\nStep 2: The answer is $x = 17$.\nThe answer is: $x = 17$"
    assert check(latex) == [
        "Step 1: The equation is $x - 7 = 11$, so $x = 17.$",
        "Step 2: The answer is $x = 17$.",
        "The answer is: $x = 17$",
    ]


def test_pot_completion_with_prose_around_the_program():
    text = (
        "Here is a program that solves it:\n\n```python\ndef cost(n):\n    return 3 * n\n\n"
        "print(cost(4) + 5 * 2)\n```\n\nIt prints 22. The answer is 22."
    )
    assert check(text) == [
        "Here is a program that solves it:",
        "```python\ndef cost(n):\n    return 3 * n\n\nprint(cost(4) + 5 * 2)\n```",
        "It prints 22.",
        "The answer is 22.",
    ]
