"""Final-answer extraction and math equivalence: pure functions and one batch verifier.

Extraction (`extract_answer`) finds the final answer of a solution written in any of the formats
the factory meets: WizardMath's `The answer is: X`, MATH's last `\\boxed{...}` / `\\fbox{...}`
(nested braces), GSM8K's `#### X`, and for programs the last non-empty printed line
(`extract_program_answer`). When a text holds several of these, the one that occurs last wins,
because solutions state their final answer at the end ("... so the answer is $\\boxed{5}$").

Equivalence (`check_equivalence`) is a trl-style batch verifier:
`(predictions, references) -> list[bool | None]`, where None means "could not judge" (no
reference, a parse that timed out, an answer too long to be a final answer), never "wrong".
It runs in two tiers:

1. In process, cheap: both answers are normalised (LaTeX spacing, `\\dfrac`, `\\left`, units such
   as `\\text{ cm}` or "5 dollars", `$`, `%`, degrees, `x =` prefixes, thousands separators) and
   compared as strings, then as exact numbers (integers, decimals, `a/b`, `\\frac{a}{b}`), and
   word answers ("Yes", "Mrs. Hilt") without case. Most pairs (GSM8K numbers, simple MATH
   answers) are decided here without any symbolic work.
2. Everything else goes to `math-verify` (LaTeX and plain-expression parsing into sympy, then
   symbolic/numeric comparison: `\\frac{\\sqrt2}{2}` vs `\\sqrt{2}/2`, intervals, tuples, sets,
   `y = 2x + 1` vs `2x + 1`).

Multiple choice (`option_letter`, `choose_options`, `extract_choice`): an answer names an option
by its letter (`B`, `(B)`, `B) 42`, `option B`) or by the option's text, exactly or (batch) by
math equivalence; the grade is then the letter's equality with the reference letter.

Tier 2 runs in `infra.verifier`'s killable worker processes (sympy can hang in C code that no
signal interrupts, and math-verify's SIGALRM timeouts need a main thread): `judge_pair` is the
pure function those workers call.

Run the benchmark: `.venv/bin/python bench/answer_check.py`.
"""

from __future__ import annotations

import atexit
import os
import re
import threading
from fractions import Fraction
from typing import Any

from infra.verifier import VerifierPool

