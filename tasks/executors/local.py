"""The in-process executor: every shard and the merge run here, one after another.

Used outside a flow run (tests, `evolforge ingest`, a notebook): no Prefect, no task runner.
"""

from __future__ import annotations

from typing import Any

from tasks.contracts import StageResult
from tasks.executors.base import Declared, Executor


class InProcessExecutor(Executor):
    """Runs a stage in the calling process; a cache hit when every output exists."""

    def run(self, stage: Declared, values: dict[str, Any]) -> StageResult:
        return self.publish(self.execute(stage, values))
