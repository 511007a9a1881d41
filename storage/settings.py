"""Where the factory keeps its data, and the few process-wide settings.

`EVOLFORGE_HOME` (default `~/.evolforge`) holds datasets, the catalog, the request cache,
converted models and Prefect results. Tests point it at a temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def home() -> Path:
    """The data home, created on first use."""
    path = Path(os.environ.get("EVOLFORGE_HOME", "~/.evolforge")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir() -> Path:
    """The reference math data (`../shared/data` beside the checkout), overridable for users."""
    env = os.environ.get("EVOLFORGE_SHARED_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return (PROJECT_ROOT.parent / "shared" / "data").resolve()


def shard_workers() -> int:
    """Shards of a stage run at once in a flow (`EVOLFORGE_SHARD_WORKERS`, default 1): on one
    machine the engine is the bottleneck and runs one batch at a time; a Ray task runner (or
    several GPU engines) is where more pays."""
    return max(1, int(os.environ.get("EVOLFORGE_SHARD_WORKERS", "1")))
