"""The host's side of one sandbox: start the fork server (`worker.py`, inside bubblewrap or, in
unsafe mode, as a plain subprocess) and exchange length-prefixed JSON messages with it."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from infra.sandbox.cgroups import ProgramCgroup
from infra.sandbox.layout import SITE_DIR, Isolation, bwrap_command, host_env
from infra.sandbox.limits import SandboxLimits

# The fork server's source: started with `python -I -B -c`, so the project need not be visible.
WORKER_SOURCE = Path(__file__).with_name("worker.py").read_text(encoding="utf-8")
# Startup imports sympy and numpy; the grace covers the fork server's own cleanup after a kill.
STARTUP_TIMEOUT_S = 60.0
RESPONSE_GRACE_S = 5.0


class WorkerLost(Exception):
    """The fork server died or stopped answering; the sandbox must be replaced."""


def _read_exact(fd: int, size: int, deadline: float) -> bytes:
    chunks, got = [], 0
    while got < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WorkerLost("sandbox worker stopped answering")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, size - got)
        if not chunk:
            raise WorkerLost("sandbox worker died (the program killed it or escaped a limit)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class Worker:
    """One long-lived sandbox running the fork server, driven over a pair of pipes."""

    def __init__(
        self,
        limits: SandboxLimits,
        isolation: Isolation | None,
        cgroup: ProgramCgroup | None = None,
        preload: list[str] | None = None,
        capture_stderr: bool = False,
    ) -> None:
        self.sandboxed = isolation is not None
        self.cgroup = cgroup
        self.host_tmp: str | None = None
        config: dict = {"sandboxed": self.sandboxed, "seccomp": True}
        if preload is not None:
            config["preload"] = preload
        popen_args: dict = {}
        if isolation is not None:
            config.update(tmp_root="/tmp", site_dir=SITE_DIR)
            if cgroup is not None:
                config["cgroup_fds"] = cgroup.join_fds
                popen_args["pass_fds"] = cgroup.join_fds
            argv = [isolation.layout.python, "-I", "-B", "-c", WORKER_SOURCE, json.dumps(config)]
            tmp_mb = max(64, 4 * limits.file_size_mb)
            cmd, cwd = bwrap_command(isolation.bwrap, isolation.layout, argv, tmp_mb), "/"
            if os.geteuid() == 0:
                # bwrap itself runs as the unprivileged user, so its user namespace maps the
                # program's uid to that user and never to root.
                popen_args.update(user=isolation.uid, group=isolation.gid, extra_groups=[])
        else:
            self.host_tmp = tempfile.mkdtemp(prefix="evolforge-sandbox-")
            config["tmp_root"] = self.host_tmp
            cmd = [sys.executable, "-I", "-B", "-c", WORKER_SOURCE, json.dumps(config)]
            cwd = self.host_tmp
        # Only the start-up probe keeps bwrap's messages (and closes the file).
        self.stderr_file = tempfile.TemporaryFile() if capture_stderr else None  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.stderr_file or subprocess.DEVNULL,
                env=host_env(),
                cwd=cwd,
                start_new_session=True,
                **popen_args,
            )
        except BaseException:
            if self.host_tmp:
                shutil.rmtree(self.host_tmp, ignore_errors=True)
            if self.stderr_file is not None:
                self.stderr_file.close()
            raise
        finally:
            if cgroup is not None:
                cgroup.close_fds()  # the worker holds them now
        self.ready = False
        self.preloaded: list[str] = []
        self.seccomp = False

    def stderr_text(self) -> str:
        if self.stderr_file is None:
            return ""
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode("utf-8", errors="replace")

    def _send(self, message: dict) -> None:
        body = json.dumps(message).encode()
        try:
            self.proc.stdin.write(struct.pack(">I", len(body)) + body)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerLost(f"sandbox worker died: {exc}") from exc

    def _receive(self, deadline: float) -> dict:
        fd = self.proc.stdout.fileno()
        (size,) = struct.unpack(">I", _read_exact(fd, 4, deadline))
        return json.loads(_read_exact(fd, size, deadline))

    def wait_ready(self) -> None:
        if not self.ready:
            hello = self._receive(time.monotonic() + STARTUP_TIMEOUT_S)
            if not hello.get("ready"):
                raise WorkerLost(f"sandbox worker refused to start: {hello.get('error')}")
            if self.sandboxed and not hello.get("seccomp"):
                raise WorkerLost("sandbox worker started without its seccomp filter")
            self.preloaded = hello.get("preloaded", [])
            self.seccomp = bool(hello.get("seccomp"))
            self.seccomp_error = hello.get("seccomp_error")
            self.ready = True

    def execute(self, code: str, stdin: str, limits: SandboxLimits) -> dict:
        self.wait_ready()
        self._send({"code": code, "stdin": stdin, "limits": limits.model_dump()})
        return self._receive(time.monotonic() + limits.wall_s + RESPONSE_GRACE_S)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                # bwrap's PID namespace ends with it: every process inside dies too.
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        if self.host_tmp:
            shutil.rmtree(self.host_tmp, ignore_errors=True)
        if self.cgroup is not None:
            self.cgroup.remove()
