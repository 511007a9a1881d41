"""Seed ingestion: GSM8K, MATH, local files, Hugging Face hub data sets and the built-in sample.

Every source becomes the normalised seed record `id, source, question, answer, solution,
subject, level` (see `tasks.records.Seed`). Bad rows are never dropped silently: each one becomes a
`seeds_rejected` row naming its file, line and reason (or, with `strict`, the first one raises a
one-line `SeedError`). Exact duplicate questions (after case and whitespace normalisation) are
collapsed to their first occurrence and the later ones are recorded as rejected with reason
`duplicate_question`, so that for every ingest `read = accepted + rejected`.

Formats:
- `gsm8k`: jsonl with `question` and `answer` (a worked solution whose final answer follows `####`).
- `math`: jsonl with `problem`, `solution` (final answer in the last `\\boxed{}`), `level`
  ("Level 1".."Level 5"), `type` (the subject), optional `id`.
- `file`: jsonl, json (a list of objects), parquet or csv with a field mapping
  (`question=...,answer=...,solution=...,id=...,subject=...,level=...`); when no answer field is
  mapped the answer is extracted from the solution (`####` or `\\boxed{}`).
- `hf`: a hub data set through `datasets.load_dataset`, mapped like a file.
- `sample`: 30 original problems written for this project (`tasks/data/sample_seeds.jsonl`).

Run: `evolforge ingest gsm8k math` or as the first task of the factory flow.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.datasets import sha256_file
from storage.errors import UserError
from storage.settings import shared_data_dir
from tasks.records import RejectedSeed, Seed
from tasks.solutions.answers import extract_boxed, extract_gsm8k
from tasks.stage import StageOutput, stage

SAMPLE_PATH = Path(__file__).parent / "data" / "sample_seeds.jsonl"
DEFAULT_MAX_ROW_CHARS = 20_000
RAW_PREVIEW = 300

SourceKind = Literal["gsm8k", "math", "file", "hf", "sample"]
FORMAT_FIELDS = {
    "gsm8k": {"question": "question", "solution": "answer"},
    "math": {
        "question": "problem",
        "solution": "solution",
        "subject": "type",
        "level": "level",
        "id": "id",
    },
    "seed": {
        "id": "id",
        "question": "question",
        "answer": "answer",
        "solution": "solution",
        "subject": "subject",
        "level": "level",
    },
}
MAPPABLE = ("id", "question", "answer", "solution", "subject", "level")


class SeedError(UserError):
    """A bad seed source or, in strict mode, the first bad row: one line naming file and line."""


class SeedSource(BaseModel):
    """One source of seed problems."""

    model_config = ConfigDict(extra="forbid")

    kind: SourceKind = Field(
        "sample",
        description="gsm8k / math (train sets, from ../shared/data unless a path is given), "
        "file (a local file or folder), hf (a hub data set), sample (the built-in seeds)",
    )
    path: str | None = Field(
        None,
        description="a local file or a folder of seed files (jsonl, json, csv, parquet); "
        "$VARS expand, e.g. ${EVOLFORGE_HOME}/inbox",
    )
    name: str | None = Field(None, description="hub data set name (kind hf)")
    config: str | None = Field(None, description="hub data set config (kind hf)")
    split: str = Field("train", description="hub data set split (kind hf)")
    format: Literal["gsm8k", "math", "seed"] | None = Field(
        None, description="record layout of a file or hub source (or give a mapping)"
    )
    mapping: dict[str, str] = Field(
        default_factory=dict,
        description='seed field → column, e.g. {"question": "q", "answer": "a"}',
    )
    label: str | None = Field(
        None, description="value of the `source` column (default: the kind, or the hub name)"
    )
    limit: int | None = Field(
        None, ge=1, description="read only the first rows of the source (a quick run)"
    )

    @field_validator("mapping")
    @classmethod
    def _known_fields(cls, mapping: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(mapping) - set(MAPPABLE))
        if unknown:
            raise ValueError(
                f"unknown seed field(s) in mapping: {', '.join(unknown)} (known: {', '.join(MAPPABLE)})"
            )
        return mapping

    @model_validator(mode="after")
    def _check(self) -> SeedSource:
        if self.kind == "file" and not self.path:
            raise ValueError("a 'file' seed source needs a path")
        if self.kind == "hf" and not self.name:
            raise ValueError("an 'hf' seed source needs a data set name")
        if self.kind in ("file", "hf") and not self.format and "question" not in self.mapping:
            raise ValueError(
                f"a '{self.kind}' seed source needs a format (gsm8k, math, seed) or a mapping for 'question'"
            )
        return self

    def resolved_path(self) -> Path | None:
        if self.path:
            return Path(os.path.expandvars(self.path)).expanduser().resolve()
        if self.kind == "gsm8k":
            return shared_data_dir() / "gsm8k" / "train.jsonl"
        if self.kind == "math":
            return shared_data_dir() / "math" / "train.jsonl"
        if self.kind == "sample":
            return SAMPLE_PATH
        return None

    def located(self) -> dict[str, Any]:
        """The settings with an explicit path resolved: where this source was read from (a
        built-in source stays relative to the settings it is read under)."""
        data = self.model_dump(mode="json")
        if self.path:
            data["path"] = str(self.resolved_path())
        return data

    def fields(self) -> dict[str, str]:
        preset = (
            {"gsm8k": "gsm8k", "math": "math", "sample": "seed"}.get(self.kind) or self.format or ""
        )
        return {**FORMAT_FIELDS.get(preset, {}), **self.mapping}

    def answer_style(self) -> str:
        return {"gsm8k": "gsm8k", "math": "math"}.get(self.kind) or self.format or "auto"

    def source_label(self) -> str:
        return self.label or (self.name if self.kind == "hf" else self.kind)

    def fingerprint(self) -> dict[str, Any]:
        """What determines this source's rows: its settings and its files' content, never where
        they are (a copied checkout or shared-data folder reads the same seeds): a file by its
        suffix (which decides how it is read) and content hash, a folder by each seed file's
        name and content."""
        data = self.model_dump(exclude={"path"})
        path = self.resolved_path()
        if path is not None:
            if path.is_dir():
                data["files"] = {f.name: sha256_file(f) for f in source_files(path)}
            else:
                file = source_files(path)[0]
                data["suffix"] = file.suffix.lower()
                data["sha256"] = sha256_file(file)
        return data


# -- answers ----------------------------------------------------------------------------------


def gsm8k_final_answer(solution: str) -> str | None:
    """The final answer after `####`, without thousands separators."""
    return extract_gsm8k(solution)


def last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` or `\\fbox{...}`, nested braces handled."""
    return extract_boxed(text)


