"""Executors run declared stages (`tasks/stage.py`); a stage knows nothing of where it runs.

- `InProcessExecutor` (`local.py`): here, one shard after another (tests, `evolforge ingest`);
- `PrefectExecutor` (`prefect.py`): cached Prefect task runs on the flow's task runner (threads
  locally, a Ray cluster with prefect-ray's `RayTaskRunner`).

Calling a stage (`evolve_batch(pool=..., ...)`) uses the executor in force: the one set with
`use_executor(...)`, else Prefect inside a flow run, else in process. `Executor` (`base.py`) is
the one interface: `run(stage, bound arguments) -> StageResult`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tasks.executors.base import Declared, Executor
from tasks.executors.local import InProcessExecutor
from tasks.executors.prefect import PrefectExecutor

__all__ = [
    "Declared",
    "Executor",
    "InProcessExecutor",
    "PrefectExecutor",
    "current_executor",
    "use_executor",
]

_chosen: ContextVar[Executor | None] = ContextVar("evolforge_executor", default=None)
_prefect = PrefectExecutor()
_local = InProcessExecutor()


def current_executor() -> Executor:
    """The executor a stage call runs on here and now (see the module docstring)."""
    chosen = _chosen.get()
    if chosen is not None:
        return chosen
    from prefect.context import FlowRunContext

    return _prefect if FlowRunContext.get() is not None else _local


@contextmanager
def use_executor(executor: Executor) -> Iterator[Executor]:
    """Run the stages called inside this block on `executor`."""
    token = _chosen.set(executor)
    try:
        yield executor
    finally:
        _chosen.reset(token)
