"""Split a chain-of-thought solution into steps: `segment_steps(text) -> list[str]`.

The steps are slices of the text that re-join to it exactly (`"".join(steps) == text`): every
character, blank lines and trailing spaces included, belongs to exactly one step (leading
whitespace to the first, blank lines to the step before them). A text with no visible character
has no steps.

Where a step starts:

- **numbered steps**: when at least two `Step k:` / `k.` / `k)` markers open lines (or `Step k:`
  follows a sentence inside a line), a step runs from one marker to the next, continuation
  lines included; text before the first marker is a step of its own;
- **line breaks** otherwise: every non-blank line starts a step;
- **sentences ending in a computed result** inside a line: "4 * 3 = 12 dollars. Then ..." splits
  after the first sentence (a result is `= number`, or GSM8K's `<<4*3=12>>12`, followed by at
  most a few words). "The answer is ..." after a sentence also starts a step;
- a final-answer line (`The answer is: X`, `#### X`) always starts a step, numbered or not.

Never split inside a fenced code block (a PoT program stays one step), display math (`$$...$$`,
`\\[...\\]`, `\\begin{...}...\\end{...}`) or inline math `$...$`, and never at the period of a
decimal number or an abbreviation without a following capital.
"""

from __future__ import annotations

import itertools
import re

_FENCE = re.compile(r"^[ \t]*```.*?(?:^[ \t]*```[^\n]*$|\Z)", re.DOTALL | re.MULTILINE)
_DISPLAY = re.compile(
    r"\$\$.*?(?:\$\$|\Z)|\\\[.*?(?:\\\]|\Z)|\\begin\{([A-Za-z*]+)\}.*?(?:\\end\{\1\}|\Z)",
    re.DOTALL,
)
_MARKER_LINE = re.compile(
    r"^[ \t>]*(?:[*_#]{1,3}[ \t]*)?(?:step[ \t]*\d+[ \t]*[:.)\-]|\d{1,2}[.)][ \t]+\S)",
    re.IGNORECASE | re.MULTILINE,
)
_INLINE_STEP = re.compile(r"(?<=[.!?:])[ \t]+(?=(?:\*\*)?step[ \t]*\d+[ \t]*[:.)])", re.IGNORECASE)
_ANSWER_LINE = re.compile(
    r"^[ \t>*]*(?:####|(?:so,?\s+|therefore,?\s+|thus,?\s+)?the (?:final )?answer is\b)",
    re.IGNORECASE | re.MULTILINE,
)
# A sentence that ends in a computed result: "... = 12 dollars." / "... <<4*3=12>>12 apples."
_RESULT_END = re.compile(
    r"(?:(?:=|>>)\s*\\?\$?\s*[-−]?\d[\d,]*(?:\.\d+)?\s*(?:\\?%|\$)?"
    # or an equation closing a math span: "... $3 + (-3) = 0$." / "$x = \\frac{1}{2}$."
    r"|=[^=$]{1,80}\$)"
    r"(?:\s+[A-Za-z][A-Za-z\-']*){0,4}\s*[.!?]$"
)
_SENTENCE_GAP = re.compile(r"(?<=[.!?])[ \t]+(?=[A-Z0-9$\\(])")
_ANSWER_START = re.compile(r"(?:so,?\s+|therefore,?\s+|thus,?\s+)?the (?:final )?answer is\b", re.I)


def _protected(text: str) -> list[tuple[int, int]]:
    """Spans that are never split: code fences, display math (inline math is handled per line)."""
    spans = [(m.start(), m.end()) for m in _FENCE.finditer(text)]
    for m in _DISPLAY.finditer(text):
        if not any(a <= m.start() < b for a, b in spans):
            spans.append((m.start(), m.end()))
    return sorted(spans)


def _inside(position: int, spans: list[tuple[int, int]]) -> bool:
    return any(a < position < b for a, b in spans)


def _line_starts(text: str) -> list[int]:
    """Offsets of the non-blank lines' starts (after the first line)."""
    starts = []
    for m in re.finditer(r"\n", text):
        start = m.end()
        end = text.find("\n", start)
        line = text[start : end if end >= 0 else len(text)]
        if line.strip():
            starts.append(start)
    return starts


def _in_inline_math(line: str, offset: int) -> bool:
    """Whether `offset` of `line` is inside `$...$` (unescaped single dollars counted)."""
    dollars = re.findall(r"(?<!\\)\$", line[:offset])
    return len(dollars) % 2 == 1


def _sentence_breaks(text: str, start: int, end: int, spans: list[tuple[int, int]]) -> list[int]:
    """Breaks inside text[start:end] after sentences that end in a computed result."""
    breaks = []
    segment = text[start:end]
    sentence_start = 0
    for m in _SENTENCE_GAP.finditer(segment):
        cut = m.end()
        if _in_inline_math(segment, m.start()) or _inside(start + cut, spans):
            continue
        sentence = segment[sentence_start : m.start()].strip()
        if _RESULT_END.search(sentence) or _ANSWER_START.match(segment, cut):
            breaks.append(start + cut)
            sentence_start = cut
    return breaks


def _answer_breaks(text: str, spans: list[tuple[int, int]]) -> list[int]:
    """Breaks before "The answer is" when it follows a sentence inside a line."""
    breaks = []
    for m in _SENTENCE_GAP.finditer(text):
        line_start = text.rfind("\n", 0, m.start()) + 1
        if (
            _ANSWER_START.match(text, m.end())
            and not _inside(m.end(), spans)
            and not _in_inline_math(text[line_start : m.end()], m.start() - line_start)
        ):
            breaks.append(m.end())
    return breaks


def segment_steps(text: str) -> list[str]:
    """The steps of a solution; they re-join to `text` exactly (see the module docstring)."""
    if not text or not text.strip():
        return []
    spans = _protected(text)
    lines = [s for s in _line_starts(text) if not _inside(s, spans)]
    markers = [m.start() for m in _MARKER_LINE.finditer(text) if not _inside(m.start(), spans)] + [
        m.end() for m in _INLINE_STEP.finditer(text) if not _inside(m.end(), spans)
    ]
    numbered = len(markers) >= 2
    breaks: set[int] = set()
    fence_starts = {a for a, _ in spans if text[a:].lstrip(" \t").startswith("```")}
    if numbered:
        for position in markers:
            line_start = text.rfind("\n", 0, position) + 1
            inline = text[line_start:position].strip() != ""
            breaks.add(position if inline else line_start)
        answers = [m.start() for m in _ANSWER_LINE.finditer(text)]
        breaks.update(s for s in lines if s in answers or s in fence_starts)
        breaks.update(_answer_breaks(text, spans))
        # The line after a code block starts a step again.
        for _, b in spans:
            breaks.update(s for s in lines if s >= b and not text[b:s].strip())
    else:
        breaks.update(lines)
        bounds = sorted({0, *lines, len(text)})
        for a, b in itertools.pairwise(bounds):
            breaks.update(_sentence_breaks(text, a, b, spans))
    first_visible = len(text) - len(text.lstrip())
    cuts = sorted(b for b in breaks if first_visible < b < len(text) and text[b:].strip())
    steps, last = [], 0
    for cut in cuts:
        if text[last:cut].strip():
            steps.append(text[last:cut])
            last = cut
    steps.append(text[last:])
    return steps
