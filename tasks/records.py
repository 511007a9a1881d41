"""Records: the typed rows of a dataset, declared once and checked whenever a stage writes one.

A record is a class whose annotations are the dataset's columns with their polars dtypes, in
column order; a subclass appends columns to its base's:

    class Seed(Record):
        id: pl.String
        level: pl.Int64  # MATH's 1..5; null for sources without levels

A stage names the record of each dataset output (`@stage(outputs={"seeds": Seed})`) and the
stage machinery checks every frame against it before writing (`Record.check`): a missing
column, an extra one, one of another dtype or out of order fails the stage with one line naming
the stage, the output, the column and the expected vs actual type, instead of a reader's
KeyError later or a parquet schema that silently differs between versions.

A record holds names and dtypes, not nullability: polars has no non-null dtype, and most columns
are legitimately null somewhere (a failed request, an unjudged step, a seed without a level).
Where null means something, the column's comment says what.

Records live by domain (`tasks/<domain>/records.py`), so a stage imports the records it reads,
not the stage that wrote them. This module holds the base and the records of the top-level
modules: seeds (`tasks.seeds`) and benchmark items (`tasks.benchmarks`, read by decontamination
and evaluation alike). Records modules must not use `from __future__ import annotations`
(annotations are resolved here all the same, with the module's globals).
"""

import inspect
from typing import Any, ClassVar

import polars as pl


class RecordError(ValueError):
    """A frame that does not match its record; the message is one line."""


class Record:
    """The base of every record: subclasses declare columns as `name: <polars dtype>`."""

    _schema: ClassVar[dict[str, pl.DataType]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        schema: dict[str, pl.DataType] = {}
        for klass in reversed(cls.__mro__):
            if klass is Record or not issubclass(klass, Record):
                continue
            for name, dtype in inspect.get_annotations(klass, eval_str=True).items():
                schema[name] = _dtype(cls, name, dtype)
        cls._schema = schema

    @classmethod
    def schema(cls) -> pl.Schema:
        """Column name -> dtype, in declaration order (base columns first)."""
        return pl.Schema(cls._schema)

    @classmethod
    def columns(cls) -> list[str]:
        return list(cls._schema)

    @classmethod
    def empty(cls) -> pl.DataFrame:
        """A frame with no rows and the record's columns."""
        return pl.DataFrame(schema=cls.schema())

    @classmethod
    def frame(cls, rows: Any, *, orient: str | None = None) -> pl.DataFrame:
        """Rows (dicts, or tuples with `orient="row"`) as a frame of exactly these columns: keys
        a dict row lacks are null, keys the record does not declare are left out."""
        return pl.DataFrame(rows, schema=cls.schema(), orient=orient)  # type: ignore[arg-type]

    @classmethod
    def check(
        cls, frame: pl.DataFrame, *, stage: str | None = None, output: str | None = None
    ) -> None:
        """Raise `RecordError` unless `frame` has exactly the record's columns, dtypes and order.

        The message names the stage and output (when given), the record, the column, and the
        expected vs actual dtype."""
        where = f"{cls.__name__}"
        if output is not None:
            where = f"output {output!r} ({where})"
        if stage is not None:
            where = f"stage {stage}: {where}"
        actual = frame.schema
        for name, dtype in cls._schema.items():
            if name not in actual:
                raise RecordError(f"{where}: column {name!r} ({dtype}) is missing")
            if actual[name] != dtype:
                raise RecordError(
                    f"{where}: column {name!r} has type {actual[name]}, expected {dtype}"
                )
        extra = [name for name in actual if name not in cls._schema]
        if extra:
            raise RecordError(
                f"{where}: unexpected column {extra[0]!r} ({actual[extra[0]]})"
                + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
            )
        for position, (got, want) in enumerate(zip(actual, cls._schema, strict=True)):
            if got != want:
                raise RecordError(
                    f"{where}: column {got!r} is at position {position}, expected {want!r} there"
                )


def _dtype(record: type, name: str, dtype: Any) -> pl.DataType:
    """A column's annotation as a dtype instance (`pl.String` -> `String()`)."""
    if isinstance(dtype, pl.DataType):
        return dtype
    if isinstance(dtype, type) and issubclass(dtype, pl.DataType):
        try:
            return dtype()
        except TypeError as exc:
            raise TypeError(f"{record.__name__}.{name}: {dtype} needs parameters ({exc})") from exc
    raise TypeError(f"{record.__name__}.{name}: {dtype!r} is not a polars dtype")


# -- the records of tasks.seeds and tasks.benchmarks ----------------------------------------


class Seed(Record):
    """One seed problem (`seeds`), normalised from any source."""

    id: pl.String
    source: pl.String  # the source's label (gsm8k, math, a file's name, ...)
    question: pl.String
    answer: pl.String  # the reference final answer
    solution: pl.String  # the source's worked solution, when it has one
    subject: pl.String
    level: pl.Int64  # MATH's 1..5; null for sources without levels


class RejectedSeed(Record):
    """One source row that did not become a seed (`seeds_rejected`), and why."""

    source: pl.String
    file: pl.String
    line: pl.Int64  # 0 for a whole-file problem (an empty file)
    reason: pl.String
    detail: pl.String
    raw: pl.String  # the start of the row as read


class BenchmarkItem(Record):
    """One benchmark test item (`eval_items`; decontamination reads the same rows)."""

    benchmark: pl.String
    id: pl.String
    question: pl.String
    answer: pl.String  # the normalised reference final answer (an option letter for choices)
    choices: pl.List(pl.String)  # option texts of a multiple-choice item, else null
    subject: pl.String
    level: pl.Int64
    solution: pl.String  # the set's own worked reference, when it has one
