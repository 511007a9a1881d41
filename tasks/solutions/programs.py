"""Program-of-thought programs: finding the program in a completion, and reading its run.

MAmmoTH's PoT rationales are Python programs whose printed output is the answer. Programs run
only through `infra.sandbox`; this module finds them in completions and says why a run gave no
usable answer.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Protocol

from tasks.solutions.answers import extract_program_answer


class ProgramRunner(Protocol):
    """What solution writers need from `infra.sandbox.Sandbox`."""

    def run_many(self, programs: list[str]) -> list[Any]: ...


_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


_CODE_LINE = re.compile(
    r"^(?:import |from \w|def |class |for |while |if |print\(|[A-Za-z_]\w*\s*(?:,\s*[A-Za-z_]\w*\s*)*[+\-*/]?=)"
)


_ANSWER_NAMES = ("answer", "ans", "result", "solution")


def _compiles(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def extract_program(text: str | None) -> str | None:
    """The Python program in a PoT completion, or None.

    The last ```python fenced block that parses (an unclosed final fence counts, since
    generation may stop at the token limit), else the raw text from its first code-looking line
    if that parses. A program that prints nothing but assigns `answer`/`ans`/`result` gets a
    final `print` of that variable, as MAmmoTH's programs conventionally end that way.
    """
    if not text:
        return None
    blocks = [b.strip("\n") for b in _FENCE.findall(text)]
    code = next((b for b in reversed(blocks) if b.strip() and _compiles(b)), None)
    if code is None and not blocks:
        lines = text.strip("\n").splitlines()
        start = next((i for i, line in enumerate(lines) if _CODE_LINE.match(line)), None)
        if start is not None:
            candidate = "\n".join(lines[start:])
            code = candidate if _compiles(candidate) else None
    if code is None:
        return None
    if "print(" not in code:
        tree = ast.parse(code)
        assigned = {
            t.id
            for node in tree.body
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        name = next((n for n in _ANSWER_NAMES if n in assigned), None)
        if name is None:
            return None
        code = f"{code.rstrip()}\nprint({name})"
    return code


def program_failure(result: Any) -> str | None:
    """Why a sandbox run gives no usable answer, or None when it printed one."""
    if getattr(result, "error", None):
        return f"sandbox error: {result.error}"
    if result.timed_out:
        return "timed out"
    if getattr(result, "killed_by_limit", None):
        return f"killed by {result.killed_by_limit} limit"
    if not result.ok:
        tail = (result.stderr_tail or "").strip().splitlines()
        return f"exit code {result.exit_code}: {tail[-1] if tail else 'no stderr'}"
    if not (result.stdout or "").strip():
        return "printed nothing"
    if extract_program_answer(result.stdout) is None:
        return "no answer in output"
    return None
