"""Training sets as Hugging Face datasets, checkpoints as hub models, and pushing them.

`hf_dataset(frame)` turns a dataset version into a `datasets.Dataset`, or a `DatasetDict` with
`train`/`test` splits when the frame has the training sets' `split` column, so that
`load_dataset(repo, split="train")` gives what the trainers read. `push_to_hub(frame, repo)` is
the code path behind `evolforge datasets export NAME --as hf --push-to-hub REPO`: it fails with
one line when the hub is switched off (`HF_HUB_OFFLINE`) or unreachable, and returns the
dataset's URL. `push_model(folder, repo_id)` is the code path behind `evolforge models push`:
a checkpoint folder uploaded as a model repo (`HfApi.create_repo` + `upload_folder`), with a
commit message naming the evolforge version and the checkpoint's lineage; it fails with one
line, before any upload, when the hub is switched off or there is no token.
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


# Not uploaded with a checkpoint: the store's manifest (its lineage goes into the commit) and
# hidden files.
MODEL_IGNORE = ["_manifest.json", ".*", "**/.*"]


def evolforge_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("evolforge")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def push_model(
    folder: Any,
    repo_id: str,
    *,
    commit_message: str,
    commit_description: str | None = None,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> str:
    """Upload a checkpoint folder as the hub model `repo_id` (created if missing; `revision`:
    a branch, created if missing); the commit's URL. One line when it cannot or did not work."""
    from pathlib import Path

    where = f"push to the hub ({repo_id})"
    if not _REPO.match(repo_id or ""):
        raise HubError(f"push to the hub: {repo_id!r} is not a repo id (NAME or OWNER/NAME)")
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HubError(f"{where}: {folder} is not a model checkpoint (no config.json)")
    if hub_offline():
        raise HubError(
            f"{where}: the hub is switched off here (HF_HUB_OFFLINE is set); "
            "unset it and log in (`hf auth login`) to push"
        )
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise HubError(
            f"{where}: no Hugging Face token (set HF_TOKEN or run `hf auth login`); "
            "nothing was uploaded"
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            revision=revision,
            commit_message=commit_message,
            commit_description=commit_description,
            ignore_patterns=MODEL_IGNORE,
        )
    except Exception as exc:  # network, auth, permissions: one line for the CLI
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(f"{where} failed: {type(exc).__name__}: {first}") from exc
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")
