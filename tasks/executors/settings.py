"""The executor setting of a run: where the shards of its stages run (`executor:` in a run
profile, `--set executor.kind=ray`, a typed parameter of every flow in the Prefect UI).

    executor: {kind: local}                                  # threads in the flow's process
    executor: {kind: ray, address: "127.0.0.1:6379"}          # a Ray cluster (prefect-ray)

It chooses the task runner the shard (and resource-hungry stage) task runs go to, and never a
version: the same flows, stages and versions run locally and on Ray. `ray_runtime_env` is what
every Ray worker gets from the driver: the project on its `PYTHONPATH`, the same data home, the
Prefect API (without it each worker would start its own ephemeral server on one SQLite file:
`database is locked`) and the variables named in `forward_env`.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from storage.errors import UserError
from storage.settings import PROJECT_ROOT, home, home_url

# Always passed to the workers when set in the driver: where the data and models live, how
# Prefect keeps results, offline switches.
FORWARDED_PREFIXES = ("EVOLFORGE_", "HF_", "TRANSFORMERS_")
FORWARDED_NAMES = (
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    "PREFECT_HOME",
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
    "PREFECT_LOCAL_STORAGE_PATH",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "TOKENIZERS_PARALLELISM",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


class StageResources(BaseModel):
    """What each task run of one stage asks of a Ray cluster, set per run (overrides the
    stage's declared `resources`, field by field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float | None = Field(None, ge=0, description="CPUs per task run")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per task run")
    memory: int | None = Field(None, ge=0, description="bytes of memory per task run")

    def options(self) -> dict[str, float | int]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ExecutorSettings(BaseModel):
    """Where the shards of each stage run: threads here (local) or a Ray cluster (ray)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["local", "ray"] = Field(
        "local",
        title="Executor",
        description="local: threads in the flow's process (EVOLFORGE_SHARD_WORKERS); ray: the "
        "task runs of shards on a Ray cluster (prefect-ray's RayTaskRunner)",
    )
    address: str | None = Field(
        None,
        title="Ray address",
        description="ray: the cluster's address, e.g. 127.0.0.1:6379 or ray://head:10001 "
        "(empty: $RAY_ADDRESS, else a Ray instance started for this run)",
    )
    shard_rows: int | None = Field(
        None,
        ge=1,
        title="Rows per shard",
        description="replaces each stage's declared shard size: smaller shards spread wider "
        "over a cluster (shard versions change with it, stage versions never)",
    )
    project_path: str | None = Field(
        None,
        description="ray: the project's checkout on the nodes, put on the workers' PYTHONPATH "
        "(empty: this checkout's path, as on one machine or an image built from it)",
    )
    forward_env: list[str] = Field(
        default_factory=lambda: [
            "OPENAI_API_KEY",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
        ],
        description="ray: environment variables the workers get from the driver, besides the "
        "data home, the S3 endpoint and Prefect's (they are visible in the job's runtime env; "
        "a key that must not be is better set on the nodes themselves, or an instance role)",
    )
    resources: dict[str, StageResources] = Field(
        default_factory=dict,
        description="ray: per stage name, what each of its task runs asks for (num_cpus, "
        "num_gpus, memory), over what the stage declares; e.g. {solve: {num_cpus: 2}}",
    )
    namespace: str = Field("evolforge", description="ray: the Ray namespace of the runs")

    def ray_runtime_env(self, api_url: str | None) -> dict[str, Any]:
        """The Ray runtime env of a run: the variables every worker process starts with."""
        env = {
            name: value
            for name, value in os.environ.items()
            if name.startswith(FORWARDED_PREFIXES) or name in FORWARDED_NAMES
        }
        env.update({name: os.environ[name] for name in self.forward_env if name in os.environ})
        # The home as configured (a folder, or `s3://bucket/prefix`), checked here first: on S3
        # `home()` is this machine's local folder, which the workers must not take for the home.
        home()
        env["EVOLFORGE_HOME"] = home_url()
        env["PYTHONPATH"] = self.project_path or str(PROJECT_ROOT)
        if api_url:
            env["PREFECT_API_URL"] = api_url
        return {"env_vars": env}


def task_runner(settings: ExecutorSettings) -> Any:
    """The Prefect task runner for `settings.kind == "ray"`: checked before any stage runs."""
    from prefect.settings import get_current_settings

    if settings.kind != "ray":
        raise ValueError("task_runner is for executor.kind=ray; local runs on the flow's runner")
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:
        raise UserError(
            "executor.kind=ray needs ray and prefect-ray: pip install 'evolforge[ray]'"
        ) from exc
    api_url = get_current_settings().api.url
    if not api_url:
        raise UserError(
            "executor.kind=ray needs a Prefect server that every node reaches: export "
            "PREFECT_API_URL=http://HOST:4200/api (`evolforge cluster up` prints it)"
        )
    return RayTaskRunner(
        address=settings.address,
        init_kwargs={
            "namespace": settings.namespace,
            "runtime_env": settings.ray_runtime_env(api_url),
            "log_to_driver": False,  # task runs log to the Prefect API; no second copy
        },
    )
