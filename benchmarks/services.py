"""Private services for a benchmark run, from the test suite's pytest-free support package
(tests/support): ``redis-server`` processes on free ports, real ``celery worker`` processes
(each in its own process group), and a queue of our own on the shared RabbitMQ. Everything
started here is stopped by the run that started it."""

from __future__ import annotations

import redis

from tests.support.services import (
    RABBITMQ_URL,
    RedisServer,
    ServiceMissing,
    delete_amqp_queue,
    rabbitmq_available,
    rabbitmq_version,
)
from tests.support.workers import ROOT, Worker

__all__ = ["RABBITMQ_URL", "ROOT", "RedisServer", "ServiceMissing", "Worker",
           "delete_amqp_queue", "delete_redis_queue", "rabbitmq_available", "rabbitmq_version"]


def delete_redis_queue(client: redis.Redis, queue: str) -> None:
    """Remove a kombu Redis-transport queue (all its priority lists) and its binding entry."""
    names = list(client.scan_iter(match=f"{queue}*"))
    if names:
        client.delete(*names)
    client.delete(f"_kombu.binding.{queue}")
