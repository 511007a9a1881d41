"""Benchmark files: the test sets that generated data is decontaminated against and that trained
models are evaluated on. One reader serves both, so a benchmark row means the same thing to
decontamination and to evaluation.

The defaults read `../shared/data` beside the checkout (`EVOLFORGE_SHARED_DATA` elsewhere).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from storage.datasets import sha256_file
from storage.errors import UserError
from storage.settings import shared_data_dir


class BenchmarkError(UserError):
    """A benchmark file that is missing or has a row without its text."""


class Benchmark(BaseModel):
    """A benchmark file (jsonl or parquet) whose `text_field` must not leak into training data.
    Matches are reported as `name:ref`, ref being the row's `id_field` or its 1-based line."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="short name used in reports (gsm8k_test)")
    path: Path = Field(description="jsonl or parquet file")
    text_field: str = Field(description="field holding the problem text")
    id_field: str | None = Field(None, description="field holding a row id (default: line)")

    def fingerprint(self) -> dict[str, Any]:
        """The fields plus the file's content hash (a changed file is a new benchmark)."""
        path = Path(self.path)
        if not path.is_file():
            raise BenchmarkError(f"benchmark {self.name}: {path}: file not found")
        return {**self.model_dump(mode="json"), "sha256": sha256_file(path)}


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
    if path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
        where = "row"
        numbered = enumerate(rows)
    else:
        where = "line"
        numbered = []
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    numbered.append((line_no, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise BenchmarkError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
    for n, row in numbered:
        text = row.get(spec.text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise BenchmarkError(
                f"{path} {where} {n}: field '{spec.text_field}' missing or not a string"
            )
        ref = row.get(spec.id_field) if spec.id_field else None
        refs.append(str(ref) if ref is not None else str(n))
        texts.append(text)
    return pa.table({"ref": pa.array(refs, pa.string()), "text": pa.array(texts, pa.string())})
