"""The sandbox's logger (one name for the whole package: `infra.sandbox`) and log-once."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("infra.sandbox")

_logged: set[str] = set()
_log_lock = threading.Lock()


def log_once(level: int, message: str) -> None:
    with _log_lock:
        if message in _logged:
            return
        _logged.add(message)
    log.log(level, message)
