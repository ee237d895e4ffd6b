"""Real services for tests: a private redis-server per test session (or per test, for fault
injection), and the shared RabbitMQ. Missing services skip locally and fail under CI=true."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

IN_CI = bool(os.environ.get("CI"))


def missing_service(reason: str) -> None:
    """Skip locally; fail in CI, where a skipped integration test would hide a broken setup."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: required services must be available)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private ``redis-server`` on a free 127.0.0.1 port that a test may kill and restart."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="idem-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db))

    def start(self, *, keep_data: bool = False) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            missing_service("redis-server is not on PATH")
        assert binary is not None
        # With keep_data, save an RDB on shutdown and load it on start: "restarted with data".
        persistence = ["--save", "", "--appendonly", "no"]
        if not keep_data:
            (self.dir / "dump.rdb").unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             *persistence, "--dbfilename", "dump.rdb", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.01)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self, *, save: bool = False) -> None:
        """Stop the server; with ``save`` it writes its data first (for a restart with data)."""
        if self.process is None:
            return
        if save:
            with contextlib.suppress(redis.ConnectionError):
                self.client().shutdown(save=True)
        else:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def restart(self, *, keep_data: bool) -> None:
        self.stop(save=keep_data)
        self.start(keep_data=keep_data)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def rabbitmq_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False
