"""Real services for tests, the chaos suite and the benchmarks: private redis-servers (single,
Sentinel, Cluster) on free 127.0.0.1 ports, and probes of the shared RabbitMQ.

Plain Python, no pytest: a missing binary or service raises `ServiceMissing`; the test suite's
conftest turns that into a skip (locally) or a failure (under CI=true), see
tests/support/skipping.py, and ``python -m benchmarks`` into an exit with the message."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


class ServiceMissing(RuntimeError):
    """A binary or service a test (or benchmark) needs is not available here."""


def require_binary(name: str, why: str = "") -> str:
    """The path of ``name`` on PATH, or `ServiceMissing`."""
    found = shutil.which(name)
    if found is None:
        raise ServiceMissing(f"{name} is not on PATH{f' ({why})' if why else ''}")
    return found


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 30.0,
               interval: float = 0.05) -> None:
    """Poll ``condition()`` (a Redis connection error counts as "not yet") until it is truthy;
    RuntimeError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.ConnectionError):
            if condition():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


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


def kill_process(process: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL a service process and reap it."""
    if process is not None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)


class RedisServer:
    """A private ``redis-server`` on a free 127.0.0.1 port that a test may kill and restart
    (``name`` labels it in a benchmark report)."""

    def __init__(self, port: int | None = None, *, extra_args: tuple[str, ...] = (),
                 name: str = "redis") -> None:
        self.port = port or free_port()
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix="idem-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.extra_args = extra_args

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db))

    def start(self, *, keep_data: bool = False) -> RedisServer:
        binary = require_binary("redis-server")
        # With keep_data, save an RDB on shutdown and load it on start: "restarted with data".
        persistence = ["--save", "", "--appendonly", "no"]
        if not keep_data:
            (self.dir / "dump.rdb").unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             *persistence, "--dbfilename", "dump.rdb", "--protected-mode", "yes",
             *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: self.client().ping(), f"redis-server on port {self.port} to start",
                   timeout=10, interval=0.01)
        return self

    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def version(self) -> str:
        return str(self.client().info("server")["redis_version"])

    def stop(self, *, save: bool = False) -> None:
        """Stop the server; with ``save`` it writes its data first (for a restart with data)."""
        if self.process is None:
            return
        if save:
            with contextlib.suppress(redis.ConnectionError):
                self.client().shutdown(save=True)
            self.process.wait(timeout=10)
        else:
            kill_process(self.process)
        self.process = None

    def restart(self, *, keep_data: bool) -> None:
        self.stop(save=keep_data)
        self.start(keep_data=keep_data)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def form_cluster(nodes: Sequence[Any], cli_options: Sequence[str] = ()) -> None:
    """Make started nodes (each with ``port`` and ``client()``) one Cluster, slots spread evenly,
    and wait until every node says the cluster is ok."""
    cli = require_binary("redis-cli", "needed to create a Redis Cluster")
    subprocess.run([cli, *cli_options, "--cluster", "create",
                    *(f"127.0.0.1:{n.port}" for n in nodes),
                    "--cluster-replicas", "0", "--cluster-yes"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=60)
    wait_until(lambda: all(n.client().cluster("info")["cluster_state"] == "ok" for n in nodes),
               "the Redis Cluster to reach cluster_state:ok", interval=0.1)


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


def start_sentinel(config: Path, ready: Callable[[], Any], what: str,
                   timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """``redis-server CONFIG --sentinel`` (a sentinel rewrites its config: give it a file of
    its own), once ``ready()`` says it is up."""
    process = subprocess.Popen([require_binary("redis-server"), str(config), "--sentinel"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    wait_until(ready, what, timeout=timeout)
    return process


class RedisSentinel:
    """A private master and one sentinel monitoring it as ``service`` (quorum 1)."""

    def __init__(self, service: str = "idem-master", *,
                 master: RedisServer | None = None) -> None:
        self.service = service
        self.master = master or RedisServer()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="idem-sentinel-"))
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/{db}"

    def start(self) -> RedisSentinel:
        self.master.start()
        config = self.dir / "sentinel.conf"
        config.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                          f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1\n")
        client = redis.Redis(port=self.port)
        self.process = start_sentinel(
            config, lambda: client.sentinel_get_master_addr_by_name(self.service),
            f"the sentinel on port {self.port} to start")
        return self

    def close(self) -> None:
        kill_process(self.process)
        self.master.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- RabbitMQ --------------------------------------------------------------------------------

def rabbitmq_available(url: str = RABBITMQ_URL) -> bool:
    """Whether RabbitMQ at ``url`` accepts an AMQP connection (not merely a TCP one)."""
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
    """Remove a run's queue and the direct exchange Celery declared with the queue's name."""
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        channel = conn.default_channel
        with contextlib.suppress(Exception):
            channel.queue_delete(queue)
        with contextlib.suppress(Exception):
            channel.exchange_delete(queue)