def final_answer(solution: str, style: str) -> str | None:
    if style == "gsm8k":
        return gsm8k_final_answer(solution)
    if style == "math":
        return last_boxed(solution)
    return gsm8k_final_answer(solution) or last_boxed(solution)


# -- reading raw records ------------------------------------------------------------------------


@dataclass
class RawRow:
    line: int
    data: dict[str, Any] | None
    raw: str
    error: tuple[str, str] | None = None  # (reason, detail)


def _preview(text: str) -> str:
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:RAW_PREVIEW]


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
    return False


def _bad(number: int, raw: str, reason: str, detail: str) -> RawRow:
    return RawRow(number, None, _preview(raw), (reason, detail))


def _checked(number: int, data: dict[str, Any], raw: str, max_row_chars: int) -> RawRow:
    """The row, or its rejection when it is over the size cap."""
    if len(raw) > max_row_chars:
        return _bad(
            number, raw, "too_large", f"row has {len(raw)} characters, cap is {max_row_chars}"
        )
    return RawRow(number, data, raw)


def read_jsonl(path: Path, max_row_chars: int) -> Iterator[RawRow]:
    with path.open("rb") as handle:
        for number, raw_bytes in enumerate(handle, start=1):
            if not raw_bytes.strip():
                continue
            try:
                text = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                text = raw_bytes.decode("utf-8", "replace")
                yield _bad(number, text, "not_utf8", f"invalid UTF-8 at byte {exc.start}")
                continue
            if len(text) > max_row_chars:  # checked before parsing: a huge line is not parsed
                yield _checked(number, {}, text, max_row_chars)
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                yield _bad(number, text, "malformed_json", f"{exc.msg} at column {exc.colno}")
                continue
            if not isinstance(data, dict):
                kind = type(data).__name__
                yield _bad(number, text, "not_an_object", f"expected a JSON object, got {kind}")
                continue
            yield RawRow(number, data, text)


def read_json(path: Path, max_row_chars: int) -> Iterator[RawRow]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SeedError(f"{path}: invalid UTF-8 at byte {exc.start}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SeedError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg}") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise SeedError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    for number, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raw = (
                item if isinstance(item, str) else json.dumps(item, ensure_ascii=False, default=str)
            )
            yield _bad(number, raw, "not_an_object", f"record {number} is a {type(item).__name__}")
        else:
            yield _checked(
                number, item, json.dumps(item, ensure_ascii=False, default=str), max_row_chars
            )


def read_csv(path: Path, max_row_chars: int) -> Iterator[RawRow]:
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for row in reader:
        raw = ",".join(str(v) for v in row.values())
        if any(_has_lone_surrogate(v) for v in row.values()):
            yield _bad(reader.line_num, raw, "not_utf8", "invalid UTF-8 bytes in row")
        else:
            yield _checked(reader.line_num, dict(row), raw, max_row_chars)


