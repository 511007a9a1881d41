"""Multi-process training: `training.launcher.processes` > 1 runs a trainer in that many
processes started by `accelerate launch`, so several GPUs (or CPU processes) train one model.

Each trainer is split in two: `fit_<trainer>` builds the trainer, trains (resuming from the
newest complete checkpoint), computes what needs the trainer (SFT's eval loss) and saves the
checkpoint; the stage body around it computes the metrics that need only the saved model.
`fit` runs `fit_<trainer>` in this process when `processes` is 1 (the default: exactly the
one-process path) and otherwise:

1. writes a job into `ctx.work_dir(<output>)/launch/`: the function's name, its arguments
   (frames as parquet, pydantic models as JSON), nothing else;
2. runs `python -m tasks.training.launch JOB`, which calls accelerate's launcher
   (`accelerate launch --multi_gpu --num_processes N -m tasks.training.launch JOB`, through its
   Python API) on a free loopback port; torch's elastic agent starts the N ranks. On a GPU
   machine each rank takes one GPU (NCCL); on the CPU (`device: cpu`, or no GPU) the ranks are
   CPU processes with the gloo backend, each with its share of the CPUs' threads
   (`common.pick_threads`). Each rank writes its output to `launch/rank<k>.log`;
3. every rank calls the same `fit_<trainer>`; transformers' Trainer shards each batch across
   the ranks (`batch_size` is per process, so a step sees `processes × batch_size` rows),
   averages the gradients and logs the loss gathered over the ranks. Rank 0 alone writes the
   checkpoint, the TensorBoard events, the training log and `launch/result.json` (its stats,
   plus counters summed over the ranks: unscored rewards, the judge engine's requests);
4. rank 0's progress goes to `launch/progress.json`, which the stage turns into its progress.

A failure in any rank fails the stage with one line: the rank, its exit and the tail of its
log. Killing the stage's process kills the launcher and the ranks (parent-death signals).
The artifact is the one-process run's in shape (the same files, config and stats keys):
`processes` is in the stats, and in the version, because it changes the numbers.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from infra.processes import free_port, stop_group
from tasks.training import common

LAUNCH_DIR = "launch"
JOB = "job.json"
RESULT = "result.json"
PROGRESS = "progress.json"
LAUNCHER_LOG = "launcher.log"
# Lines of a failing rank's log carried by the stage's error.
TAIL_LINES = 6
TAIL_CHARS = 600


class LauncherParams(BaseModel):
    """How a trainer's processes are started: 1 trains in the stage's own process; N > 1 starts
    N processes through `accelerate launch` (one per GPU; CPU processes with gloo on a CPU)."""

    model_config = ConfigDict(extra="forbid")

    processes: int = Field(
        1,
        ge=1,
        description="processes that train one model (data parallel): 1 trains in process; "
        "N > 1 launches N through accelerate (one GPU each, or CPU processes with gloo)",
    )

    def fingerprint(self) -> dict[str, Any]:
        # Part of the version: the ranks split each step's rows, so N changes the numbers.
        return {"processes": self.processes}


class TrainingLaunchError(RuntimeError):
    """A launched training process failed (one line: the rank, its exit and its log's tail)."""


@dataclass
class Fitted:
    """What `fit_<trainer>` returns: stats (the same on every rank; rank 0's are kept),
    counters summed over the ranks (flat or one level of nested numbers), and the trained
    model when it ran in this process (None when launched: the stage loads the checkpoint)."""

    stats: dict[str, Any]
    counts: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    extra: dict[str, Any] = field(default_factory=dict)  # in-process only (not sent back)


def fit(fn: Any, ctx: Any, output: str, launcher: LauncherParams, **args: Any) -> Fitted:
    """`fn(ctx, **args)` in this process (processes 1), or in `launcher.processes` processes
    through accelerate; `args["params"]` (the trainer's parameters) decides GPU or CPU."""
    if launcher.processes == 1:
        return fn(ctx, **args)
    return _launch(fn, ctx, output, launcher, args)


# -- the stage's side -------------------------------------------------------------------------


def _encode(name: str, value: Any, job: Path) -> dict[str, Any]:
    if isinstance(value, pl.DataFrame):
        file = f"{name}.parquet"
        value.write_parquet(job / file)
        return {"frame": file}
    if isinstance(value, BaseModel):
        cls = type(value)
        return {"model": f"{cls.__module__}:{cls.__qualname__}", "json": value.model_dump_json()}
    if isinstance(value, Path):
        return {"value": str(value)}
    return {"value": value}


def _decode(spec: dict[str, Any], job: Path) -> Any:
    if "frame" in spec:
        return pl.read_parquet(job / spec["frame"])
    if "model" in spec:
        return _resolve(spec["model"]).model_validate_json(spec["json"])
    return spec["value"]


def _resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    value: Any = importlib.import_module(module)
    for part in name.split("."):
        value = getattr(value, part)
    return value


def accelerate_args(processes: int, bf16: bool, port: int) -> list[str]:
    """`accelerate launch` options: N processes on this machine, precision as the trainer's."""
    return [
        "--multi_gpu",  # torch's elastic launcher: N processes (CPU ones too, with use_cpu)
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16" if bf16 else "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
    ]


def _launch(fn: Any, ctx: Any, output: str, launcher: LauncherParams, args: dict) -> Fitted:
    import torch

    from infra.engines.cpu import usable_cpus
    from storage.settings import PROJECT_ROOT

    n = launcher.processes
    settings = common.device_settings(args["params"])
    if not settings["use_cpu"] and torch.cuda.device_count() < n:
        raise ValueError(
            f"training.launcher.processes is {n} but {torch.cuda.device_count()} GPU(s) are "
            "visible: one process per GPU (set the trainer's device: cpu for CPU processes)"
        )
    job = ctx.work_dir(output) / LAUNCH_DIR
    shutil.rmtree(job, ignore_errors=True)
    job.mkdir(parents=True)
    spec = {
        "fit": f"{fn.__module__}:{fn.__qualname__}",
        "name": ctx.name,
        "args": {k: _encode(k, v, job) for k, v in args.items()},
        "accelerate": accelerate_args(n, settings["bf16"], free_port()),
    }
    (job / JOB).write_text(json.dumps(spec, indent=1), encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    env["TOKENIZERS_PARALLELISM"] = "false"
    for inherited in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(inherited, None)  # a stage run inside another launch starts its own ranks
    if settings["use_cpu"]:
        env["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // n))
    with (job / LAUNCHER_LOG).open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.training.launch", str(job)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        seen = None
        while proc.poll() is None:
            seen = _forward_progress(ctx, job / PROGRESS, seen)
            time.sleep(0.5)
        _forward_progress(ctx, job / PROGRESS, seen)
    except BaseException:
        stop_group(proc, grace_s=15)
        raise
    if proc.returncode != 0 or not (job / RESULT).is_file():
        raise TrainingLaunchError(failure_line(ctx.name, job, n, proc.returncode))
    result = json.loads((job / RESULT).read_text(encoding="utf-8"))
    counts = result["counts"]
    if counts.get("engine"):  # the ranks' judge requests count as this stage's
        ctx.count_engine(counts.pop("engine"))
    return Fitted(stats=result["stats"], counts=counts)


def _forward_progress(ctx: Any, path: Path, seen: Any) -> Any:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return seen
    if state != seen:
        ctx.progress(state["done"], state["total"], state.get("description"))
    return state


def failure_line(name: str, job: Path, processes: int, code: int | None) -> str:
    """One line: which rank failed (the first that recorded an error, else the first that did
    not finish, else the launcher), its exit, and the tail of its log."""
    failed = [r for r in range(processes) if (job / f"rank{r}.error").is_file()]
    unfinished = [r for r in range(processes) if not (job / f"rank{r}.done").is_file()]
    candidates = [r for r in failed + unfinished if (job / f"rank{r}.log").is_file()]
    if candidates:
        rank = candidates[0]
        who, log = f"rank {rank} of {processes}", job / f"rank{rank}.log"
    else:
        who, log = "the accelerate launcher", job / LAUNCHER_LOG
    return f"{name}: training process {who} failed (exit {code}): {log_tail(log)} [log: {log}]"


def log_tail(path: Path, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    """The last non-empty lines of a log, joined into one line (progress bars dropped)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    kept = [
        line.strip()
        for line in text.replace("\r", "\n").splitlines()
        if line.strip() and "it/s]" not in line and "s/it]" not in line
    ]
    tail = " | ".join(kept[-lines:]) or "(empty log)"
    return tail if len(tail) <= chars else "…" + tail[-chars:]


# -- the launched side --------------------------------------------------------------------------


class _RankContext:
    """What a fit function asks of its context, in a launched rank: the stage's name, progress
    (rank 0 writes it to a file), engines (their counters are summed over the ranks)."""

    def __init__(self, name: str, progress_file: Path | None):
        self.name = name
        self._file = progress_file
        self._engines: list[Any] = []

    def progress(self, done: float, total: float, description: str | None = None) -> None:
        if self._file is None:
            return
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"done": done, "total": total, "description": description}))
        os.replace(tmp, self._file)

    def engine(self, config: Any) -> Any:
        from infra.engines import open_engine

        engine = open_engine(config, self.name)
        self._engines.append(engine)
        return engine

    def engine_stats(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for engine in self._engines:
            for key, value in engine.stats.items():
                total[key] = round(total.get(key, 0) + value, 3)
        return total


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (a killed stage leaves no ranks)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: nothing to set
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def add_counts(total: dict[str, Any], counts: dict[str, Any]) -> dict[str, Any]:
    """Sum counters: numbers, and dicts of numbers one level down."""
    for key, value in counts.items():
        if isinstance(value, dict):
            inner = total.setdefault(key, {})
            for k, v in value.items():
                inner[k] = round(inner.get(k, 0) + v, 3)
        else:
            total[key] = round(total.get(key, 0) + value, 3)
    return total


def _gather(counts: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [counts]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, counts)
    return out


def _rank_main(job: Path) -> int:
    rank = int(os.environ.get("RANK", "0"))
    log = (job / f"rank{rank}.log").open("ab", buffering=0)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    _die_with_parent()
    try:
        spec = json.loads((job / JOB).read_text(encoding="utf-8"))
        fn = _resolve(spec["fit"])
        args = {k: _decode(v, job) for k, v in spec["args"].items()}
        ctx = _RankContext(spec["name"], job / PROGRESS if rank == 0 else None)
        fitted = fn(ctx, **args)
        counts = dict(fitted.counts)
        engine = ctx.engine_stats()
        if engine:
            counts["engine"] = engine
        gathered = _gather(counts)
        if rank == 0:
            total: dict[str, Any] = {}
            for part in gathered:
                add_counts(total, part)
            tmp = job / f"{RESULT}.tmp"
            tmp.write_text(json.dumps({"stats": fitted.stats, "counts": total}, default=str))
            os.replace(tmp, job / RESULT)
        (job / f"rank{rank}.done").touch()
        return 0
    except BaseException as exc:
        traceback.print_exc()
        sys.stderr.flush()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        (job / f"rank{rank}.error").write_text(f"{type(exc).__name__}: {first}")
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _launcher_main(job: Path) -> int:
    """Start the ranks through accelerate's launcher (its Python API), in this process."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    _die_with_parent()
    spec = json.loads((job / JOB).read_text(encoding="utf-8"))
    argv = [*spec["accelerate"], "-m", "tasks.training.launch", str(job)]
    launch_command(launch_command_parser().parse_args(argv))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = Path(argv[0])
    # torch's elastic agent sets LOCAL_RANK in every rank it starts.
    return _rank_main(job) if "LOCAL_RANK" in os.environ else _launcher_main(job)


if __name__ == "__main__":
    sys.exit(main())
