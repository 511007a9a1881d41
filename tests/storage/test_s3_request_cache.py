"""The request cache of a home on S3: segments on the object store shared by many nodes."""

from __future__ import annotations

import threading

from infra.engines.base import ChatRequest
from infra.engines.cached import CachedEngine
from storage.request_cache import REMOTE_PREFIX, RequestCache, open_request_cache
from storage.settings import home, remote_of
from tests.fakes import ScriptedEngine
from tests.storage.test_request_cache import _key, _ok, _text


def _node(tmp_path, name: str) -> RequestCache:
    """The request cache of one node: its own local folder, the shared object store."""
    remote = remote_of(home())
    assert remote is not None
    return RequestCache(tmp_path / name / "requests", remote)


def test_default_cache_of_a_home_on_s3_is_shared(s3_home):
    cache = open_request_cache()
    assert cache.remote is not None and cache.root == (home() / "cache" / "requests").resolve()
    cache.put_many([(_key(1), _ok("one"))], stage="s", engine="m")
    names = cache.remote.listdir(REMOTE_PREFIX)
    assert len(names) == 1 and names[0].startswith("seg-") and names[0].endswith(".jsonl")


def test_two_writers_answering_the_same_requests_never_corrupt(s3_home, tmp_path):
    """Two nodes answer overlapping requests at once, in many small batches: every record on
    the store is whole, each key is a hit with one of the answers, and a third node sees all."""
    a, b = _node(tmp_path, "a"), _node(tmp_path, "b")
    start = threading.Barrier(2, timeout=30)

    def answer(cache: RequestCache, keys: range, tag: str) -> None:
        start.wait()
        for i in keys:
            cache.put_many([(_key(i), _ok(f"{tag}{i}"))], stage="s", engine="m")

    threads = [
        threading.Thread(target=answer, args=(a, range(0, 30), "a")),
        threading.Thread(target=answer, args=(b, range(15, 45), "b")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    third = _node(tmp_path, "c")
    got = third.get_many([_key(i) for i in range(45)])
    assert len(got) == 45 and third.torn_records == 0
    for i in range(45):
        text = _text(got[_key(i)])
        assert text in ({f"a{i}"} if i < 15 else {f"b{i}"} if i >= 30 else {f"a{i}", f"b{i}"})
    # one immutable segment object per batch written
    assert a.remote is not None and len(a.remote.listdir(REMOTE_PREFIX)) == 60
    # each writer sees the other's answers on its next lookup
    assert _text(a.get(_key(40))) == "b40" and _text(b.get(_key(0))) == "a0"


def test_a_rerun_on_another_node_sends_nothing_already_answered(s3_home, tmp_path):
    requests = [ChatRequest(messages=({"role": "user", "content": f"q{i}"},)) for i in range(12)]
    first = ScriptedEngine(lambda r, i: "answer", identity="scripted-v1")
    second = ScriptedEngine(lambda r, i: "answer", identity="scripted-v1")
    rerun = ScriptedEngine(lambda r, i: "answer", identity="scripted-v1")
    CachedEngine(first, _node(tmp_path, "a"), "evolve").generate(requests[:8])
    CachedEngine(second, _node(tmp_path, "b"), "evolve").generate(requests[4:])
    engine = CachedEngine(rerun, _node(tmp_path, "c"), "evolve")
    out = engine.generate(requests)
    assert len(first.calls) == 8 and len(second.calls) == 4  # b found a's answers to 4..7
    assert rerun.calls == [] and engine.stats["hits"] == 12
    assert all(r.completions[0].text == "answer" for r in out)
