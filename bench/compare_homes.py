"""Compare the newest version of each dataset in two data homes, row by row.

    .venv/bin/python bench/compare_homes.py OLD_HOME NEW_HOME [NAME ...]

For a refactor that should not change behaviour: run the same profile on a copy of the old home
(the request cache makes every LLM answer identical), then compare. Rows are compared as sets of
JSON lines over the columns both versions have (order-free), and each side's extra columns are
listed. Exit status 1 when any compared dataset differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl

from storage.datasets import DatasetStore

DEFAULT = [
    "seeds",
    "seeds_rejected",
    "sft_answers",
    "instructions",
    "eliminated",
    "pool",
    "funnel",
    "solutions",
    "answers",
    "difficulty",
]


def rows(frame: pl.DataFrame, columns: list[str]) -> list[str]:
    return sorted(
        json.dumps(r, sort_keys=True, default=str) for r in frame.select(columns).to_dicts()
    )


def main(argv: list[str]) -> int:
    old, new = DatasetStore(Path(argv[0])), DatasetStore(Path(argv[1]))
    names = argv[2:] or DEFAULT
    differ = 0
    for name in names:
        a, b = old.read(old.latest(name).ref), new.read(new.latest(name).ref)
        common = [c for c in a.columns if c in b.columns]
        same = rows(a, common) == rows(b, common)
        differ += not same
        extra_a = sorted(set(a.columns) - set(b.columns))
        extra_b = sorted(set(b.columns) - set(a.columns))
        print(
            f"{name:<16} rows {a.height:>5} vs {b.height:>5}  "
            f"{'identical' if same else 'DIFFERENT'} on {len(common)} columns"
            + (f"; only old: {extra_a}" if extra_a else "")
            + (f"; only new: {extra_b}" if extra_b else "")
        )
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
