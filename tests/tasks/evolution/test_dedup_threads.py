"""The dedup connection runs on the CPUs the process may use (here, not in tests/tasks/, to keep
the threads change apart from the move of tasks/ into sub-packages)."""

from __future__ import annotations

import os

from storage.catalog import connect
from tasks.evolution.dedup import DedupParams, configure


def _threads(con) -> int:
    return con.execute("SELECT current_setting('threads')").fetchone()[0]


def test_dedup_connection_threads_follow_the_affinity_mask(monkeypatch):
    con = connect()
    try:
        con.execute("SET threads = 1")  # as seen on an earlier machine
        configure(con, DedupParams())
        assert _threads(con) == len(os.sched_getaffinity(0))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
        configure(con, DedupParams())
        assert _threads(con) == 3
        configure(con, DedupParams(threads=1))  # an explicit setting wins
        assert _threads(con) == 1
    finally:
        con.close()
