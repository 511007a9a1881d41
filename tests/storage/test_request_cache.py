"""The request cache: append-only segments, torn records, failures retried, several writers."""

from __future__ import annotations

import hashlib
import threading

from storage.request_cache import RequestCache, open_request_cache


def _key(i: int) -> str:
    return hashlib.sha256(f"request {i}".encode()).hexdigest()


def _ok(text: str) -> dict:
    completion = {"text": text, "finish_reason": "stop", "completion_tokens": 3}
    return {"completions": [completion], "prompt_tokens": 5, "latency_s": 0.1, "error": None}


def _failed(error: str) -> dict:
    return {"completions": [], "prompt_tokens": 0, "latency_s": 0.0, "error": error}


def _text(response: dict) -> str:
    return response["completions"][0]["text"]


def test_roundtrip_and_reopen(tmp_path):
    cache = RequestCache(tmp_path)
    cache.put_many([(_key(i), _ok(f"a{i}")) for i in range(3)], stage="s", engine="m")
    got = cache.get_many([_key(0), _key(2), _key(9)])
    assert set(got) == {_key(0), _key(2)}
    assert _text(got[_key(2)]) == "a2"
    assert got[_key(2)]["completions"][0]["completion_tokens"] == 3
    cache.close()
    reopened = RequestCache(tmp_path)
    assert len(reopened) == 3 and _text(reopened.get(_key(1))) == "a1"


def test_failures_are_recorded_but_not_hits_and_success_wins(tmp_path):
    cache = RequestCache(tmp_path)
    cache.put_many([(_key(0), _failed("HTTP 500: boom"))])
    assert cache.get(_key(0)) is None
    assert cache.failures() == {_key(0): "HTTP 500: boom"}
    cache.put_many([(_key(0), _ok("fine"))])
    assert _text(cache.get(_key(0))) == "fine"
    assert cache.failures() == {}
    # A later failure does not hide an earlier success.
    cache.put_many([(_key(0), _failed("late"))])
    assert _text(RequestCache(tmp_path).get(_key(0))) == "fine"


def test_torn_last_record_is_ignored(tmp_path):
    cache = RequestCache(tmp_path)
    cache.put_many([(_key(i), _ok(f"a{i}")) for i in range(2)])
    cache.close()
    segment = next(tmp_path.glob("seg-*.jsonl"))
    with segment.open("ab") as fh:
        fh.write(b'{"key":"' + _key(5).encode() + b'","ok":true,"response":{"compl')
    reopened = RequestCache(tmp_path)
    assert len(reopened) == 2 and _key(5) not in reopened
    # New writes go to a new segment, never after the torn tail.
    reopened.put_many([(_key(5), _ok("again"))])
    assert _text(RequestCache(tmp_path).get(_key(5))) == "again"
    assert segment.read_bytes().endswith(b'"compl')


def test_garbage_line_is_skipped(tmp_path):
    (tmp_path / "seg-1-x.jsonl").write_text("not json\n")
    cache = RequestCache(tmp_path)
    assert len(cache) == 0 and cache.torn_records == 1


def test_two_instances_see_each_others_appends(tmp_path):
    a, b = RequestCache(tmp_path), RequestCache(tmp_path)
    a.put_many([(_key(1), _ok("from a"))])
    assert _text(b.get(_key(1))) == "from a"
    assert len(list(tmp_path.glob("seg-*.jsonl"))) == 1


def test_threads_share_one_cache(tmp_path):
    cache = open_request_cache(tmp_path)
    assert open_request_cache(tmp_path) is cache

    def write(start: int) -> None:
        for i in range(start, start + 50):
            cache.put_many([(_key(i), _ok(f"a{i}"))])

    threads = [threading.Thread(target=write, args=(t * 50,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = RequestCache(tmp_path)
    assert len(fresh) == 200
    got = fresh.get_many([_key(i) for i in range(200)])
    assert all(_text(got[_key(i)]) == f"a{i}" for i in range(200))


def test_default_location_is_under_home(evolforge_home):
    cache = open_request_cache()
    assert cache.root == (evolforge_home / "cache" / "requests").resolve()
