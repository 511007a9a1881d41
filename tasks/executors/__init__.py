"""Executors run declared stages (`tasks/stage.py`); a stage knows nothing of where it runs.

- `InProcessExecutor` (`local.py`): here, one shard after another (tests, `evolforge ingest`);
- `PrefectExecutor` (`prefect.py`): cached Prefect task runs on the flow's task runner (threads
  locally, a Ray cluster with prefect-ray's `RayTaskRunner`).

Calling a stage (`evolve_batch(pool=..., ...)`) uses the executor in force: the one set with
`use_executor(...)`, else Prefect inside a flow run, else in process. `Executor` (`base.py`) is
the one interface: `run(stage, bound arguments) -> StageResult`.

A flow body opens its run's `executor` setting (`settings.py`) with `executor_scope(settings)`:
`local` keeps the flow's own task runner (threads); `ray` starts prefect-ray's `RayTaskRunner`
on the cluster for the block, and the stages called inside it (subflows included) send their
shards there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tasks.executors.base import Declared, Executor
from tasks.executors.local import InProcessExecutor
from tasks.executors.prefect import PrefectExecutor
from tasks.executors.settings import ExecutorSettings, task_runner

__all__ = [
    "Declared",
    "Executor",
    "ExecutorSettings",
    "InProcessExecutor",
    "PrefectExecutor",
    "current_executor",
    "executor_scope",
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


@contextmanager
def executor_scope(settings: ExecutorSettings | None) -> Iterator[Executor]:
    """Run the stages called inside this block (in a flow run) where `settings` says. Inside a
    scope with the same settings (the factory's, around each of its flows) it changes nothing;
    a Ray runner started here is shut down when the block ends."""
    chosen = _chosen.get()
    if settings is None or (isinstance(chosen, PrefectExecutor) and chosen.settings == settings):
        yield current_executor()
        return
    if settings.kind == "local":
        with use_executor(PrefectExecutor(settings=settings)) as executor:
            yield executor
        return
    runner = task_runner(settings)
    with runner, use_executor(PrefectExecutor(settings=settings, runner=runner)) as executor:
        yield executor
