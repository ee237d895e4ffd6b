"""The Celery app that integration tests run in real worker processes.

Configured from the environment so that each test points it at its own broker, store and
side-effect database: BROKER_URL, STORE_URL, EFFECTS_URL (a Redis db where tasks count their
side effects), QUEUE (the test's own queue).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery

from celery_idempotency import IdempotentTask

app = Celery("itest", broker=os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/15"))
app.conf.update(
    idempotency_store_url=os.environ.get("STORE_URL", "memory://"),
    task_default_queue=os.environ.get("QUEUE", "celery"),
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": 30, "unacked_restore_interval": 1,
                              "unacked_restore_throttle": 1, "unacked_mutex_expire": 10,
                              "polling_interval": 0.1},
    result_backend=os.environ.get("RESULT_BACKEND") or None,
)
# Extra settings for the worker, as JSON (e.g. a short idempotency store retry backoff).
app.conf.update(json.loads(os.environ.get("EXTRA_CONF") or "{}"))

_effects: redis.Redis | None = None


def effects() -> redis.Redis:
    global _effects
    if _effects is None:
        _effects = redis.Redis.from_url(os.environ["EFFECTS_URL"])
    return _effects


def record_effect(name: str, key: Any) -> int:
    """The side effect that must happen once per key: a counter in a separate Redis db."""
    return int(effects().incr(f"effect:{name}:{key}"))


def record_value(name: str, key: Any, value: Any) -> None:
    """Remember what a task was called with (JSON, in call order), next to its effect counter."""
    effects().rpush(f"values:{name}:{key}", json.dumps(value, sort_keys=True))


class Flaky(Exception):
    """Cached by tasks that list it in idempotency_cache_errors."""


@app.task(base=IdempotentTask, bind=True)
def charge(self: Any, order_id: int, amount: int = 100, sleep: float = 0.0) -> dict[str, Any]:
    count = record_effect("charge", order_id)
    if sleep:
        time.sleep(sleep)
    return {"order_id": order_id, "amount": amount, "run": count, "task_id": self.request.id}


@app.task(base=IdempotentTask, bind=True, max_retries=3)
def retry_once(self: Any, order_id: int) -> dict[str, Any]:
    count = record_effect("retry_once", order_id)
    if count == 1:
        raise self.retry(countdown=0.5)
    return {"order_id": order_id, "attempts": count, "retries": self.request.retries}


@app.task(base=IdempotentTask, bind=True, idempotency_cache_errors=(Flaky,))
def cached_failure(self: Any, order_id: int) -> None:
    record_effect("cached_failure", order_id)
    raise Flaky(f"order {order_id} declined")


@app.task(base=IdempotentTask, bind=True)
def fails_first_time(self: Any, order_id: int) -> dict[str, Any]:
    count = record_effect("fails_first_time", order_id)
    if count == 1:
        raise RuntimeError(f"transient failure of order {order_id}")
    return {"order_id": order_id, "run": count}


@app.task(bind=True)
def after(self: Any, value: Any) -> Any:
    """A plain callback: counts how often it runs with which value."""
    key = value["order_id"] if isinstance(value, dict) else value
    record_effect("after", key)
    record_value("after", key, value)
    return {"callback_got": value}


@app.task(base=IdempotentTask, bind=True, idempotency_lease=1.5)
def slow(self: Any, job: str, sleep: float = 4.0) -> dict[str, Any]:
    """Records its start, sleeps (outliving its short lease, kept alive by the heartbeat)."""
    count = record_effect("slow", job)
    effects().set(f"pid:slow:{job}", os.getpid())
    time.sleep(sleep)
    return {"job": job, "run": count, "fence": self.request.idempotency_fence}
