"""Turning a stage's plain function into a cached Prefect task.

A stage is planned before it runs: `plan(**inputs)` returns a `StagePlan` (stage name, code
version, parameters, parent versions, output names), whose version id is the content hash that
names the stage's outputs. The Prefect task's cache key is that version id, so caching follows
the inputs' dataset versions, the parameters and the code, never the run id. While the outputs
do not exist on disk the key is None (no cache lookup), so a deleted dataset is recomputed
instead of being served from a stale Prefect result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from storage.datasets import DatasetRef
from storage.stages import StageOutput, StageResult, outputs_exist, run_stage, stage_version


@dataclass
class StagePlan:
    stage: str
    code: str
    params: dict[str, Any]
    parents: list[str]
    outputs: list[str]

    @property
    def version(self) -> str:
        return stage_version(self.stage, self.code, self.params, self.parents)

    def run(self, compute: Callable[[], StageOutput]) -> StageResult:
        return run_stage(self.stage, self.code, self.params, self.parents, self.outputs, compute)


def result_dict(result: StageResult) -> dict[str, Any]:
    """The small, JSON-able value a stage task returns: output refs, whether cached, stats."""
    return {
        "refs": {k: str(v) for k, v in result.refs.items()},
        "cached": result.cached,
        "stats": result.stats,
    }


def ref(value: str | DatasetRef) -> DatasetRef:
    return value if isinstance(value, DatasetRef) else DatasetRef.parse(value)


def stage_task(name: str, plan: Callable[..., StagePlan], **task_options: Any):
    """Decorate `fn(**inputs) -> dict` as a Prefect task cached on `plan(**inputs).version`."""
    from prefect import task

    def cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
        p = plan(**parameters)
        return f"{p.stage}-{p.version}" if outputs_exist(p.outputs, p.version) else None

    def decorate(fn: Callable[..., dict[str, Any]]):
        return task(name=name, cache_key_fn=cache_key, persist_result=True, **task_options)(fn)

    return decorate
