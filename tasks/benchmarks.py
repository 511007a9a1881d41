"""Benchmarks: the test sets generated data is decontaminated against and trained models are
evaluated on. One module serves both, so a benchmark row means the same thing to both.

Two views of a benchmark:

- `Benchmark(name, path, text_field, id_field)` + `read_benchmark`: a file's (ref, text) rows, what
  decontamination compares with training text (`default_benchmarks()`: GSM8K test and MATH
  test, the sets WizardMath's data must not contain).
- `BenchmarkSource` + `read_items`: the registry of evaluation sets (`REGISTRY`: GSM8K test,
  MATH500, SVAMP, ASDiv, MAWPS, SAT-Math, MMLU-STEM), each read into normalised items
  (`tasks.records.BenchmarkItem`): `benchmark, id, question, answer, choices, subject, level, solution`. The
  reference answer is normalised once, here: GSM8K's `#### 1,024` → `1024`, SVAMP's `145.0` →
  `145`, ASDiv's `9 (apples)` → `9`, MMLU's option index `2` → `C`. Multiple-choice sets
  (SAT-Math, MMLU-STEM) carry their options in `choices` and the option letter as `answer`.
  `solution` is the set's own worked reference (GSM8K's worked solution, MATH's solution,
  SVAMP's equation, ASDiv's formula) or null: the grader check grades these against `answer`.

The same loaders read the shared copy (`../shared/data`, `EVOLFORGE_SHARED_DATA` elsewhere), a
local file (jsonl, json, csv, parquet) or a hub data set (`datasets.load_dataset`), mapping each
record by the set's format; `mapping` renames fields of a copy whose names differ. A record
without its question or answer is an error naming the file and line, never skipped: a skipped
test item would silently change the score.

`limit` takes a seeded subset: items are ranked by a hash of (seed, benchmark, id) and the first
`limit` kept, in file order. The subset of 5 is part of the subset of 200 with the same seed, so
a larger run reuses every cached answer of a smaller one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.datasets import sha256_file
from storage.errors import UserError
from storage.settings import shared_data_dir
from tasks.records import BenchmarkItem
from tasks.solutions.answers import LETTERS, clean_answer, extract_boxed, extract_gsm8k


class BenchmarkError(UserError):
    """A benchmark file that is missing or has a row without its text or answer."""


def file_identity(path: Path) -> dict[str, str]:
    """A file by what it holds: its suffix (which decides how it is read) and content hash."""
    return {"suffix": path.suffix.lower(), "sha256": sha256_file(path)}


class Benchmark(BaseModel):
    """A benchmark file (jsonl or parquet) whose `text_field` must not leak into training data.
    Matches are reported as `name:ref`, ref being the row's `id_field` or its 1-based line."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="short name used in reports (gsm8k_test)")
    path: Path = Field(description="jsonl or parquet file")
    text_field: str = Field(description="field holding the problem text")
    id_field: str | None = Field(None, description="field holding a row id (default: line)")

    def fingerprint(self) -> dict[str, Any]:
        """The fields plus the file's content (a changed file is a new benchmark), not its
        path: the same file in another checkout or shared-data folder is the same benchmark."""
        path = Path(self.path)
        if not path.is_file():
            raise BenchmarkError(f"benchmark {self.name}: {path}: file not found")
        return {**self.model_dump(mode="json", exclude={"path"}), **file_identity(path)}


def default_benchmarks() -> list[Benchmark]:
    """GSM8K test and MATH test: the sets WizardMath's data must not contain."""
    data = shared_data_dir()
    return [
        Benchmark(name="gsm8k_test", path=data / "gsm8k" / "test.jsonl", text_field="question"),
        Benchmark(
            name="math_test",
            path=data / "math" / "test.jsonl",
            text_field="problem",
            id_field="id",
        ),
    ]


