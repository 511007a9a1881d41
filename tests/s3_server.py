"""A real S3-compatible HTTP server (moto) on 127.0.0.1 for the tests of a home on S3.

`MotoServer` starts `python -m moto.server` on a free port and stops it by its pid; the
`s3_server` fixture (module scope) and `s3_home` (a fresh bucket per test, the environment of a
home on it) are imported by the conftest of each test folder that needs them, e.g.
`from tests.s3_server import s3_home, s3_server  # noqa: F401`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ACCESS_KEY = "evolforge-test"
SECRET_KEY = "evolforge-test-secret"
REGION = "us-east-1"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class MotoServer:
    """`python -m moto.server` on 127.0.0.1; `stop()` ends it by its pid."""

    host: str = "127.0.0.1"
    port: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, timeout_s: float = 30.0) -> MotoServer:
        self.port = self.port or free_port(self.host)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.url} in {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def env(self) -> dict[str, str]:
        """The environment of a client of this server (credentials moto accepts)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.url,
        }

    def create_bucket(self, name: str | None = None) -> str:
        import boto3

        name = name or f"evolforge-{uuid.uuid4().hex[:12]}"
        client = boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        client.create_bucket(Bucket=name)
        return name


def use_server(monkeypatch: pytest.MonkeyPatch, server: MotoServer) -> None:
    """Point this test's S3 clients at `server` and nowhere else."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[MotoServer]:
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_home(s3_server, evolforge_home, tmp_path, monkeypatch) -> str:
    """A data home on a fresh bucket of the test S3 server (`EVOLFORGE_HOME=s3://…/home`), its
    local folder in this test's temporary folder. Returns the URL."""
    use_server(monkeypatch, s3_server)
    url = f"s3://{s3_server.create_bucket()}/home"
    monkeypatch.setenv("EVOLFORGE_HOME", url)
    monkeypatch.setenv("EVOLFORGE_CACHE", str(Path(tmp_path) / "s3-home-local"))
    return url
