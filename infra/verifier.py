"""A pool of killable worker processes that judge (prediction, reference) pairs.

Why processes: parsing model-written strings with sympy can hang or explode
(`10^{10^{10^{10}}}` makes sympy build a gigantic integer in C code that no signal interrupts),
and math-verify's own timeouts use SIGALRM, which only works in a process's main thread, while
Prefect runs tasks in worker threads. So the judge function (by default
`tasks.solutions.answers:judge_pair`) runs in a small pool of fresh interpreter processes, in
each worker's main thread, under an address-space limit. The parent streams items to the
workers and watches progress: a worker that produces no result for `item_deadline_s` is killed
and replaced, the item it was stuck on is answered None, and the rest of its chunk is
re-queued. The parent never uses signals, so `judge` is safe to call from any thread.

What a worker judges is the caller's business (a pure function named by import path); this
module knows nothing about answers.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from storage.settings import PROJECT_ROOT

log = logging.getLogger(__name__)

_READY = "ready"


def _worker_entry(read_fd: int, write_fd: int, memory_mb: int, target: str, options: str) -> None:
    """Worker loop: receive chunks of (index, prediction, reference), send (index, verdict)."""
    import resource
    import signal

    inbox = Connection(read_fd, writable=False)
    conn = Connection(write_fd, readable=False)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    module, _, function = target.partition(":")
    judge = getattr(importlib.import_module(module), function)
    kwargs = json.loads(options)
    judge("1", "1", **kwargs)  # import and warm the judge
    conn.send(_READY)
    while True:
        try:
            chunk = inbox.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for index, prediction, reference in chunk:
            try:
                verdict = judge(prediction, reference, **kwargs)
            except MemoryError:
                verdict = None
            conn.send((index, verdict))


_WORKER_CODE = (
    "import sys; from infra.verifier import _worker_entry; "
    "_worker_entry(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])"
)


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection  # results from the worker
    outbox: Connection  # chunks to the worker
    started: float
    ready: bool = False
    inflight: deque[int] = field(default_factory=deque)
    last_progress: float = 0.0


class VerifierPool:
    """Worker processes running a judge function, with a per-item wall-clock deadline.

    `target` names the judge as `module:function`; it is called as
    `function(prediction, reference, **options)` in each worker's main thread, so its own
    SIGALRM timeouts work there. `item_deadline_s` is the parent's hard limit on a worker
    making no progress, after which the worker is killed and replaced. `startup_deadline_s`
    covers spawning a worker and its imports (sympy) on a busy machine.
    """

    def __init__(
        self,
        target: str,
        options: dict[str, Any] | None = None,
        workers: int = 2,
        item_deadline_s: float = 8.0,
        startup_deadline_s: float = 90.0,
        memory_mb: int = 4096,
        chunk_size: int = 16,
    ):
        if workers < 1:
            raise ValueError(f"VerifierPool workers must be >= 1, got {workers}")
        module, sep, function = target.partition(":")
        if not sep or not module or not function:
            raise ValueError(f"VerifierPool target must be 'module:function', got {target!r}")
        self.target = target
        self.options = dict(options or {})
        self.workers = workers
        self.item_deadline_s = item_deadline_s
        self.startup_deadline_s = startup_deadline_s
        self.memory_mb = memory_mb
        self.chunk_size = chunk_size
        self.killed = 0  # workers killed for missing a deadline, over the pool's life
        self._pool: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def _spawn(self) -> _Worker:
        # A fresh interpreter (not multiprocessing's spawn, which re-runs the caller's __main__
        # script) talking over two inherited pipes with multiprocessing's Connection framing.
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        root = str(PROJECT_ROOT)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WORKER_CODE,
                    str(to_child_r),
                    str(from_child_w),
                    str(self.memory_mb),
                    self.target,
                    json.dumps(self.options),
                ],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        now = time.monotonic()
        return _Worker(
            process=process,
            conn=Connection(from_child_r, writable=False),
            outbox=Connection(to_child_w, readable=False),
            started=now,
            last_progress=now,
        )

    def _kill(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.wait(timeout=5)
        worker.conn.close()
        worker.outbox.close()

    def judge(self, pairs: list[tuple[str, str]]) -> list[bool | None]:
        """The judge's verdicts for (prediction, reference) pairs, None where it could not
        judge (it timed out, ran out of memory, or its worker was killed at the deadline)."""
        if not pairs:
            return []
        with self._lock:
            if self._closed:
                raise RuntimeError("VerifierPool is closed")
            while len(self._pool) < self.workers:
                self._pool.append(self._spawn())
            return self._judge(pairs)

    def _judge(self, pairs: list[tuple[str, str]]) -> list[bool | None]:
        results: list[bool | None] = [None] * len(pairs)
        done = [False] * len(pairs)
        pending = deque(range(len(pairs)))
        remaining = len(pairs)
        startup_failures = 0
        while remaining:
            for worker in self._pool:
                if not worker.inflight and pending:
                    chunk = [pending.popleft() for _ in range(min(self.chunk_size, len(pending)))]
                    worker.inflight.extend(chunk)
                    # A dead worker fails the send; it is noticed and replaced below.
                    with contextlib.suppress(OSError):
                        worker.outbox.send([(i, *pairs[i]) for i in chunk])
                    worker.last_progress = max(worker.last_progress, time.monotonic())
            busy = [w for w in self._pool if w.inflight]
            readable = wait([w.conn for w in busy], timeout=0.5)
            now = time.monotonic()
            for position, worker in enumerate(list(self._pool)):
                died = False
                if worker.conn in readable:
                    try:
                        while worker.conn.poll():
                            msg = worker.conn.recv()
                            worker.last_progress = time.monotonic()
                            if msg == _READY:
                                worker.ready = True
                                continue
                            index, verdict = msg
                            if worker.inflight and worker.inflight[0] == index:
                                worker.inflight.popleft()
                            if not done[index]:
                                results[index], done[index] = verdict, True
                                remaining -= 1
                    except (EOFError, OSError):
                        died = True
                deadline = self.item_deadline_s if worker.ready else self.startup_deadline_s
                stuck = bool(worker.inflight) and now - worker.last_progress > deadline
                if not (died or stuck or worker.process.poll() is not None):
                    continue
                if not worker.ready:
                    startup_failures += 1
                    if startup_failures > 3:
                        raise RuntimeError(
                            f"verifier workers for {self.target} fail to start (exit code "
                            f"{worker.process.returncode})"
                        )
                self._kill(worker)
                if stuck:
                    self.killed += 1
                if worker.inflight and worker.ready:
                    # The item the worker was stuck on cannot be judged; the rest go back.
                    culprit = worker.inflight.popleft()
                    if not done[culprit]:
                        done[culprit] = True
                        remaining -= 1
                        log.warning("verifier item %d hit the %.0fs deadline", culprit, deadline)
                pending.extendleft(reversed([i for i in worker.inflight if not done[i]]))
                self._pool[position] = self._spawn()
        return results

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for worker in self._pool:
                with contextlib.suppress(OSError):
                    worker.outbox.send(None)
            for worker in self._pool:
                try:
                    worker.process.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    worker.process.kill()
                    worker.process.wait(timeout=2)
                worker.conn.close()
                worker.outbox.close()
            self._pool.clear()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
