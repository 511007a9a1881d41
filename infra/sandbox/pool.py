"""The pool of warm sandboxed fork servers (`Sandbox`), its settings and results."""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from infra.sandbox.cgroups import ProgramCgroup
from infra.sandbox.driver import Worker, WorkerLost
from infra.sandbox.layout import Isolation
from infra.sandbox.limits import MEMORY_CAP_ENV, SandboxLimits, memory_cap_mb
from infra.sandbox.logs import log, log_once
from infra.sandbox.probe import current_isolation, isolation_available


class SandboxSettings(SandboxLimits):
    """The limits plus how the sandbox runs: what a stage's parameters hold."""

    workers: int = Field(2, ge=1, description="programs run at once")
    allow_unsafe: bool = Field(
        False,
        description="run programs without isolation (rlimits and timeouts only); never in "
        "production",
    )

    def limits(self) -> SandboxLimits:
        return SandboxLimits(**self.model_dump(include=set(SandboxLimits.model_fields)))

    def fingerprint(self) -> dict[str, Any]:
        """How many programs run at once does not change what they print."""
        return self.model_dump(mode="json", exclude={"workers"})

    def open(self) -> Sandbox:
        return Sandbox(self.limits(), workers=self.workers, allow_unsafe=self.allow_unsafe)


@dataclass
class SandboxResult:
    stdout: str
    stderr_tail: str
    exit_code: int | None  # negative: killed by that signal; None: no exit status was observed
    timed_out: bool
    killed_by_limit: str | None  # wall, cpu, memory, file_size, open_files, processes, output
    wall_s: float
    error: str | None = None  # the sandbox's own failure, not the program's
    # Syscalls the seccomp filter refused (each failed with EPERM), in the order first tried.
    denied: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class SandboxUnavailableError(RuntimeError):
    """No isolation is available and unsafe local execution was not allowed."""