def read_benchmark(spec: Benchmark) -> pa.Table:
    """A benchmark file as (ref, text) rows; a row without the text field is an error naming the
    file and line, never skipped (a skipped test question would go unchecked)."""
    path = Path(spec.path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark {spec.name}: {path}: file not found")
    refs: list[str] = []
    texts: list[str] = []
    where = "row" if path.suffix == ".parquet" else "line"
    for n, row in _file_records(path):
        text = row.get(spec.text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise BenchmarkError(
                f"{path} {where} {n}: field '{spec.text_field}' missing or not a string"
            )
        ref = row.get(spec.id_field) if spec.id_field else None
        refs.append(str(ref) if ref is not None else str(n))
        texts.append(text)
    return pa.table({"ref": pa.array(refs, pa.string()), "text": pa.array(texts, pa.string())})


# ---------------------------------------------------------------------------------------------
# Records from files and the hub


def _file_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line or row number, record) of a jsonl, json, csv or parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise BenchmarkError(f"{path}: expected a JSON list of records")
        yield from enumerate(data, start=1)
    elif suffix == ".csv":
        text = path.read_text(encoding="utf-8")
        yield from enumerate(csv.DictReader(io.StringIO(text, newline="")), start=1)
    else:
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BenchmarkError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc


def _hub_records(name: str, config: str | None, split: str) -> Iterator[tuple[int, Any]]:
    import os

    try:
        import datasets

        data = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline = os.environ.get("HF_HUB_OFFLINE", "unset")
        raise BenchmarkError(
            f"hf:{name}: could not load split {split!r} from the Hugging Face hub "
            f"(offline or not found; HF_HUB_OFFLINE={offline}): {first}"
        ) from exc
    yield from enumerate(data, start=1)


# ---------------------------------------------------------------------------------------------
# Normalising records into items


class ItemError(ValueError):
    """A record that cannot be read as an item (the caller adds where it is)."""


def _field(record: dict[str, Any], name: str, mapping: dict[str, str]) -> Any:
    return record.get(mapping.get(name, name))


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _required(record: dict[str, Any], name: str, mapping: dict[str, str]) -> str:
    value = _text(_field(record, name, mapping))
    if value is None:
        raise ItemError(f"field '{mapping.get(name, name)}' missing or empty")
    return value


def format_number(value: Any) -> str:
    """A numeric reference as text: 145.0 → "145", 2.5 → "2.5", "1,024" → "1024"."""
    if isinstance(value, str):
        text = value.strip().replace(",", "")
        try:
            value = float(text)
        except ValueError as exc:
            raise ItemError(f"answer {value!r} is not a number") from exc
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ItemError(f"answer {value!r} is not a number")
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _sentence(body: str, question: str) -> str:
    """Body and question of a word problem as one text (SVAMP, ASDiv split them)."""
    body = body.strip()
    if body and body[-1] not in ".?!":
        body += "."
    return f"{body} {question.strip()}".strip()


_UNIT_PAREN = re.compile(r"^(.*?\S)\s*\((?=[^()]*[A-Za-z])[^()]*\)$")


def strip_unit_note(answer: str) -> str:
    """ASDiv writes units in parentheses after the value: `9 (apples)` → `9`."""
    m = _UNIT_PAREN.match(answer.strip())
    return m.group(1).strip() if m else answer.strip()


# SAT-Math letters its options `A) ...` or `A. ...` inside one string.
_OPTION_MARKS = [re.compile(r"(?:^|\s)\(?([A-J])\)\s"), re.compile(r"(?:^|\s)([A-J])\.\s")]


def parse_options(text: str) -> list[str]:
    """`A) 5 B) $x$ C) ...` or `A. 5 B. $x$ ...` (one string) → ["5", "$x$", ...]."""
    padded = " " + text.strip() + " "
    for pattern in _OPTION_MARKS:
        marks = list(pattern.finditer(padded))
        letters = [m.group(1) for m in marks]
        if len(letters) >= 2 and letters == list(LETTERS[: len(letters)]):
            break
    else:
        raise ItemError(f"options {text[:80]!r} are not lettered A) B) ... or A. B. ... in order")
    options = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(padded)
        options.append(padded[m.end() : end].strip())
    if any(not o for o in options):
        raise ItemError(f"options {text[:80]!r}: an option is empty")
    return options


def _choice_answer(value: Any, n_choices: int) -> str:
    """The option letter of a multiple-choice reference given as a letter or a 0-based index."""
    if isinstance(value, bool):
        raise ItemError(f"answer {value!r} is not an option")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value)
    else:
        letter = _text(value)
        letter = letter.strip("()").upper() if letter else None
        if not letter or len(letter) != 1 or letter not in LETTERS:
            raise ItemError(f"answer {value!r} is not an option letter or index")
        index = LETTERS.index(letter)
    if not 0 <= index < n_choices:
        raise ItemError(f"answer {value!r} is outside the {n_choices} options")
    return LETTERS[index]


def _level(value: Any) -> int | None:
    if value is None or value == "":
        return None
    m = re.search(r"\d+", str(value))
    return int(m.group(0)) if m else None


def _gsm8k(r: dict[str, Any], n: int, m: dict[str, str]) -> dict[str, Any]:
    solution = _required(r, "answer", m)
    answer = extract_gsm8k(solution)
    if answer is None:
        raise ItemError("answer has no '#### <final answer>' line")
    return {
        "id": _text(_field(r, "id", m)) or str(n),
        "question": _required(r, "question", m),
        "answer": answer,
        "solution": solution,
    }


