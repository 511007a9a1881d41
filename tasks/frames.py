"""Small checks on the frames stages exchange."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl


def require_columns(df: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    """Fail with one line naming the missing columns (a caller passed the wrong dataset)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing columns {missing} (has {df.columns})")