class Sandbox:
    """A pool of warm sandboxed fork servers; `run` is thread-safe, `run_many` uses them all."""

    def __init__(
        self,
        limits: SandboxLimits = SandboxLimits(),
        workers: int = 2,
        allow_unsafe: bool = False,
    ) -> None:
        if workers < 1:
            raise ValueError(f"sandbox workers must be >= 1, got {workers}")
        available, reason = isolation_available()
        isolation = current_isolation() if available else None
        if isolation is None:
            if not allow_unsafe:
                raise SandboxUnavailableError(
                    f"refusing to run model-written code: {reason}. Fix that (README, "
                    '"Program sandbox"), or pass allow_unsafe=True to run it in a plain '
                    "subprocess with only rlimits."
                )
            log.warning(
                "sandbox isolation unavailable (%s); running programs UNSAFELY in plain "
                "subprocesses with only rlimits, timeouts, a seccomp filter where the "
                "architecture allows it and a scrubbed environment",
                reason,
            )
            self.bound = "rlimits per process (unsafe mode)"
        else:
            self.bound = self._check_bound(limits, workers, isolation)
        self.limits = limits
        self.isolation = isolation
        self.sandboxed = isolation is not None
        self.size = workers
        self.recycled = 0
        self._idle: queue.Queue[Worker] = queue.Queue()
        self._all: set[Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        try:
            for _ in range(workers):
                self._idle.put(self._start_worker())
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _check_bound(limits: SandboxLimits, workers: int, isolation: Isolation) -> str:
        """Which bound holds a program's memory and processes; refuse one above the cap."""
        if isolation.cgroup is not None:
            per_program = limits.memory_mb
            bound = (
                f"{isolation.cgroup.describe()}: each program at most {limits.memory_mb} MiB "
                f"and {limits.max_processes} processes in total"
            )
        else:
            per_program = limits.max_processes * limits.memory_mb
            bound = (
                f"rlimits ({isolation.cgroup_reason}): RLIMIT_NPROC counted per sandbox, so each "
                f"program at most {limits.max_processes} processes of {limits.memory_mb} MiB "
                f"address space = {per_program} MiB"
            )
        cap = memory_cap_mb()
        if per_program * workers > cap:
            raise SandboxUnavailableError(
                f"refusing to start: {workers} workers x {per_program} MiB per program "
                f"({'memory_mb' if isolation.cgroup else 'max_processes x memory_mb'}) exceeds "
                f"the cap of {cap} MiB (${MEMORY_CAP_ENV}, default half the RAM); lower the "
                "limits or the workers"
            )
        log_once(
            logging.INFO,
            f"sandbox: {isolation.description}; resource bound: {bound}; "
            f"{workers} workers x {per_program} MiB <= cap {cap} MiB",
        )
        return bound

    def _start_worker(self) -> Worker:
        cgroup = None
        if self.isolation is not None and self.isolation.cgroup is not None:
            cgroup = ProgramCgroup(self.isolation.cgroup, self.limits)
        try:
            worker = Worker(self.limits, self.isolation, cgroup=cgroup)
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            raise
        with self._lock:
            self._all.add(worker)
        return worker

    def _discard(self, worker: Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)
            self.recycled += 1

    def run(self, code: str, stdin: str = "") -> SandboxResult:
        if self._closed:
            raise RuntimeError("sandbox is closed")
        worker = self._idle.get()
        started = time.monotonic()
        try:
            answer = worker.execute(code, stdin, self.limits)
        except WorkerLost as exc:
            self._discard(worker)
            self._idle.put(self._start_worker())
            wall = time.monotonic() - started
            timed_out = wall >= self.limits.wall_s
            return SandboxResult(
                stdout="",
                stderr_tail="",
                exit_code=None,
                timed_out=timed_out,
                killed_by_limit="wall" if timed_out else None,
                wall_s=wall,
                error=f"{exc}; sandbox recycled",
            )
        except BaseException:
            self._discard(worker)
            if not self._closed:
                self._idle.put(self._start_worker())
            raise
        oom_kills = pid_limit_hits = 0
        if worker.cgroup is not None:
            before = worker.cgroup.last
            worker.cgroup.last = worker.cgroup.counters()
            oom_kills = worker.cgroup.last[0] - before[0]
            pid_limit_hits = worker.cgroup.last[1] - before[1]
        if answer.get("recycle"):
            self._discard(worker)
            self._idle.put(self._start_worker())
        else:
            self._idle.put(worker)
        if "error" in answer and "stdout" not in answer:
            return SandboxResult(
                stdout="",
                stderr_tail="",
                exit_code=None,
                timed_out=False,
                killed_by_limit=None,
                wall_s=time.monotonic() - started,
                error=f"sandbox worker failed: {answer['error'].strip().splitlines()[-1]}",
            )
        killed_by = answer["killed_by_limit"]
        exit_code = answer["exit_code"]
        if oom_kills and exit_code == -signal.SIGKILL and killed_by is None:
            killed_by = "memory"  # the cgroup's OOM killer ended it
        elif pid_limit_hits and exit_code not in (0, None) and killed_by is None:
            killed_by = "processes"
        return SandboxResult(
            stdout=answer["stdout"],
            stderr_tail=answer["stderr_tail"],
            exit_code=exit_code,
            timed_out=answer["timed_out"],
            killed_by_limit=killed_by,
            wall_s=answer["wall_s"],
            error="the program left the sandbox unclean; sandbox recycled"
            if answer.get("recycle")
            else None,
            denied=answer.get("denied", []),
        )

    def run_many(self, programs: list[str]) -> list[SandboxResult]:
        """Run the programs over all workers; results come back in the programs' order."""
        if not programs:
            return []
        with ThreadPoolExecutor(max_workers=min(self.size, len(programs))) as pool:
            return list(pool.map(self.run, programs))

    def warm_up(self) -> None:
        """Wait until every worker has finished its imports (benchmarks call this first)."""
        with self._lock:
            workers = list(self._all)
        with ThreadPoolExecutor(max_workers=len(workers)) as pool:
            list(pool.map(Worker.wait_ready, workers))

    def close(self) -> None:
        self._closed = True
        with self._lock:
            workers = list(self._all)
            self._all.clear()
        for worker in workers:
            worker.kill()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


def run_program(
    code: str, limits: SandboxLimits | None = None, allow_unsafe: bool = False
) -> SandboxResult:
    """Run one program in a one-worker sandbox (convenient, not fast: use `Sandbox` for batches)."""
    with Sandbox(limits or SandboxLimits(), workers=1, allow_unsafe=allow_unsafe) as sandbox:
        return sandbox.run(code)