def _json_rows(rows: Iterable[dict[str, Any]], max_row_chars: int) -> Iterator[RawRow]:
    for number, row in enumerate(rows, start=1):
        yield _checked(
            number, dict(row), json.dumps(row, ensure_ascii=False, default=str), max_row_chars
        )


def read_parquet(path: Path, max_row_chars: int) -> Iterator[RawRow]:
    try:
        frame = pl.read_parquet(path)
    except Exception as exc:
        raise SeedError(f"{path}: not a readable parquet file: {exc}") from exc
    return _json_rows(frame.iter_rows(named=True), max_row_chars)


def read_hf(source: SeedSource, max_row_chars: int) -> Iterator[RawRow]:
    """Rows of a hub data set; offline or unknown data sets fail with a clear message."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise SeedError("the 'datasets' package is needed for hub sources") from exc
    try:
        data = datasets.load_dataset(source.name, source.config, split=source.split)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline = os.environ.get("HF_HUB_OFFLINE", "unset")
        raise SeedError(
            f"hf:{source.name}: could not load split {source.split!r} from the Hugging Face hub "
            f"(offline or not found; HF_HUB_OFFLINE={offline}): {first}"
        ) from exc
    return _json_rows(data, max_row_chars)


READERS = {
    ".jsonl": read_jsonl,
    ".ndjson": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
    ".parquet": read_parquet,
}


def source_files(path: Path) -> list[Path]:
    """The file itself, or a folder's seed files (jsonl, json, csv, parquet) in name order."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in READERS)
    if not path.is_file():
        raise SeedError(f"{path}: no such file")
    return [path]


def read_rows(source: SeedSource, max_row_chars: int) -> list[tuple[str, Iterator[RawRow]]]:
    """(file, rows) for each file of a source; a folder source gives one entry per file."""
    if source.kind == "hf":
        return [(f"hf:{source.name}/{source.split}", read_hf(source, max_row_chars))]
    path = source.resolved_path()
    assert path is not None
    out = []
    for file in source_files(path):
        reader = READERS.get(file.suffix.lower())
        if reader is None:
            raise SeedError(
                f"{file}: unsupported file type {file.suffix!r} (use jsonl, json, csv or parquet)"
            )
        out.append((str(file), reader(file, max_row_chars)))
    return out


# -- normalising ---------------------------------------------------------------------------------


@dataclass
class IngestResult:
    seeds: pl.DataFrame
    rejected: pl.DataFrame
    read: int
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return self.seeds.height


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from csv/parquet
        return None
    text = str(value).strip()
    return text or None


def _level(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"level {value!r} is not a number")
    if isinstance(value, int):
        return value
    match = re.search(r"(\d+)", str(value))
    if match:
        return int(match.group(1))
    if str(value).strip().lower() in {"level ?", "?", "none", "null"}:
        return None
    raise ValueError(f"level {value!r} is not a number")


def normalise_question(text: str) -> str:
    """The form used to collapse exact duplicate questions: case and whitespace folded."""
    return " ".join(text.lower().split())


def normalise_row(
    row: RawRow, source: SeedSource
) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """A seed record, or the (reason, detail) of why the row is rejected."""
    assert row.data is not None
    fields = source.fields()
    for column in fields.values():
        if column in row.data and _has_lone_surrogate(row.data[column]):
            return None, ("lone_surrogate", f"field {column!r} contains a lone surrogate")
    values = {name: row.data.get(column) for name, column in fields.items()}
    question = _text(values.get("question"))
    if question is None:
        return None, (
            "missing_field",
            f"field {fields.get('question', 'question')!r} is missing or empty",
        )
    solution = _text(values.get("solution"))
    answer = _text(values.get("answer"))
    if answer is None:
        if solution is None:
            what = fields.get("answer") or fields.get("solution") or "answer"
            return None, ("missing_field", f"field {what!r} is missing or empty")
        answer = final_answer(solution, source.answer_style())
        if answer is None:
            marker = {"gsm8k": "'####'", "math": "\\boxed{}"}.get(
                source.answer_style(), "'####' or \\boxed{}"
            )
            return None, ("no_final_answer", f"solution has no final answer ({marker})")
    try:
        level = _level(values.get("level"))
    except ValueError as exc:
        return None, ("bad_field", str(exc))
    label = source.source_label()
    given_id = _text(values.get("id"))
    if given_id:
        seed_id = given_id if given_id.startswith(f"{label}") else f"{label}/{given_id}"
    else:
        seed_id = f"{label}-{hashlib.sha1(question.encode()).hexdigest()[:12]}"
    return {
        "id": seed_id,
        "source": label,
        "question": question,
        "answer": answer,
        "solution": solution,
        "subject": _text(values.get("subject")),
        "level": level,
    }, None


