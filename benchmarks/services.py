"""Private services for a benchmark run: ``redis-server`` processes on free ports, real
``celery worker`` processes (each in its own process group), and a queue of our own on the
shared RabbitMQ. Everything started here is stopped by the run that started it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from tests.support.services import RedisServer as PrivateRedisServer

ROOT = Path(__file__).resolve().parents[1]
RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


class RedisServer(PrivateRedisServer):
    """The test suite's private, non-persistent ``redis-server`` on a free 127.0.0.1 port,
    named for the report."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def start(self, *, keep_data: bool = False) -> RedisServer:
        if shutil.which("redis-server") is None:  # say so plainly, not as a pytest skip
            raise SystemExit("redis-server is not on PATH (apt-get install redis-server)")
        super().start(keep_data=keep_data)
        return self

    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def version(self) -> str:
        return str(self.client().info("server")["redis_version"])


class Worker:
    """``celery -A benchmarks.app worker`` in its own process group."""

    def __init__(self, env: dict[str, str], *, pool: str, concurrency: int, queue: str,
                 name: str, log_dir: Path) -> None:
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self.pool = pool
        self.concurrency = concurrency
        self.queue = queue
        self.name = name
        self.log = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_handle = None

    def start(self, wait_ready: float = 60.0) -> Worker:
        command = [sys.executable, "-m", "celery", "-A", "benchmarks.app", "worker",
                   "-P", self.pool, "-c", str(self.concurrency), "-n", f"{self.name}@%h",
                   "-Q", self.queue, "--loglevel", "WARNING",
                   "--without-gossip", "--without-mingle", "--without-heartbeat"]
        self._log_handle = self.log.open("ab")
        self.process = subprocess.Popen(command, env=self.env, cwd=ROOT,
                                        stdout=self._log_handle, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        ready = self.env.get("BENCH_READY_FILE")
        deadline = time.monotonic() + wait_ready
        while time.monotonic() < deadline:
            if ready and Path(ready).exists():
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"worker not ready after {wait_ready} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def pids(self) -> list[int]:
        """The worker's main process and its pool children."""
        if self.process is None:
            return []
        try:
            out = subprocess.run(["pgrep", "-g", str(self.process.pid)], capture_output=True,
                                 text=True, check=False).stdout
        except FileNotFoundError:
            return [self.process.pid]
        return [int(pid) for pid in out.split()] or [self.process.pid]

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        if self._log_handle:
            self._log_handle.close()
        self.process = None


def rabbitmq_available(url: str = RABBITMQ_URL) -> bool:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
            return True
    except Exception:
        return False


def rabbitmq_version(url: str = RABBITMQ_URL) -> str:
    from kombu import Connection

    with Connection(url, connect_timeout=3) as conn:
        conn.ensure_connection(max_retries=1)
        props = conn.connection.server_properties or {}
        version = props.get("version", "?")
        return version.decode() if isinstance(version, bytes) else str(version)


def delete_amqp_queue(url: str, queue: str) -> None:
    """Remove our queue and the direct exchange Celery declared with the queue's name."""
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        channel = conn.default_channel
        with contextlib.suppress(Exception):
            channel.queue_delete(queue)
        with contextlib.suppress(Exception):
            channel.exchange_delete(queue)


def delete_redis_queue(client: redis.Redis, queue: str) -> None:
    """Remove a kombu Redis-transport queue (all its priority lists) and its binding entry."""
    names = list(client.scan_iter(match=f"{queue}*"))
    if names:
        client.delete(*names)
    client.delete(f"_kombu.binding.{queue}")