# Answers longer than this are not final answers; judging them would only feed the parser junk.
MAX_ANSWER_CHARS = 1000
# Extraction looks at no more than this many trailing `\boxed` occurrences (bounds the work on
# adversarial text full of unbalanced `\boxed{`).
_MAX_BOXED_TRIES = 4

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"the (?:final )?answer is\b[ \t]*:?", re.IGNORECASE)
_GSM8K = re.compile(r"^####[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_NUMBER_WITH_COMMAS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def _match_braces(text: str, open_at: int) -> int | None:
    """Index of the `}` closing the `{` at `open_at` (escaped `\\{`, `\\}` do not count)."""
    depth = 0
    i = open_at
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _boxed_candidates(text: str) -> list[tuple[int, str]]:
    """(position, content) of the last few well-formed `\\boxed{...}` / `\\fbox{...}`."""
    found: list[tuple[int, str]] = []
    starts = [m for m in _BOXED.finditer(text)][-_MAX_BOXED_TRIES:]
    for m in reversed(starts):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            close = _match_braces(text, i)
            if close is None:
                continue
            found.append((m.start(), text[i + 1 : close]))
        else:
            # `\boxed 5` (no braces): the argument runs to the next `$` or whitespace.
            arg = re.match(r"[^\s$]+", text[i:])
            if arg:
                found.append((m.start(), arg.group(0)))
        if found:
            break
    return found


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` or `\\fbox{...}` (nested braces handled)."""
    found = _boxed_candidates(text)
    return clean_answer(found[0][1]) if found else None


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    last = None
    for last in pattern.finditer(text):  # noqa: B007 - only the last match is wanted
        continue
    return last


def extract_answer_is(text: str) -> str | None:
    """X from the last `The answer is: X` (also without the colon, with `$...$`, a final `.`)."""
    last = _last_match(_ANSWER_IS, text)
    if last is None:
        return None
    return _answer_is_value(text, last.end())


def _answer_is_value(text: str, start: int) -> str | None:
    line = text[start:].lstrip(" \t")
    line = line.split("\n", 1)[0]
    # A sentence that goes on after the answer: "The answer is 5. That is because ..."
    cut = re.search(r"\.\s+(?=[A-Z])", line)
    if cut:
        line = line[: cut.start()]
    if _BOXED.search(line):
        return extract_boxed(line)  # None for an empty box: "the answer is $\\boxed{}$"
    return clean_answer(line)


def extract_gsm8k(text: str) -> str | None:
    """X from the last `#### X` line, with thousands separators removed."""
    last = _last_match(_GSM8K, text)
    if last is None:
        return None
    value = clean_answer(last.group(1))
    if value is not None and _NUMBER_WITH_COMMAS.match(value):
        value = value.replace(",", "")
    return value


def extract_program_answer(stdout: str | None) -> str | None:
    """The last non-empty printed line of a program (an `answer is` anchor in it is honoured)."""
    if not stdout:
        return None
    for line in reversed(stdout.splitlines()):
        if line.strip():
            anchored = extract_answer(line)
            return anchored if anchored is not None else clean_answer(line)
    return None


def extract_answer(text: str | None) -> str | None:
    """The final answer of a solution, or None when it states none.

    Candidates: `The answer is: X`, `#### X`, the last `\\boxed{}`/`\\fbox{}`; the one that
    occurs last in the text wins (a boxed answer inside "the answer is $\\boxed{5}$" starts
    after the phrase, so it wins and the `$` around it do not matter).
    """
    if not text:
        return None
    candidates: list[tuple[int, str | None]] = []
    for m in _ANSWER_IS.finditer(text):
        candidates.append((m.start(), None))  # resolved lazily: only the last one matters
    if candidates:
        start = candidates[-1][0]
        m = _ANSWER_IS.match(text, start)
        assert m is not None
        candidates = [(start, _answer_is_value(text, m.end()))]
    gsm = list(_GSM8K.finditer(text))
    if gsm:
        candidates.append((gsm[-1].start(), extract_gsm8k(text)))
    candidates += [(pos, clean_answer(content)) for pos, content in _boxed_candidates(text)]
    candidates = [c for c in candidates if c[1]]
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1]


def clean_answer(value: str | None) -> str | None:
    """Strip the wrapping a final answer often carries: `$...$`, `\\(...\\)`, a trailing `.`."""
    if value is None:
        return None
    s = value.strip()
    for _ in range(3):
        before = s
        s = s.strip().rstrip(".").strip()
        if len(s) >= 2 and s.startswith("$") and s.endswith("$") and not s.startswith("$$$"):
            s = s.strip("$")
        elif s[:2] in ("\\(", "\\[") and s[-2:] == {"\\(": "\\)", "\\[": "\\]"}[s[:2]]:
            s = s[2:-2]
        elif s.endswith("$") and s.count("$") == 1:
            s = s[:-1]
        elif s.startswith("$") and s.count("$") == 1 and not re.match(r"\$\s*\d", s):
            s = s[1:]
        if s == before:
            break
    return s or None


# ---------------------------------------------------------------------------------------------
# Normalisation and the cheap in-process comparison
# ---------------------------------------------------------------------------------------------

_TEXT_UNIT = re.compile(r"\\(?:text|mbox|mathrm|textbf)\s*\{\s*[A-Za-z][A-Za-z .\-/^2]*\}$")
_WORD_UNITS = re.compile(r"^(.*?\d\}?)\s+(?:[A-Za-z]{2,}\.?\s*){1,3}$")
_MATH_WORDS = {"pi", "sqrt", "log", "ln", "sin", "cos", "tan", "exp", "and", "or", "i", "e"}
_VAR_ASSIGN = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(?=[^=]+$)")
_LATEX_SPACES = re.compile(r"\\[,;:! ]|\\q?quad|~")


