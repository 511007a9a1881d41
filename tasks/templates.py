"""Prompt templates: plain-text files in `tasks/prompts/`, versioned by their content.

A template's version is the first 12 hex digits of the sha256 of its file text. The version goes
into every `ChatRequest.template_version` (so it is part of the LLM request-cache key) and into
the rows a stage writes, so editing a prompt invalidates exactly the work that used it.

Placeholders are written `{{name}}` (a Python identifier inside double braces). Single braces
are left alone because prompts are full of LaTeX (`\\frac{1}{2}`, `\\text{cm}`) and Python
(`{'a': 1}`) that `str.format` would choke on. Rendering is strict: every placeholder must be
given a value and every value must have a placeholder, so a typo fails loudly instead of sending
a half-filled prompt to a model. Values are inserted verbatim (a value that itself contains
`{{x}}` is not expanded again).

A template can hold a whole chat, e.g. few-shot examples: a line `@@ system`, `@@ user` or
`@@ assistant` starts a message with that role. A template without such lines is one user
message. `render_template` returns the rendered text; `render_messages` returns the chat.

    >>> render_template("cot_fewshot", instruction="What is 2 + 3?")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_ROLE_LINE = re.compile(r"^@@ (system|user|assistant)[ \t]*$", re.MULTILINE)


@dataclass(frozen=True)
class Template:
    name: str
    text: str
    version: str

    @property
    def fields(self) -> frozenset[str]:
        """The placeholder names the template expects."""
        return frozenset(_PLACEHOLDER.findall(self.text))

    def render(self, **fields: object) -> str:
        """The text with every `{{name}}` replaced by `str(fields[name])`."""
        expected = self.fields
        missing = sorted(expected - fields.keys())
        extra = sorted(fields.keys() - expected)
        if missing or extra:
            raise KeyError(
                f"template {self.name!r}: missing fields {missing}, unexpected fields {extra}"
                f" (expects {sorted(expected)})"
            )
        return _PLACEHOLDER.sub(lambda m: str(fields[m.group(1)]), self.text)

    def messages(self, **fields: object) -> list[dict[str, str]]:
        """The rendered template as chat messages (see the module docstring for the syntax)."""
        return split_messages(self.render(**fields), source=self.name)


def split_messages(text: str, source: str = "<text>") -> list[dict[str, str]]:
    """Split `@@ role` sections into chat messages; text with no role lines is one user turn."""
    marks = list(_ROLE_LINE.finditer(text))
    if not marks:
        return [{"role": "user", "content": text.strip()}]
    if text[: marks[0].start()].strip():
        raise ValueError(f"template {source!r}: text before the first '@@ role' line")
    messages = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        content = text[mark.end() : end].strip()
        if not content:
            raise ValueError(f"template {source!r}: empty {mark.group(1)} message")
        messages.append({"role": mark.group(1), "content": content})
    return messages


def template_path(name: str) -> Path:
    stem = name[:-4] if name.endswith(".txt") else name
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", stem):
        raise ValueError(f"bad template name {name!r}: use letters, digits, '_' or '-'")
    return PROMPTS_DIR / f"{stem}.txt"


def load_template(name: str) -> Template:
    """Load `tasks/prompts/<name>.txt` (the `.txt` may be omitted)."""
    path = template_path(name)
    if not path.is_file():
        known = sorted(p.stem for p in PROMPTS_DIR.glob("*.txt"))
        raise FileNotFoundError(f"no prompt template {name!r} at {path} (known: {known})")
    text = path.read_text(encoding="utf-8")
    return Template(name=path.stem, text=text, version=text_version(text))


def text_version(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def template_version(name: str) -> str:
    return load_template(name).version


def render_template(name: str, **fields: object) -> str:
    return load_template(name).render(**fields)


def render_messages(name: str, **fields: object) -> list[dict[str, str]]:
    return load_template(name).messages(**fields)
