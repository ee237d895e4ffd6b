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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisServer:
    """A private ``redis-server`` on a free 127.0.0.1 port that a test may kill and restart."""

    def __init__(self, port: int | None = None, *, extra_args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="idem-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.extra_args = extra_args

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
             *persistence, "--dbfilename", "dump.rdb", "--protected-mode", "yes",
             *self.extra_args],
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


def form_cluster(nodes: Sequence[Any], cli_options: Sequence[str] = ()) -> None:
    """Make started nodes (each with ``port`` and ``client()``) one Cluster, slots spread evenly,
    and wait until every node says the cluster is ok."""
    cli = shutil.which("redis-cli")
    if cli is None:
        missing_service("redis-cli is not on PATH (needed to create a Redis Cluster)")
    assert cli is not None
    subprocess.run([cli, *cli_options, "--cluster", "create",
                    *(f"127.0.0.1:{n.port}" for n in nodes),
                    "--cluster-replicas", "0", "--cluster-yes"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(n.client().cluster("info")["cluster_state"] == "ok" for n in nodes):
            return
        time.sleep(0.1)
    raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")


class RedisCluster:
    """A three-primary Redis Cluster of private redis-servers (no replicas)."""

    def __init__(self, size: int = 3) -> None:
        self.nodes = [RedisServer(free_cluster_port(), extra_args=("--cluster-enabled", "yes",
                                              "--cluster-node-timeout", "5000"))
                      for _ in range(size)]

    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        form_cluster(self.nodes)
        return self

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class RedisSentinel:
    """A private master and one sentinel monitoring it as ``service`` (quorum 1)."""

    def __init__(self, service: str = "idem-master") -> None:
        self.service = service
        self.master = RedisServer()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="idem-sentinel-"))
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/{db}"

    def start(self) -> RedisSentinel:
        binary = shutil.which("redis-server")
        if binary is None:
            missing_service("redis-server is not on PATH")
        assert binary is not None
        self.master.start()
        config = self.dir / "sentinel.conf"  # a sentinel rewrites its config: a file of its own
        config.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                          f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1\n")
        self.process = subprocess.Popen([binary, str(config), "--sentinel"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.sentinel_get_master_addr_by_name(self.service):
                    return self
            except redis.ConnectionError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"sentinel on port {self.port} did not start")

    def close(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.master.close()
        shutil.rmtree(self.dir, ignore_errors=True)
