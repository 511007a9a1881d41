"""Scripted judges and small frames shared by the reward tests."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import polars as pl

from infra.engines.base import ChatRequest
from tests.fakes import last_user_message


def listed_siblings(request: ChatRequest) -> list[tuple[str, str]]:
    """(label, text) of the siblings in a rank_siblings prompt, in presentation order."""
    text = last_user_message(request)
    body = text.split("New problems:\n", 1)[1].rsplit("\n\nReply with", 1)[0]
    return re.findall(r"\[([A-Z])\] (.*?)(?=\n\n\[[A-Z]\] |\Z)", body, re.DOTALL)


def ranking_reply(score: Callable[[str, int], int]) -> Callable[[ChatRequest, int], str]:
    """A judge that gives every listed sibling `score(text, position)` on all criteria."""

    def reply(request: ChatRequest, _: int) -> str:
        out = {}
        for position, (label, text) in enumerate(listed_siblings(request)):
            s = score(text, position)
            out[label] = {
                "definition": s,
                "precision": s,
                "integrity": s,
                "reason": f"scored {s}",
            }
        return json.dumps(out)

    return reply


def tagged_steps(request: ChatRequest) -> list[str]:
    """The steps of a judge_steps prompt."""
    return re.findall(r"<step_\d+>\n(.*?)\n</step_\d+>", last_user_message(request), re.DOTALL)


def first_error_reply(request: ChatRequest, _: int) -> str:
    """A step judge that flags the first step containing WRONG (-1 when none)."""
    steps = tagged_steps(request)
    first = next((i for i, s in enumerate(steps) if "WRONG" in s), -1)
    return json.dumps({"reason": "checked", "first_error_step": first})


def instructions_frame() -> pl.DataFrame:
    """Two seeds; seed a has two round-1 evolutions and one round-2; seed b one round-1."""
    rows = [
        ("a", None, "a", 0, "seed", None, "What is 2 + 3?"),
        ("b", None, "b", 0, "seed", None, "What is 10 - 4?"),
        ("a1", "a", "a", 1, "upward", "add_constraints", "What is 2 + 3 + 4?"),
        ("a1x", "a", "a", 1, "downward", "simplify", "What is 2 + 2?"),
        ("b1", "b", "b", 1, "upward", "concretize", "Tom has 10 apples and eats 4. How many?"),
        ("a2", "a1", "a", 2, "upward", "increase_reasoning", "What is (2 + 3 + 4) * 2?"),
    ]
    return pl.DataFrame(
        rows,
        schema=["id", "parent_id", "root_id", "round", "direction", "op", "text"],
        orient="row",
    ).with_columns(pl.lit("scripted").alias("model"), pl.lit("v").alias("template_version"))


SOLUTION_COLUMNS = {
    "id": pl.String,
    "instruction_id": pl.String,
    "kind": pl.String,
    "sample": pl.Int64,
    "text": pl.String,
    "program": pl.String,
    "program_stdout": pl.String,
    "program_error": pl.String,
    "extracted_answer": pl.String,
}


def solutions_frame() -> pl.DataFrame:
    """Solutions of the instructions in `instructions_frame` (seed a's reference answer is 5)."""
    rows = [
        ("a:0", "a", "cot", 0, "Step 1: 2 + 3 = 5.\nThe answer is: 5", None, None, None, "5"),
        ("a:1", "a", "cot", 1, "Step 1: 2 + 3 = 6 WRONG.\nThe answer is: 6", None, None, None, "6"),
        ("a:2", "a", "pot", 2, "```python\nprint(5)\n```", "print(5)", "5\n", None, "5"),
        ("a:3", "a", "pot", 3, "```python\nprint(1 / 0)\n```", "print(1 / 0)", "", "error", None),
        ("b:0", "b", "cot", 0, None, None, None, None, None),  # the engine failed
        ("b:1", "b", "pot_fallback_cot", 1, "10 - 4 = 6.\nThe answer is: 6", None, None, None, "6"),
        ("a1:0", "a1", "cot", 0, "2 + 3 = 5. 5 + 4 = 9.\nThe answer is: 9", None, None, None, "9"),
        ("a1:1", "a1", "cot", 1, "2 + 3 + 4 = 9.\nSo 9.", None, None, None, None),
        ("a1x:0", "a1x", "cot", 0, "2 + 2 = 4.\nThe answer is: 4", None, None, None, "4"),
        ("b1:0", "b1", "cot", 0, "He eats 4.\nThe answer is: 6", None, None, None, "6"),
        ("a2:0", "a2", "pot", 0, "```python\nprint(18)\n```", "print(18)", "18\n", None, "18"),
    ]
    return pl.DataFrame(rows, schema=SOLUTION_COLUMNS, orient="row")


def answers_frame() -> pl.DataFrame:
    """Majority answers: a1 and a2 verified, a1x and b1 not; the seeds use their references."""
    rows = [
        ("a", "5", True),
        ("b", "6", True),
        ("a1", "9", True),
        ("a1x", "4", False),
        ("b1", None, False),
        ("a2", "18", True),
    ]
    return pl.DataFrame(rows, schema=["instruction_id", "answer", "verified"], orient="row")


def seeds_frame() -> pl.DataFrame:
    return pl.DataFrame({"id": ["a", "b"], "answer": ["5", "6"]})