def _math(r: dict[str, Any], n: int, m: dict[str, str]) -> dict[str, Any]:
    solution = _text(_field(r, "solution", m))
    answer = clean_answer(_text(_field(r, "answer", m)))
    if answer is None and solution is not None:
        answer = extract_boxed(solution)
    if answer is None:
        raise ItemError("no 'answer' field and no \\boxed{} answer in the solution")
    return {
        "id": _text(_field(r, "unique_id", m)) or _text(_field(r, "id", m)) or str(n),
        "question": _required(r, "problem", m),
        "answer": answer,
        "subject": _text(_field(r, "subject", m)) or _text(_field(r, "type", m)),
        "level": _level(_field(r, "level", m)),
        "solution": solution,
    }


def _svamp(r: dict[str, Any], n: int, m: dict[str, str]) -> dict[str, Any]:
    return {
        "id": _text(_field(r, "ID", m)) or str(n),
        "question": _sentence(_required(r, "Body", m), _required(r, "Question", m)),
        "answer": format_number(_field(r, "Answer", m)),
        "subject": _text(_field(r, "Type", m)),
        "solution": _text(_field(r, "Equation", m)),
    }


def _asdiv(r: dict[str, Any], n: int, m: dict[str, str]) -> dict[str, Any]:
    return {
        "id": _text(_field(r, "idx", m)) or str(n),
        "question": _sentence(_required(r, "body", m), _required(r, "question", m)),
        "answer": strip_unit_note(_required(r, "answer", m)),
        "subject": _text(_field(r, "solution_type", m)),
        "solution": _text(_field(r, "formula", m)),
    }


def _mawps(r: dict[str, Any], n: int, m: dict[str, str]) -> dict[str, Any]:
    return {
        "id": _text(_field(r, "idx", m)) or str(n),
        "question": _required(r, "input", m),
        "answer": format_number(_field(r, "target", m)),
        "subject": _text(_field(r, "type", m)),
    }


def _sat_math(r: dict[str, Any], n: int, m: dict[str, str]) -> dict[str, Any]:
    choices = parse_options(_required(r, "options", m))
    return {
        "id": _text(_field(r, "id", m)) or str(n),
        "question": _required(r, "question", m),
        "choices": choices,
        "answer": _choice_answer(_field(r, "Answer", m), len(choices)),
    }


def _mmlu(r: dict[str, Any], n: int, m: dict[str, str]) -> dict[str, Any]:
    choices = _field(r, "choices", m)
    if not isinstance(choices, list) or len(choices) < 2:
        raise ItemError(f"field '{m.get('choices', 'choices')}' is not a list of options")
    choices = [str(c).strip() for c in choices]
    return {
        "id": _text(_field(r, "id", m)) or str(n),
        "question": _required(r, "question", m),
        "choices": choices,
        "answer": _choice_answer(_field(r, "answer", m), len(choices)),
        "subject": _text(_field(r, "type", m)) or _text(_field(r, "subject", m)),
    }


SolutionStyle = Literal["cot", "equation", "formula", "option"]


@dataclass(frozen=True)
class BenchmarkFormat:
    """How one evaluation set is read: its shared file, its record layout, its hub copy."""

    name: str
    file: str  # relative to the shared data folder
    to_item: Callable[[dict[str, Any], int, dict[str, str]], dict[str, Any]]
    description: str
    hub: tuple[str, str | None, str] | None = None  # (name, config, split)
    # How its `solution` states the answer, for the grader check: a worked solution with a
    # final-answer marker, an arithmetic equation, an ASDiv formula, or none (the grader check
    # then answers with the correct option's text, or the answer itself).
    solution_style: SolutionStyle | None = None
    multiple_choice: bool = False


REGISTRY: dict[str, BenchmarkFormat] = {
    f.name: f
    for f in [
        BenchmarkFormat(
            "gsm8k",
            "gsm8k/test.jsonl",
            _gsm8k,
            "GSM8K test (1,319 grade-school word problems)",
            hub=("openai/gsm8k", "main", "test"),
            solution_style="cot",
        ),
        BenchmarkFormat(
            "math500",
            "math500/test.jsonl",
            _math,
            "MATH500 (500 MATH test problems, 7 subjects, levels 1-5)",
            hub=("HuggingFaceH4/MATH-500", None, "test"),
            solution_style="cot",
        ),
        BenchmarkFormat(
            "svamp", "ood/svamp.jsonl", _svamp, "SVAMP (1,000)", solution_style="equation"
        ),
        BenchmarkFormat(
            "asdiv", "ood/asdiv.jsonl", _asdiv, "ASDiv (2,215)", solution_style="formula"
        ),
        BenchmarkFormat("mawps", "ood/mawps_test.jsonl", _mawps, "MAWPS (2,065)"),
        BenchmarkFormat(
            "sat_math",
            "ood/sat_math.jsonl",
            _sat_math,
            "SAT-Math (32, multiple choice A-D)",
            solution_style="option",
            multiple_choice=True,
        ),
        BenchmarkFormat(
            "mmlu_stem",
            "ood/mmlu_stem.jsonl",
            _mmlu,
            "MMLU-STEM (3,018, multiple choice A-D)",
            solution_style="option",
            multiple_choice=True,
        ),
    ]
}


