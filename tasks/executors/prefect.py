"""The Prefect executor: a stage is a Prefect task cached on its version, its shards task runs.

Inside a flow run each stage becomes a task run whose cache key is the stage's version (never
the run id), so Prefect's UI shows it and a rerun answers from the cache. A sharded stage first
submits its shards as task runs to the flow's task runner — threads by default
(`EVOLFORGE_SHARD_WORKERS`), a Ray cluster with `prefect_ray.RayTaskRunner` — and the stage's
own task run then merges them. Which runner places the shards is the run's `executor` setting
(`tasks/executors/settings.py`, opened by `executor_scope`); nothing here or in a stage's code
changes with it. On Ray, a stage's `resources` (and a GPU for a vLLM engine) become the Ray
`remote_options` of its task runs, and a stage that is not sharded runs on the cluster too when
it declares resources; every other stage, and every merge, runs in the flow's own process.
Task runs return small values (a shard's index, a `StageResult` of refs and stats), never
frames: the data goes through the data home. Logs go to the task run's logger, progress to
Prefect progress artifacts.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

from storage.datasets import current_flow_run
from tasks.contracts import ProgressReporter, ShardSpec, StageResult
from tasks.executors.base import Declared, Executor
from tasks.executors.settings import ExecutorSettings

log = logging.getLogger("tasks.stage")


class PrefectExecutor(Executor):
    """Runs stages as cached Prefect tasks on the current flow's task runner."""

    def __init__(
        self, home: Any = None, settings: ExecutorSettings | None = None, runner: Any = None
    ):
        super().__init__(home)
        self.settings = settings or ExecutorSettings()
        self.shard_rows = self.settings.shard_rows
        # The task runner shards go to: None is the flow's own (threads); a started
        # `RayTaskRunner` for executor.kind=ray.
        self.runner = runner
        # One Prefect task object per (stage, which): building tasks is not free, and Prefect
        # groups task runs by them. Keyed by the declaration (declarations live forever).
        self._tasks: dict[tuple[int, str], Any] = {}
        self._shard_progress: dict[tuple[str, str], Any] = {}
        self._cluster_gpus: bool | None = None  # whether the Ray cluster has GPUs, looked up once

    def __getstate__(self) -> dict[str, Any]:
        """What a task run shipped to a Ray worker needs of its executor: the home and the
        settings, not the runner, the Prefect tasks or the progress artifacts."""
        return {"home": self._home, "settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["home"], state["settings"])  # type: ignore[misc]

    def run(self, stage: Declared, values: dict[str, Any]) -> StageResult:
        done = self.done(stage, values)
        if stage.shard is not None and not done:
            self.submit_shards(stage, values)
        if not done and stage.shard is None and self.remote_options(stage, values):
            # A stage that asks for resources (a GPU, many CPUs) runs where they are.
            with self.placement(stage, values):
                result = self.submit(self.task(stage, "stage"), values).result()
        else:
            result = self.task(stage, "stage")(**values)
        # Prefect may answer from its result cache, whose record says how the version was made
        # the first time: the outputs existing before this call is what makes it a cache hit.
        result = replace(result, cached=True) if done else result
        return self.publish(result)  # here, in the flow's process: the one catalog writer

    def submit_shards(self, stage: Declared, values: dict[str, Any]) -> None:
        """Submit the shards to the flow's task runner and wait for them, in order."""
        specs = stage.shard_plan(values, self.home, self.shard_rows)
        task = self.task(stage, "shard")
        with self.placement(stage, values):
            futures = [self.submit(task, {"values": values, "spec": spec}) for spec in specs]
        for done, future in enumerate(futures, start=1):
            future.result()
            if len(specs) > 1:
                self.shards_done(stage, done, len(specs))

    def submit(self, task: Any, parameters: dict[str, Any]) -> Any:
        """A task run on this executor's runner, else on the flow's (what `task.submit` does)."""
        if self.runner is None:
            return task.submit(**parameters)
        return self.runner.submit(task, parameters)

    def remote_options(self, stage: Declared, values: dict[str, Any]) -> dict[str, Any]:
        """Ray `remote_options` of the stage's task runs (none off Ray). A GPU task keeps its
        worker process (`max_calls=0`; Ray's default for GPU tasks is a new process per task),
        so the vLLM engine it built serves the next shards instead of loading again."""
        if self.settings.kind != "ray" or self.runner is None:
            return {}
        if getattr(self, "_cluster_gpus", None) is None:  # one look at the cluster per run
            self._cluster_gpus = _cluster_has_gpus()
        options = stage.resources_for(values, cluster_gpus=self._cluster_gpus)
        chosen = self.settings.resources.get(stage.name)
        if chosen is not None:
            options.update(chosen.options())
        if options.get("num_gpus"):
            options["max_calls"] = 0
        return options

    def placement(self, stage: Declared, values: dict[str, Any]) -> Any:
        options = self.remote_options(stage, values)
        if not options:
            return nullcontext()
        from prefect_ray.context import remote_options

        return remote_options(**options)

    # -- Prefect tasks ------------------------------------------------------------------------
    def task(self, stage: Declared, which: str) -> Any:
        key = (id(stage), which)
        if key not in self._tasks:
            self._tasks[key] = self._make_task(stage, which)
        return self._tasks[key]

    def _make_task(self, stage: Declared, which: str) -> Any:
        from prefect import task

        executor = self
        if which == "stage":

            def run_stage(*args: Any, **kwargs: Any) -> StageResult:
                bound = stage.signature.bind(*args, **kwargs)
                return executor.execute(stage, stage.bind(dict(bound.arguments)))

            # The task run shows the stage's own parameters in the UI, not one opaque dict.
            run_stage.__signature__ = stage.signature  # type: ignore[attr-defined]

            def stage_key(context: Any, parameters: dict[str, Any]) -> str | None:
                values = stage.bind(parameters)
                if not executor.done(stage, values):
                    return None
                return f"{stage.name}-{stage.version_of(values)}"

            doc = (stage.fn.__doc__ or "").strip()
            return task(
                name=stage.task_name,
                description=doc.splitlines()[0] if doc else None,
                cache_key_fn=stage_key,
                persist_result=True,
            )(run_stage)

        def run_shard(values: dict[str, Any], spec: ShardSpec) -> dict[str, Any]:
            return executor.run_shard(stage, values, spec)

        def shard_key(context: Any, parameters: dict[str, Any]) -> str | None:
            spec: ShardSpec = parameters["spec"]
            if not executor.shard_done(stage, spec):
                return None
            return f"{stage.name}-shard-{spec.version}"

        return task(
            name=f"{stage.task_name}-shard",
            task_run_name=f"{stage.task_name}-shard-{{spec.index}}",
            cache_key_fn=shard_key,
            persist_result=True,
        )(run_shard)

    # -- reporting ------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        """To the task run's log (the Prefect UI shows it) or, outside a run, the module's."""
        from prefect.context import TaskRunContext
        from prefect.logging import get_run_logger

        if TaskRunContext.get() is not None:
            get_run_logger().info(message)
        else:
            log.info(message)

    def reporter(self, stage: Declared) -> ProgressReporter:
        artifact: list[Any] = []  # the progress artifact of this stage run, once made

        def report(done: float, total: float, description: str | None) -> None:
            try:
                from prefect.artifacts import create_progress_artifact, update_progress_artifact
                from prefect.context import TaskRunContext

                if TaskRunContext.get() is None:
                    return
                percent = 100.0 * done / total if total else 100.0
                text = description or f"{stage.name}: {done:g} of {total:g}"
                if not artifact:
                    artifact.append(
                        create_progress_artifact(
                            percent, key=artifact_key(f"{stage.name}-progress"), description=text
                        )
                    )
                else:
                    update_progress_artifact(artifact[0], percent, description=text)
            except Exception as exc:  # progress is cosmetic: a failure must not fail the stage
                log.debug("progress artifact not updated: %s", exc)

        return report

    def shards_done(self, stage: Declared, done: int, total: int) -> None:
        """A Prefect progress artifact per sharded stage and flow run: shards done of total."""
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            run = current_flow_run() or ""
            percent = 100.0 * done / total
            text = f"{stage.name}: {done} of {total} shards"
            made = self._shard_progress.get((run, stage.name))
            if made is None:
                self._shard_progress[(run, stage.name)] = create_progress_artifact(
                    percent, key=artifact_key(f"{stage.name}-shards"), description=text
                )
            else:
                update_progress_artifact(made, percent, description=text)
        except Exception as exc:  # progress is cosmetic: a failure must not fail a stage
            log.debug("progress artifact not updated: %s", exc)


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _cluster_has_gpus() -> bool:
    """Whether the Ray cluster this driver is connected to has any GPU (True when it is not
    connected: a GPU is then asked for, as configured)."""
    try:
        import ray
    except ImportError:
        return True
    if not ray.is_initialized():
        return True
    return ray.cluster_resources().get("GPU", 0) > 0
