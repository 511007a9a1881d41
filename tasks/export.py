"""Training sets as Hugging Face datasets, and pushing them to the hub.

`hf_dataset(frame)` turns a dataset version into a `datasets.Dataset`, or a `DatasetDict` with
`train`/`test` splits when the frame has the training sets' `split` column, so that
`load_dataset(repo, split="train")` gives what the trainers read. `push_to_hub(frame, repo)` is
the code path behind `evolforge datasets export NAME --as hf --push-to-hub REPO`: it fails with
one line when the hub is switched off (`HF_HUB_OFFLINE`) or unreachable, and returns the
dataset's URL.
"""

from __future__ import annotations

import os
import re
from typing import Any

import polars as pl

from storage.errors import UserError

_REPO = re.compile(r"^(?:[A-Za-z0-9][\w.\-]{0,95}/)?[A-Za-z0-9][\w.\-]{0,95}$")
_TRUE = {"1", "on", "yes", "true"}


class HubError(UserError):
    """A push to the Hugging Face hub that cannot happen or did not succeed."""


def hub_offline() -> bool:
    """Whether the hub is switched off for this process (HF_HUB_OFFLINE, as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _to_dataset(frame: pl.DataFrame) -> Any:
    import datasets

    if hasattr(datasets.Dataset, "from_polars"):
        return datasets.Dataset.from_polars(frame)
    return datasets.Dataset(frame.to_arrow())


def hf_dataset(frame: pl.DataFrame, description: str | None = None) -> Any:
    """A Dataset, or a DatasetDict by the `split` column (train/test) when there is one."""
    import datasets

    if "split" in frame.columns and frame.height:
        sides = [s for s in frame["split"].unique(maintain_order=True).to_list() if s]
        parts = {
            side: _to_dataset(frame.filter(pl.col("split") == side).drop("split")) for side in sides
        }
        out = datasets.DatasetDict(parts)
        if description:
            for part in out.values():
                part.info.description = description
        return out
    ds = _to_dataset(frame)
    if description:
        ds.info.description = description
    return ds


def push_to_hub(
    data: pl.DataFrame | Any,
    repo: str,
    *,
    private: bool = False,
    token: str | None = None,
    description: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Push a frame (or a `datasets` Dataset/DatasetDict) to the hub as `repo`; its URL."""
    if not _REPO.match(repo or ""):
        raise HubError(f"push to the hub: {repo!r} is not a repo id (NAME or OWNER/NAME)")
    if hub_offline():
        raise HubError(
            f"push to the hub ({repo}): the hub is switched off here (HF_HUB_OFFLINE is set); "
            "unset it and log in (`hf auth login`) to push"
        )
    dataset = hf_dataset(data, description) if isinstance(data, pl.DataFrame) else data
    try:
        dataset.push_to_hub(
            repo,
            private=private,
            token=token,
            commit_message=commit_message or (description or "evolforge export"),
        )
    except Exception as exc:  # network, auth, permissions: one line for the CLI
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(f"push to the hub ({repo}) failed: {type(exc).__name__}: {first}") from exc
    return f"https://huggingface.co/datasets/{repo}"