def strip_units(s: str) -> str:
    """Remove unit and currency decorations from an answer ('5 dollars', '10\\text{ cm}', '$5')."""
    s = s.strip()
    s = re.sub(r"^(?:\\\$|\$|USD\s*|Rs\.?\s*)(?=\s*[-+]?[\d.\\])", "", s)
    s = re.sub(r"\\\$$", "", s).strip()
    for _ in range(2):
        stripped = _TEXT_UNIT.sub("", s).strip()
        if stripped and re.search(r"[\d}]$", stripped):
            s = stripped
    m = _WORD_UNITS.match(s)
    if m and not any(w.lower().rstrip(".") in _MATH_WORDS for w in s[m.end(1) :].split()):
        s = m.group(1).strip()
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?$|°$", "", s)
    s = re.sub(r"\s*(?:\\%|%|\s+percent)$", "", s)
    s = re.sub(r"\s*(?:degrees?|cents?)$", "", s)
    return s.strip()


def normalize_answer(value: str) -> str:
    """A canonical string for exact comparison (whitespace-free, LaTeX synonyms unified)."""
    s = clean_answer(value) or ""
    whole_box = re.fullmatch(r"\\(?:boxed|fbox)\s*\{(.*)\}", s, re.DOTALL)
    if whole_box and _match_braces(s, s.index("{")) == len(s) - 1:
        s = whole_box.group(1)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = _LATEX_SPACES.sub(" ", s)
    s = s.replace("{,}", ",")
    s = strip_units(s)
    s = _VAR_ASSIGN.sub("", s)
    s = s.strip().rstrip(".").strip()
    if _NUMBER_WITH_COMMAS.match(s):
        s = s.replace(",", "")
    s = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\s+", "", s)
    return s


_INT_OR_DEC = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_NUMERIC_FORMS = [
    re.compile(rf"^({_INT_OR_DEC})$"),
    re.compile(r"^([-+]?\d+)/(\d+)$"),
    re.compile(r"^([-+]?)\\frac\{(\d+)\}\{(\d+)\}$"),
    re.compile(r"^([-+]?)\\frac(\d)(\d)$"),
]


def as_number(normalized: str) -> Fraction | None:
    """The exact value of a plain numeric answer (int, decimal, a/b, \\frac{a}{b}), else None."""
    if not normalized or len(normalized) > 40:
        return None
    m = _NUMERIC_FORMS[0].match(normalized)
    if m:
        return Fraction(m.group(1))
    m = _NUMERIC_FORMS[1].match(normalized)
    if m:
        return Fraction(int(m.group(1)), int(m.group(2))) if int(m.group(2)) else None
    for form in _NUMERIC_FORMS[2:]:
        m = form.match(normalized)
        if m:
            num, den = int(m.group(2)), int(m.group(3))
            if not den:
                return None
            value = Fraction(num, den)
            return -value if m.group(1) == "-" else value
    return None


def _numbers_equal(a: Fraction, b: Fraction, a_text: str, b_text: str) -> bool:
    if a == b:
        return True
    # A decimal may round a non-terminating value (0.333333 for 1/3): allow what math-verify
    # allows (6 decimal places), but only when one side is written as a decimal.
    if "." in a_text or "." in b_text:
        return abs(a - b) < Fraction(1, 10**6)
    return False


# A word answer (ASDiv's "Yes", "Mrs. Hilt"; MATH's "Monday"), compared without case: it holds a
# run of three letters and nothing but letters, apostrophes, periods and hyphens.
_WORDY = re.compile(r"[A-Za-z'.\-]*[A-Za-z]{3}[A-Za-z'.\-]*")


def quick_equivalence(prediction: str, reference: str) -> bool | None:
    """Decide a pair in process when it is easy; None means "ask math-verify"."""
    p, r = normalize_answer(prediction), normalize_answer(reference)
    if not p or not r:
        return None
    if p == r:
        return True
    if _WORDY.fullmatch(p) and _WORDY.fullmatch(r) and p.casefold() == r.casefold():
        return True  # "yes" = "Yes", "mrs. hilt" = "Mrs. Hilt" (math-verify: products of symbols)
    pn, rn = as_number(p), as_number(r)
    if pn is not None and rn is not None:
        return _numbers_equal(pn, rn, p, r)
    return None


# ---------------------------------------------------------------------------------------------
# math-verify, for the hard pairs
# ---------------------------------------------------------------------------------------------

JUDGE_TARGET = "tasks.solutions.answers:judge_pair"


