"""Helpers for the integration tests: point the test app (publisher) and a real worker at the
same broker, store and side-effect database; watch what the test process publishes; read the
side effects and the worker's log.

The publisher is ``tests.integration.app.app`` in this process; the worker imports the same
module in its own process, configured from the environment (`Stack.worker_env`). `use_stack`
makes the publisher agree with it: broker, default queue and idempotency store.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
from celery import Celery
from celery.signals import after_task_publish
from kombu import Connection

from tests.support.apps import point_app_at
from tests.support.services import RedisServer
from tests.support.workers import Worker

APP_MODULE = "tests.integration.app"
TIMEOUT = 20.0  # the longest a test waits for an outcome before failing
# Databases of the session redis-server used by the integration tests (tests/store flushes
# db 1, the demo test uses db 10).
BROKER_DB, STORE_DB, EFFECTS_DB = 12, 13, 14

T = TypeVar("T")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def new_order_id() -> int:
    """An order id no other test (or earlier run against the same effects db) uses."""
    return uuid.uuid4().int % 10**15


@dataclass(frozen=True)
class Stack:
    """Where one publisher/worker pair meets: broker and queue, key store, effects db, and any
    extra Celery settings (``extra_conf``) that both sides apply."""

    broker_url: str
    store_url: str
    effects_url: str
    queue: str
    extra_conf: dict[str, Any] = field(default_factory=dict)

    def worker_env(self) -> dict[str, str]:
        return {"BROKER_URL": self.broker_url, "STORE_URL": self.store_url,
                "EFFECTS_URL": self.effects_url, "QUEUE": self.queue,
                "EXTRA_CONF": json.dumps(self.extra_conf)}

    def worker(self, log_dir: Path, *, name: str | None = None, pool: str = "prefork",
               concurrency: int = 2, app: str = APP_MODULE) -> Worker:
        """A worker (not started yet) consuming this stack's queue, logging to ``log_dir``."""
        name = name or unique("w")
        return Worker(app, self.worker_env(), pool=pool, concurrency=concurrency, name=name,
                      queues=self.queue, log=log_dir / f"{name}.log")

    def effects(self) -> redis.Redis:
        return redis.Redis.from_url(self.effects_url)


def redis_stack(server: RedisServer, *, store: RedisServer | None = None,
                **extra_conf: Any) -> Stack:
    """A stack on ``server``: broker and effects there, the store there or on ``store``, and a
    queue of its own so that no other worker takes its messages."""
    store_url = store.url(STORE_DB) if store else server.url(STORE_DB)
    return Stack(broker_url=server.url(BROKER_DB), store_url=store_url,
                 effects_url=server.url(EFFECTS_DB), queue=unique("idem-itest"),
                 extra_conf=dict(extra_conf))


def use_stack(app: Celery, stack: Stack) -> None:
    """Point the publishing app at ``stack``, dropping connections and cached settings."""
    point_app_at(app, broker_url=stack.broker_url, idempotency_store_url=stack.store_url,
                 task_default_queue=stack.queue, **stack.extra_conf)


class Effects:
    """Reads the side effects the tasks record (`tests.integration.app.record_effect`)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def count(self, name: str, key: Any) -> int:
        return int(self.client.get(f"effect:{name}:{key}") or 0)

    def values(self, name: str, key: Any) -> list[Any]:
        return [json.loads(raw) for raw in self.client.lrange(f"values:{name}:{key}", 0, -1)]


@dataclass(frozen=True)
class Published:
    task_id: str
    task_name: str
    key: str | None
    routing_key: str | None


class PublishLog:
    """Every message this process publishes (``after_task_publish``), so that a test can say
    "nothing extra was published" from the publisher's side."""

    def __init__(self) -> None:
        self.messages: list[Published] = []
        self._lock = threading.Lock()

    def _on_publish(self, sender: Any = None, headers: Any = None, routing_key: Any = None,
                    **_: Any) -> None:
        headers = headers or {}
        with self._lock:
            self.messages.append(Published(str(headers.get("id")), str(headers.get("task")),
                                           headers.get("idempotency_key"), routing_key))

    def __enter__(self) -> PublishLog:
        after_task_publish.connect(self._on_publish, weak=False)
        return self

    def __exit__(self, *exc: object) -> None:
        after_task_publish.disconnect(self._on_publish)

    def ids_for(self, key: str) -> list[str]:
        with self._lock:
            return [m.task_id for m in self.messages if m.key == key]


