"""Child processes the factory starts and stops: a free loopback port, and a process group ended
by its leader's pid. Shared by the vLLM worker and server (`infra/engines/vllm_process.py`),
the training launcher (`tasks/training/launch.py`) and the local cluster (`flows/cluster.py`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, on `host`."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """End `proc`'s process group (it leads one: `start_new_session=True`) by its pid: SIGTERM,
    then SIGKILL after `grace_s`; once the leader is gone, a straggler of its group goes too."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        break
    if proc.poll() is None:
        proc.wait(5)