class BenchmarkSource(BaseModel):
    """An evaluation set: a registry name, read from the shared copy, a local file or the hub."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="name in reports (gsm8k, math500, svamp, ...)")
    format: str | None = Field(
        None, description="registry layout to read records with (default: the name)"
    )
    path: str | None = Field(None, description="local file (default: the shared data copy)")
    hub: str | None = Field(None, description="hub data set id (instead of a file)")
    config: str | None = Field(None, description="hub data set config")
    split: str = Field("test", description="hub split")
    mapping: dict[str, str] = Field(
        default_factory=dict, description="record field renames: {registry field: your field}"
    )

    @model_validator(mode="after")
    def _check(self) -> BenchmarkSource:
        if self.layout not in REGISTRY:
            raise ValueError(
                f"benchmark {self.name!r}: unknown format {self.layout!r} "
                f"(known: {', '.join(REGISTRY)})"
            )
        if self.path and self.hub:
            raise ValueError(f"benchmark {self.name!r}: give a path or a hub data set, not both")
        return self

    @property
    def layout(self) -> str:
        return self.format or self.name

    @property
    def spec(self) -> BenchmarkFormat:
        return REGISTRY[self.layout]

    def resolved_path(self) -> Path | None:
        if self.hub:
            return None
        if self.path:
            return Path(self.path).expanduser().resolve()
        return shared_data_dir() / self.spec.file

    def fingerprint(self) -> dict[str, Any]:
        """The settings plus the file's content, not its path (a hub set: its id, config and
        split)."""
        data = self.model_dump(mode="json", exclude={"path"})
        path = self.resolved_path()
        if path is not None:
            if not path.is_file():
                raise BenchmarkError(f"benchmark {self.name}: {path}: file not found")
            data.update(file_identity(path))
        return data

    @classmethod
    def from_hub(cls, name: str) -> BenchmarkSource:
        """The registry set `name` read from its public hub copy."""
        spec = REGISTRY[name]
        if spec.hub is None:
            raise BenchmarkError(f"benchmark {name}: no known hub copy; give `hub` and `mapping`")
        hub, config, split = spec.hub
        return cls(name=name, hub=hub, config=config, split=split)


def benchmark_source(name: str) -> BenchmarkSource:
    """A registry set from the shared data folder; an unknown name is a one-line error."""
    if name not in REGISTRY:
        raise BenchmarkError(f"unknown benchmark {name!r} (known: {', '.join(REGISTRY)})")
    return BenchmarkSource(name=name)


def seeded_subset(frame: pl.DataFrame, limit: int | None, seed: int) -> pl.DataFrame:
    """`limit` rows chosen by a hash of (seed, benchmark, id), kept in their original order;
    the subset for a smaller limit is part of the one for a larger limit."""
    if limit is None or frame.height <= limit:
        return frame
    keys = [
        hashlib.blake2b(f"{seed}:{b}:{i}".encode(), digest_size=8).digest()
        for b, i in zip(frame["benchmark"], frame["id"], strict=True)
    ]
    chosen = set(sorted(range(frame.height), key=lambda k: keys[k])[:limit])
    return frame.filter(pl.Series([k in chosen for k in range(frame.height)]))


def read_items(source: BenchmarkSource, limit: int | None = None, seed: int = 0) -> pl.DataFrame:
    """The set's items (`BenchmarkItem`), a seeded subset of `limit` when given."""
    spec = source.spec
    if source.hub:
        where, records = f"hf:{source.hub}/{source.split}", "row"
        rows = _hub_records(source.hub, source.config, source.split)
    else:
        path = source.resolved_path()
        assert path is not None
        if not path.is_file():
            raise BenchmarkError(f"benchmark {source.name}: {path}: file not found")
        where, records = str(path), "row" if path.suffix.lower() == ".parquet" else "line"
        rows = _file_records(path)
    items: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for n, record in rows:
        if not isinstance(record, dict):
            raise BenchmarkError(f"{where} {records} {n}: expected a record (a JSON object)")
        try:
            item = spec.to_item(record, n, source.mapping)
        except ItemError as exc:
            raise BenchmarkError(f"{where} {records} {n}: {exc}") from exc
        if item["id"] in seen:
            raise BenchmarkError(
                f"{where} {records} {n}: id {item['id']!r} already used at {records} "
                f"{seen[item['id']]}"
            )
        seen[item["id"]] = n
        items.append({"benchmark": source.name, **item})
    if not items:
        raise BenchmarkError(f"benchmark {source.name}: {where} has no records")
    frame = BenchmarkItem.frame(items)
    return seeded_subset(frame, limit, seed)