def _prepare_for_parser(value: str) -> str:
    """Text math-verify can parse: units removed, wrapped as inline math."""
    s = clean_answer(value) or ""
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = strip_units(s)
    if _NUMBER_WITH_COMMAS.match(s):
        s = s.replace(",", "")
    return f"${s}$"


def judge_pair(
    prediction: str, reference: str, parse_timeout: int = 2, verify_timeout: int = 2
) -> bool | None:
    """math-verify's verdict on one pair, None when it could not judge (its SIGALRM timeouts
    need a main thread: call it in a verifier worker, as `check_equivalence` does)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    def parsed(text: str):
        try:
            return parse(
                _prepare_for_parser(text),
                config,
                parsing_timeout=parse_timeout,
                raise_on_error=True,
            )
        except TimeoutException:
            raise
        except Exception:
            return []

    try:
        gold = parsed(reference)
        if not gold:
            return None
        target = parsed(prediction)
        if not target:
            return False
        try:
            return bool(verify(gold, target, timeout_seconds=verify_timeout, raise_on_error=True))
        except TimeoutException:
            raise
        except Exception:
            return bool(verify(gold, target, timeout_seconds=verify_timeout))
    except TimeoutException:
        return None


_default_pool: VerifierPool | None = None
_default_lock = threading.Lock()


def default_pool() -> VerifierPool:
    """The process-wide math-verify pool (`EVOLFORGE_VERIFY_WORKERS` workers, default 2),
    started lazily."""
    global _default_pool
    with _default_lock:
        if _default_pool is None or _default_pool._closed:
            workers = int(os.environ.get("EVOLFORGE_VERIFY_WORKERS", "2"))
            _default_pool = equivalence_pool(workers=workers)
            atexit.register(_default_pool.close)
        return _default_pool


def equivalence_pool(
    workers: int = 2, parse_timeout_s: int = 2, verify_timeout_s: int = 2, **pool_options: Any
) -> VerifierPool:
    """A verifier pool running `judge_pair` with math-verify's parse and verify timeouts."""
    return VerifierPool(
        JUDGE_TARGET,
        {
            "parse_timeout": max(1, int(parse_timeout_s)),
            "verify_timeout": max(1, int(verify_timeout_s)),
        },
        workers=workers,
        **pool_options,
    )


# ---------------------------------------------------------------------------------------------
# Batch verifiers
# ---------------------------------------------------------------------------------------------


def check_equivalence(
    predictions: list[str | None],
    references: list[str | None],
    pool: VerifierPool | None = None,
) -> list[bool | None]:
    """Whether each predicted final answer is equivalent to its reference final answer.

    True / False, or None when it could not be judged: no reference, an answer over
    `MAX_ANSWER_CHARS`, or math-verify timing out. A missing prediction is False (wrong).
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"check_equivalence: {len(predictions)} predictions vs {len(references)} references"
        )
    results: list[bool | None] = [None] * len(predictions)
    hard: list[int] = []
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        if ref is None or not ref.strip():
            results[i] = None
        elif pred is None or not pred.strip():
            results[i] = False
        elif len(pred) > MAX_ANSWER_CHARS or len(ref) > MAX_ANSWER_CHARS:
            results[i] = True if pred.strip() == ref.strip() else None
        else:
            quick = quick_equivalence(pred, ref)
            if quick is None:
                hard.append(i)
            else:
                results[i] = quick
    if hard:
        verdicts = (pool or default_pool()).judge(
            [(str(predictions[i]), str(references[i])) for i in hard]
        )
        for i, verdict in zip(hard, verdicts, strict=True):
            results[i] = verdict
    return results


def check_completions(
    completions: list[str], references: list[str | None], pool: VerifierPool | None = None
) -> list[bool | None]:
    """Like `check_equivalence`, extracting each completion's final answer first."""
    return check_equivalence([extract_answer(c) for c in completions], references, pool)


def is_equivalent(prediction: str | None, reference: str | None) -> bool | None:
    return check_equivalence([prediction], [reference])[0]


