"""Finding the program in a PoT completion."""

from __future__ import annotations

import pytest

from tasks.solutions.programs import extract_program


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Here:\n```python\nx = 2\nprint(x * 3)\n```\nDone.", "x = 2\nprint(x * 3)"),
        ("```python\nbad syntax (\n```\n```python\nprint(1)\n```", "print(1)"),
        ("```python\nprint(7)\n", "print(7)"),  # cut at the token limit, fence never closed
        (
            "Let me compute.\nimport math\nprint(math.factorial(4))",
            "import math\nprint(math.factorial(4))",
        ),
        ("```python\nanswer = 3 + 4\n```", "answer = 3 + 4\nprint(answer)"),
        ("```python\nx = 3\n```", None),  # no print and no answer variable
        ("The answer is 5.", None),
        (None, None),
    ],
)
def test_extract_program(text, expected):
    assert extract_program(text) == expected
