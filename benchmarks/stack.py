"""One benchmark run's services: a Redis server for the broker and the side-effect counters,
another one for the stores (idempotency records and both lock libraries' locks, each in its own
db, so that `INFO commandstats` on it counts store traffic only), RabbitMQ when asked for, and
the worker processes that are started and stopped per block."""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from . import app as bench_app
from .services import (
    RABBITMQ_URL,
    RedisServer,
    Worker,
    delete_amqp_queue,
    delete_redis_queue,
)

BROKER_DB, EFFECTS_DB = 0, 3
STORE_DB, ONCE_DB, SINGLETON_DB = 0, 1, 2


class Stalled(RuntimeError):
    """The worker stopped making progress (the queue still holds messages)."""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class Stack:
    log_dir: Path
    aux: RedisServer = field(init=False)
    store: RedisServer = field(init=False)

    def __post_init__(self) -> None:
        self.aux = RedisServer(name="aux").start()
        self.store = RedisServer(name="store").start()
        self.effects = self.aux.client(EFFECTS_DB)
        # Tasks run in this process too (latency section: Task.apply()).
        os.environ[bench_app.ENV_EFFECTS] = self.aux.url(EFFECTS_DB)

    def close(self) -> None:
        self.effects.close()
        self.aux.close()
        self.store.close()

    def broker_url(self, broker: str) -> str:
        return RABBITMQ_URL if broker == "rabbitmq" else self.aux.url(BROKER_DB)

    def urls(self) -> dict[str, str]:
        return {"store_url": self.store.url(STORE_DB), "once_url": self.store.url(ONCE_DB),
                "singleton_url": self.store.url(SINGLETON_DB)}

    def configure_publisher(self, broker: str, queue: str) -> None:
        bench_app.configure(broker_url=self.broker_url(broker), queue=queue,
                            remote_control=broker != "rabbitmq", **self.urls())

    def flush_stores(self) -> None:
        for db in (STORE_DB, ONCE_DB, SINGLETON_DB):
            client = self.store.client(db)
            client.flushdb()
            client.close()

    @contextmanager
    def worker(self, broker: str, pool: str, *, concurrency: int = 2,
               queue: str | None = None, count_postrun: bool = False,
               env: dict[str, str] | None = None) -> Iterator[Worker]:
        """A worker consuming a queue of its own; the publisher is pointed at the same queue.
        The queue (and, on RabbitMQ, its exchange) is deleted afterwards."""
        queue = queue or unique(f"idem-bench-{broker}-{pool}")
        name = unique(f"bench-{pool}")
        ready = self.log_dir / f"{name}.ready"
        env = {
            **(env or {}),
            bench_app.ENV_BROKER: self.broker_url(broker),
            bench_app.ENV_STORE: self.store.url(STORE_DB),
            bench_app.ENV_ONCE: self.store.url(ONCE_DB),
            bench_app.ENV_SINGLETON: self.store.url(SINGLETON_DB),
            bench_app.ENV_EFFECTS: self.aux.url(EFFECTS_DB),
            bench_app.ENV_QUEUE: queue,
            bench_app.ENV_POSTRUN: "1" if count_postrun else "0",
            bench_app.ENV_READY: str(ready),
        }
        self.configure_publisher(broker, queue)
        worker = Worker("benchmarks.app", env, pool=pool,
                        concurrency=1 if pool == "solo" else concurrency, queues=queue,
                        name=name, log=self.log_dir / f"{name}.log", loglevel="WARNING",
                        ready_file=ready)
        try:
            worker.start(wait_ready=60.0)
            yield worker
        finally:
            worker.stop(timeout=20.0)
            self.delete_queue(broker, queue)

    def delete_queue(self, broker: str, queue: str) -> None:
        if broker == "rabbitmq":
            delete_amqp_queue(RABBITMQ_URL, queue)
        else:
            client = self.aux.client(BROKER_DB)
            delete_redis_queue(client, queue)
            client.close()

    def wait_count(self, key: str, target: int, *, timeout: float,
                   worker: Worker | None = None, interval: float = 0.002,
                   stall_after: float = 5.0) -> float:
        """Poll a counter until it reaches ``target``; returns the time.perf_counter() then.
        Raises `Stalled` when the counter has not moved for ``stall_after`` seconds."""
        deadline = time.monotonic() + timeout
        last, moved = -1, time.monotonic()
        while True:
            value = int(self.effects.get(key) or 0)
            if value >= target:
                return time.perf_counter()
            now = time.monotonic()
            if value != last:
                last, moved = value, now
            if now > deadline or now - moved > stall_after:
                tail = worker.output()[-2000:] if worker else ""
                raise Stalled(f"{key} reached {value} of {target} and did not move for "
                              f"{now - moved:.1f} s\n{tail}")
            time.sleep(interval)


def rotated(items: list[Any], shift: int) -> list[Any]:
    shift %= len(items)
    return items[shift:] + items[:shift]


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def interleave(configs: list[str], rounds: int,
               measure: Callable[[str, int], float]) -> dict[str, list[float]]:
    """Run ``measure(config, round)`` in rounds A,B,C,D / B,C,D,A / ...: every configuration
    sees every position, so that drift on a noisy machine spreads over all of them."""
    samples: dict[str, list[float]] = {config: [] for config in configs}
    for index in range(rounds):
        for config in rotated(configs, index):
            samples[config].append(measure(config, index))
    return samples


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)
