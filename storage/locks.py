"""One run at a time per data home.

Two `evolforge run` processes (or a nightly deployment run and an ad hoc one) on one data home
would compute the same versions twice and interleave their catalog updates. `run_lock` makes
the second wait, saying for what: the holder's pid, flow and start time are kept beside the
lock file. The lock is re-entrant within a process (a flow and its subflows), and the operating
system releases it when its holder dies, so a killed run never blocks the next one.

On a home on S3 the lock is a file in the machine's local folder (`storage.settings.home()`):
one run per home per machine. Two drivers on two machines are not excluded from each other;
their writes stay correct (every object is written with a conditional put), only work may be
done twice.

Readers (`evolforge sql`, DuckDB sessions) take no run lock; the catalog has its own short
write lock (`storage/catalog.py`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger("evolforge")

LOCK_FILE = "run.lock"
HOLDER_FILE = "run.lock.json"
_held: dict[Path, int] = {}
_held_lock = threading.Lock()


def _say(message: str) -> None:
    """To the terminal, and to the flow run's log when inside one (the Prefect UI shows it)."""
    print(f"evolforge: {message}", file=sys.stderr, flush=True)
    try:
        from prefect.context import FlowRunContext
        from prefect.logging import get_run_logger

        if FlowRunContext.get() is not None:
            get_run_logger().warning(message)
    except ImportError:
        log.warning(message)


def _holder(home: Path) -> str:
    try:
        info = json.loads((home / HOLDER_FILE).read_text(encoding="utf-8"))
        return f"flow {info.get('flow')!r}, pid {info.get('pid')}, started {info.get('started')}"
    except (OSError, ValueError):
        return "another process"


@contextmanager
def run_lock(home: Path, flow: str, report_every_s: float = 60.0) -> Iterator[None]:
    """Hold the data home's run lock for the duration of the block (waiting for it if needed)."""
    home = Path(home).resolve()
    with _held_lock:
        depth = _held.get(home, 0)
        _held[home] = depth + 1
    if depth:  # a subflow of the run that holds it
        try:
            yield
        finally:
            with _held_lock:
                _held[home] -= 1
        return
    lock = FileLock(str(home / LOCK_FILE), thread_local=False)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            waited = time.monotonic()
            while True:
                message = (
                    f"waiting for the run in progress on {home} to finish ({_holder(home)}); "
                    "a data home takes one run at a time"
                )
                _say(message)
                try:
                    lock.acquire(timeout=report_every_s)
                    break
                except Timeout:
                    continue
            log.info("run lock acquired after %.0f s", time.monotonic() - waited)
        info = {"pid": os.getpid(), "flow": flow, "started": datetime.now(UTC).isoformat()}
        (home / HOLDER_FILE).write_text(json.dumps(info), encoding="utf-8")
        try:
            yield
        finally:
            lock.release()
    finally:
        with _held_lock:
            _held[home] -= 1
