"""The killable verifier pool: a hung judge is killed at the deadline, threads are safe."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from tasks.solutions.answers import check_equivalence, equivalence_pool


def test_hung_worker_is_killed_and_replaced():
    # The inner (SIGALRM) timeout is longer than the outer deadline, so only the parent's
    # watchdog can stop the bomb: the worker is killed, the bomb is None, the next item is fine.
    with equivalence_pool(
        workers=1, parse_timeout_s=20, verify_timeout_s=20, item_deadline_s=3.0
    ) as p:
        start = time.monotonic()
        verdicts = check_equivalence(
            ["10^{10^{10^{10}}}", "\\frac{\\sqrt2}{2}"], ["5", "\\sqrt{2}/2"], p
        )
        assert verdicts == [None, True]
        assert p.killed >= 1
        assert time.monotonic() - start < 60


def test_works_from_worker_threads(pool):
    # Prefect runs tasks in threads, where math-verify's own SIGALRM timeouts would raise.
    pairs = [("\\sqrt{8}", "2\\sqrt{2}"), ("x^2-1", "(x-1)(x+1)"), ("\\pi", "3")]
    with ThreadPoolExecutor(max_workers=3) as ex:
        results = list(ex.map(lambda p: check_equivalence([p[0]], [p[1]], pool)[0], pairs))
    assert results == [True, True, False]


def test_target_must_name_a_function():
    import pytest

    from infra.verifier import VerifierPool

    with pytest.raises(ValueError, match="module:function"):
        VerifierPool("tasks.solutions.answers")
