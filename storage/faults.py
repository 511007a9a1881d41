"""Named crash points, for the tests that kill a run at a chosen moment.

`crash_point("dataset_write", name)` does nothing unless the environment variable
`EVOLFORGE_CRASH_AT` names that point, as `POINT:NAME` or `POINT:NAME:N` (the N-th time this
process reaches it, default the first): then the process sends itself SIGKILL there, exactly as
`kill -9` would, with no cleanup. The points sit where a crash is most harmful: after a
dataset's shards are written and before its manifest makes it visible (`dataset_write`; on a
home on S3 also `dataset_upload`, after the parts are uploaded and before the manifest), and
between recording a version in the catalog and pointing its view at it (`catalog_update`).
Production runs never set the variable.
"""

from __future__ import annotations

import os
import signal
import threading

_counts: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(point: str, name: str) -> None:
    spec = os.environ.get("EVOLFORGE_CRASH_AT")
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] != point or parts[1] != name:
        return
    nth = int(parts[2]) if len(parts) > 2 else 1
    key = f"{point}:{name}"
    with _lock:
        _counts[key] = _counts.get(key, 0) + 1
        hit = _counts[key] == nth
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