def ingest(
    sources: list[SeedSource], strict: bool = False, max_row_chars: int = DEFAULT_MAX_ROW_CHARS
) -> IngestResult:
    """Read and normalise every source; bad rows are rejected with file, line and reason."""
    seeds: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    seen_ids: dict[str, str] = {}
    seen_questions: dict[str, str] = {}
    read = 0
    per_source: dict[str, dict[str, int]] = {}

    def reject(label: str, file: str, line: int, reason: str, detail: str, raw: str) -> None:
        if strict:
            raise SeedError(f"{file}:{line}: {reason}: {detail}")
        rejected.append(
            {
                "source": label,
                "file": file,
                "line": line,
                "reason": reason,
                "detail": detail,
                "raw": raw,
            }
        )
        per_source[label]["rejected"] += 1

    for source in sources:
        label = source.source_label()
        per_source.setdefault(label, {"read": 0, "accepted": 0, "rejected": 0})
        taken = 0  # rows read from this source (its `limit` counts across a folder's files)
        for file, rows in read_rows(source, max_row_chars):
            empty = True
            for row in rows:
                if source.limit is not None and taken >= source.limit:
                    break
                taken += 1
                empty = False
                read += 1
                per_source[label]["read"] += 1
                if row.error is not None:
                    reject(label, file, row.line, *row.error, row.raw)
                    continue
                record, error = normalise_row(row, source)
                if error is not None:
                    reject(label, file, row.line, *error, _preview(row.raw))
                    continue
                assert record is not None
                where = f"{file}:{row.line}"
                if record["id"] in seen_ids:
                    reject(
                        label,
                        file,
                        row.line,
                        "duplicate_id",
                        f"id {record['id']!r} already used at {seen_ids[record['id']]}",
                        _preview(row.raw),
                    )
                    continue
                key = normalise_question(record["question"])
                if key in seen_questions:
                    reject(
                        label,
                        file,
                        row.line,
                        "duplicate_question",
                        f"same question as {seen_questions[key]}",
                        _preview(row.raw),
                    )
                    continue
                seen_ids[record["id"]] = where
                seen_questions[key] = record["id"]
                seeds.append(record)
                per_source[label]["accepted"] += 1
            if empty and not (source.limit is not None and taken >= source.limit):
                # An empty file is one unreadable record, so that it shows in the rejected table.
                read += 1
                per_source[label]["read"] += 1
                reject(label, file, 0, "empty_file", "the file has no rows", "")
    result = IngestResult(
        seeds=Seed.frame(seeds),
        rejected=RejectedSeed.frame(rejected),
        read=read,
    )
    reasons = result.rejected.group_by("reason").len().sort("reason").rows() if rejected else []
    result.stats = {
        "read": read,
        "accepted": result.accepted,
        "rejected": result.rejected.height,
        "rejected_by_reason": dict(reasons),
        "duplicate_questions_collapsed": sum(
            1 for r in rejected if r["reason"] == "duplicate_question"
        ),
        "per_source": per_source,
    }
    assert result.read == result.accepted + result.rejected.height, "seed counts do not reconcile"
    return result


# -- the stage ---------------------------------------------------------------------------------


class IngestParams(BaseModel):
    """Which seeds to load and how strictly."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SeedSource] = Field(
        default_factory=lambda: [SeedSource(kind="sample")],
        min_length=1,
        description="where seed problems come from, read in order",
    )
    strict: bool = Field(
        False, description="stop at the first bad row instead of rejecting it to seeds_rejected"
    )
    max_row_chars: int = Field(
        DEFAULT_MAX_ROW_CHARS, gt=0, description="longer rows are rejected as too long"
    )

    def fingerprint(self) -> dict[str, Any]:
        """The parameters that determine the seed version, with each file's content hash."""
        return {
            "sources": [s.fingerprint() for s in self.sources],
            "strict": self.strict,
            "max_row_chars": self.max_row_chars,
        }


@stage(name="ingest", outputs={"seeds": Seed, "seeds_rejected": RejectedSeed})
def ingest_seeds(params: IngestParams) -> StageOutput:
    """Load seed problems into a `seeds` version (bad rows into `seeds_rejected`)."""
    result = ingest(params.sources, strict=params.strict, max_row_chars=params.max_row_chars)
    # Where the sources were read from, for people and `evolforge ingest --add` (stats are not
    # part of the version, which names the sources by content).
    sources = [source.located() for source in params.sources]
    return StageOutput(
        {"seeds": result.seeds, "seeds_rejected": result.rejected},
        {**result.stats, "sources": sources},
    )
