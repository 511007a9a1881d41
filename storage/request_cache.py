"""A crash-safe, append-only cache of LLM responses, keyed by `ChatRequest.key(identity)`.

Layout: `<root>/seg-<pid>-<random>.jsonl`, one segment file per open cache per process, one JSON
record per line:

    {"key":"<sha256>","ok":true,"stage":"evolve","engine":"<identity>","t":..., "response":{...}}

Why this shape:

- **Crash safety.** Records are only ever appended; each `put_many` writes its lines, flushes and
  fsyncs before returning, so a killed run loses at most the chunk in flight. A torn last line
  (no trailing newline, or not valid JSON) is ignored on read; since a new process always writes
  a new segment, nothing is ever appended after a torn tail.
- **Several writers.** Each process writes only its own segment, so two processes never
  interleave bytes in one file; threads in one process share the instance (see
  `open_request_cache`) and a lock. Segments written by others are picked up incrementally
  (by byte offset) on each lookup, so two processes working on overlapping batches see each
  other's finished responses.
- **Failures are kept, not trusted.** A response with `error` set is written (with `ok` false)
  so the reason is on disk, but it is not a hit: the next run sends the request again. A later
  success for the same key wins.
- **Small index.** The in-memory index maps a key to (segment, offset, length); the text is read
  back from disk on a hit, so a cache of millions of responses costs tens of bytes per key.
- **A home on S3** (many nodes). Objects cannot be appended to, so each `put_many` is one
  immutable segment object `cache/requests/seg-<sha256 of its bytes>.jsonl`, written with a
  conditional put (the same bytes twice are one object) and kept in the local folder too. Every
  lookup first lists the segments on the store and copies the ones this node has not seen into
  its local folder, then reads as above. Two nodes answering one request write two segments;
  both records are valid and either is the hit, so nothing is overwritten or interleaved, and a
  rerun on any node sends only the requests no node has answered.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.fs import ObjectStore
from storage.settings import home, remote_of

# A response as the engines serialise it (`ChatResponse.to_dict()`): completions, token counts,
# latency, and `error` (None for a success). The cache stores and returns these dicts; the engine
# layer turns them back into objects, so storage depends on nothing above it.
Response = dict[str, Any]

_KEY_LEN = 64
REMOTE_PREFIX = "cache/requests"


@dataclass(frozen=True)
class _Location:
    segment: Path
    offset: int
    length: int


class RequestCache:
    """Append-only response cache in `root`. Safe for threads; reasonably safe for processes."""

    def __init__(self, root: Path, remote: ObjectStore | None = None):
        """`root` is the cache's folder; with `remote` (a home on S3) it is this node's copy of
        the segments on the object store, and new records go to the store."""
        self.root = Path(root)
        self.remote = remote
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._hits: dict[str, _Location] = {}
        self._failures: dict[str, str] = {}
        self._offsets: dict[Path, int] = {}
        self._segment = self.root / f"seg-{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
        self._fh = None
        self.torn_records = 0
        self.refresh()

    # -- reading ----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Index records appended (by anyone) since the last look."""
        with self._lock:
            if self.remote is not None:
                self._fetch_remote()
            for segment in sorted(self.root.glob("seg-*.jsonl")):
                self._scan(segment)

    def _fetch_remote(self) -> None:
        """Copy the segments other nodes wrote (immutable objects) into the local folder."""
        assert self.remote is not None
        for name in self.remote.listdir(REMOTE_PREFIX):
            if not (name.startswith("seg-") and name.endswith(".jsonl")):
                continue
            target = self.root / name
            if target.exists():
                continue
            tmp = self.root / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            try:
                self.remote.download(f"{REMOTE_PREFIX}/{name}", tmp)
                os.replace(tmp, target)
            except FileNotFoundError:
                tmp.unlink(missing_ok=True)

    def _scan(self, segment: Path) -> None:
        start = self._offsets.get(segment, 0)
        try:
            size = segment.stat().st_size
        except FileNotFoundError:
            return
        if size <= start:
            return
        with segment.open("rb") as fh:
            fh.seek(start)
            data = fh.read(size - start)
        # Only complete lines count; an unterminated tail is either still being written by
        # another process (read it next time) or torn by a crash (never completed).
        end = data.rfind(b"\n") + 1
        offset = start
        for line in data[:end].splitlines(keepends=True):
            self._index_line(segment, offset, line)
            offset += len(line)
        self._offsets[segment] = start + end

    def _index_line(self, segment: Path, offset: int, line: bytes) -> None:
        try:
            record = json.loads(line)
            key = record["key"]
            ok = bool(record["ok"])
        except (ValueError, KeyError, TypeError):
            self.torn_records += 1
            return
        if ok:
            self._hits[key] = _Location(segment, offset, len(line))
            self._failures.pop(key, None)
        elif key not in self._hits:
            self._failures[key] = record.get("response", {}).get("error") or "unknown error"

    def get_many(self, keys: list[str]) -> dict[str, Response]:
        """The cached successful responses among `keys`."""
        with self._lock:
            self.refresh()
            found = {key: self._hits[key] for key in set(keys) if key in self._hits}
        out: dict[str, Response] = {}
        handles: dict[Path, object] = {}
        try:
            for key, loc in found.items():
                fh = handles.get(loc.segment)
                if fh is None:
                    fh = handles[loc.segment] = loc.segment.open("rb")
                fh.seek(loc.offset)
                try:
                    record = json.loads(fh.read(loc.length))
                    response = record["response"]
                    if not isinstance(response, dict) or "completions" not in response:
                        raise ValueError("not a response")
                    out[key] = response
                except (ValueError, KeyError, TypeError):
                    continue  # unreadable record: treat as a miss, the request is sent again
        finally:
            for fh in handles.values():
                fh.close()
        return out

    def get(self, key: str) -> Response | None:
        return self.get_many([key]).get(key)

    def failures(self) -> dict[str, str]:
        """Keys whose latest record is a failure, with its error (they are retried, not hits)."""
        with self._lock:
            self.refresh()
            return dict(self._failures)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._hits

    def __len__(self) -> int:
        with self._lock:
            return len(self._hits)

    # -- writing ----------------------------------------------------------------------------

    def put_many(
        self, items: list[tuple[str, Response]], *, stage: str = "", engine: str = ""
    ) -> None:
        """Append responses durably (flush + fsync) before returning."""
        if not items:
            return
        lines = []
        now = time.time()
        for key, response in items:
            if len(key) != _KEY_LEN:
                raise ValueError(f"request cache key must be a sha256 hex digest, got {key!r}")
            record = {
                "key": key,
                "ok": response.get("error") is None,
                "stage": stage,
                "engine": engine,
                "t": now,
                "response": response,
            }
            lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        payload = "".join(lines).encode()
        if self.remote is not None:
            self._put_remote(lines, payload)
            return
        with self._lock:
            if self._fh is None:
                self._fh = self._segment.open("ab")
            offset = self._fh.tell()
            self._fh.write(payload)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            for line in lines:
                self._index_line(self._segment, offset, line.encode())
                offset += len(line.encode())
            self._offsets[self._segment] = offset

    def _put_remote(self, lines: list[str], payload: bytes) -> None:
        """One immutable segment per call, named by its content, on the store and here."""
        assert self.remote is not None
        name = f"seg-{hashlib.sha256(payload).hexdigest()[:32]}.jsonl"
        self.remote.put_new(f"{REMOTE_PREFIX}/{name}", payload)
        segment = self.root / name
        with self._lock:
            if not segment.exists():
                tmp = self.root / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
                tmp.write_bytes(payload)
                os.replace(tmp, segment)
            if segment in self._offsets:
                return
            offset = 0
            for line in lines:
                self._index_line(segment, offset, line.encode())
                offset += len(line.encode())
            self._offsets[segment] = offset

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


_caches: dict[Path, RequestCache] = {}
_caches_lock = threading.Lock()


def default_cache_dir() -> Path:
    return home() / "cache" / "requests"


def open_request_cache(root: Path | None = None) -> RequestCache:
    """The process-wide cache for `root` (default `EVOLFORGE_HOME/cache/requests`; on a home on
    S3 the shared one on the object store, with this node's copy in the local folder)."""
    remote = None
    if root is None:
        local = home()
        root = local / "cache" / "requests"
        remote = remote_of(local)
    path = Path(root).resolve()
    with _caches_lock:
        cache = _caches.get(path)
        if cache is None:
            cache = _caches[path] = RequestCache(path, remote)
        return cache