# ---------------------------------------------------------------------------------------------
# Multiple choice: option letters
# ---------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJ"
# "B", "B.", "B)", "B: 42", "(B)", "(B) 42", "option B": a letter that names an option. "A cat" is
# not one (the article), "(A) cat" and "A) cat" are.
_PAREN_LETTER = re.compile(r"^\(([A-J])\)(?:\s.*)?$", re.DOTALL)
_MARKED_LETTER = re.compile(r"^([A-J])(?:[.:)](?:\s.*)?)?$", re.DOTALL)
_NAMED_LETTER = re.compile(r"^(?:[Oo]ption|[Cc]hoice)\s*\(?([A-J])\)?[.:]?$")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
# In a completion without a final-answer marker: the last "answer is (C)", "Answer: C", "option C".
_LOOSE_LETTER = re.compile(
    r"(?:[Aa]nswer|[Oo]ption|[Cc]hoice)\s*(?:is|:)?\s*(?:\(([A-J])\)|([A-J])\b(?![-'’]))"
)


_BARE_LETTER = re.compile(r"^\(?([A-J])\)?[.:]?$")


def option_letter(answer: str | None, choices: list[str] | tuple[str, ...]) -> str | None:
    """The option an answer names, decided in process, or None.

    An answer equal to exactly one option's text names that option (compared as written with
    spaces collapsed, then without case, then after `normalize_answer`; the first comparison
    that matches any option decides, so two options equal under it name none); else a letter of an existing option written as `B`, `B.`, `B)`, `(B)`,
    `(B) <text>`, `B: <text>`, `option B`, `\\text{(B)}`.
    """
    s = clean_answer(answer)
    if not s or not choices:
        return None
    # From the strictest comparison to the loosest; the first that matches anything decides (a
    # tie between two options is no answer: "Bb Bb" must not match "BB BB" by case folding).
    for key in (_spaced, lambda t: _spaced(t).casefold(), lambda t: normalize_answer(t).casefold()):
        mine = key(s)
        same = [i for i, c in enumerate(choices[: len(LETTERS)]) if mine and key(c) == mine]
        if same:
            if len(same) == 1:
                return LETTERS[same[0]]
            break
    s = _TEXT_WRAP.sub(r"\1", s).strip()
    for pattern in (_PAREN_LETTER, _MARKED_LETTER, _NAMED_LETTER):
        m = pattern.match(s)
        if m and LETTERS.index(m.group(1)) < len(choices):
            return m.group(1)
    return None


def _spaced(text: str) -> str:
    return " ".join((clean_answer(text) or "").split())


def extract_choice(text: str | None) -> str | None:
    """The answer of a multiple-choice completion: `extract_answer`, else a completion that is
    only a letter ("B", "(B)"), else the last letter the text names as its answer ("Answer: C",
    "the correct option is (C)")."""
    found = extract_answer(text)
    if found is not None or not text:
        return found
    alone = _BARE_LETTER.match(text.strip())
    if alone:
        return alone.group(1)
    last = _last_match(_LOOSE_LETTER, text)
    return (last.group(1) or last.group(2)) if last else None


def choose_options(
    answers: list[str | None],
    choices: list[list[str] | tuple[str, ...]],
    pool: VerifierPool | None = None,
) -> list[str | None]:
    """The option letter each answer names: `option_letter`, else the one option whose text is
    math-equivalent to the answer (a model that answers `0.5` to the options `1/2`, `1/3`).
    None when no option, or more than one, matches."""
    if len(answers) != len(choices):
        raise ValueError(f"choose_options: {len(answers)} answers vs {len(choices)} choice lists")
    letters = [option_letter(a, c) for a, c in zip(answers, choices, strict=True)]
    pairs: list[tuple[int, int]] = []
    for i, (answer, options) in enumerate(zip(answers, choices, strict=True)):
        if letters[i] is None and clean_answer(answer):
            pairs += [(i, j) for j in range(min(len(options), len(LETTERS)))]
    verdicts = check_equivalence(
        [answers[i] for i, _ in pairs], [choices[i][j] for i, j in pairs], pool
    )
    matches: dict[int, list[int]] = {}
    for (i, j), verdict in zip(pairs, verdicts, strict=True):
        if verdict is True:
            matches.setdefault(i, []).append(j)
    for i, found in matches.items():
        if len(found) == 1:
            letters[i] = LETTERS[found[0]]
    return letters