def wait_for(predicate: Callable[[], T], *, timeout: float = TIMEOUT, what: str,
             worker: Worker | None = None, interval: float = 0.05) -> T:
    """Poll until ``predicate()`` is truthy and return it; fail naming ``what`` (and showing the
    worker's log tail) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            tail = f"\n--- worker log tail ---\n{worker.output()[-4000:]}" if worker else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{tail}")
        time.sleep(interval)


def task_log(worker: Worker, task_id: str, event: str) -> list[str]:
    """Lines of the worker log about ``task_id`` for ``event`` ('received', 'succeeded',
    'retry', 'raised')."""
    pattern = re.compile(rf"Task [\w.]+\[{re.escape(task_id)}\] {event}\b.*")
    # Complete lines only: the worker may be writing the last one while it is read (a partial
    # "succeeded" line would be taken for the task's whole result).
    output = worker.output()
    return pattern.findall(output[:output.rfind("\n") + 1])


def succeeded_result(worker: Worker, task_id: str) -> str | None:
    """The return value Celery logged for ``task_id`` (its repr), once it has succeeded."""
    lines = task_log(worker, task_id, "succeeded")
    return lines[-1].split(": ", 1)[1] if lines else None


def redis_queue_length(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a kombu Redis-transport queue (all priority lists of it)."""
    total = 0
    for name in client.scan_iter(match=f"{queue}*"):
        if client.type(name) == b"list":
            total += int(client.llen(name))
    return total


def amqp_queue_exists(url: str, queue: str) -> bool:
    with Connection(url, connect_timeout=5) as conn:
        try:
            conn.default_channel.queue_declare(queue, passive=True)
        except conn.channel_errors:
            return False
        return True


def start_worker(stack: Stack, log_dir: Path, *, pool: str = "prefork", concurrency: int = 2,
                 name: str | None = None) -> Worker:
    """A started worker for ``stack`` with any pool and concurrency (`Stack.worker` is the
    default prefork ``-c 2``)."""
    return stack.worker(log_dir, name=name or unique(f"w-{pool}"), pool=pool,
                        concurrency=concurrency).start()


class Fleet:
    """The workers one test starts, and the processes it freezes: at teardown every frozen
    process is thawed and every worker stopped, whatever the test did."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.workers: list[Worker] = []
        self.frozen: set[int] = set()

    def start(self, stack: Stack, *, pool: str = "prefork", concurrency: int = 2,
              name: str | None = None) -> Worker:
        worker = start_worker(stack, self.log_dir, pool=pool, concurrency=concurrency,
                              name=name)
        self.workers.append(worker)
        return worker

    def freeze(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        self.frozen.add(pid)

    def thaw(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)
        self.frozen.discard(pid)

    def close(self) -> None:
        for pid in list(self.frozen):
            with contextlib.suppress(ProcessLookupError):
                self.thaw(pid)
        for worker in self.workers:  # warm shutdown of all at once, then wait for each
            if worker.process is not None and worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.process.pid, signal.SIGTERM)
        for worker in self.workers:
            worker.stop()


_LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): (\w+)/([\w-]+)\] (.*)$")


@dataclass(frozen=True)
class LogLine:
    at: float  # epoch seconds (the worker logs local time with ms)
    level: str
    process: str  # MainProcess, ForkPoolWorker-1, ...
    message: str


def log_lines(worker: Worker, needle: str = "") -> list[LogLine]:
    """The worker's log records whose first line contains ``needle``, with their timestamps."""
    found = []
    for raw in worker.output().splitlines():
        match = _LOG_LINE.match(raw)
        if match and needle in match.group(4):
            stamp = time.mktime(time.strptime(match.group(1)[:19], "%Y-%m-%d %H:%M:%S"))
            found.append(LogLine(stamp + int(match.group(1)[20:]) / 1000, match.group(2),
                                 match.group(3), match.group(4)))
    return found
