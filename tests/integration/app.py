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

from celery_idempotency import IdempotentTask
from tests.support.apps import RedisFromEnv, worker_app

app = worker_app("itest", redelivering=True,
                 result_backend=os.environ.get("RESULT_BACKEND") or None)
# Extra settings for the worker, as JSON (e.g. a short idempotency store retry backoff).
app.conf.update(json.loads(os.environ.get("EXTRA_CONF") or "{}"))

effects = RedisFromEnv("EFFECTS_URL")  # effects(): the side-effect db's client


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
    key = value.get("order_id", value.get("job")) if isinstance(value, dict) else value
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


# -- crash safety (test_lost_workers, test_revoke_and_expiry, test_leases_and_fencing) --------

def record_run(self: Any, name: str, job: str) -> int:
    """Count a run of ``name`` for ``job`` and remember who ran it, when, and with which fence
    (one JSON entry per run in ``values:<name>:<job>``)."""
    count = record_effect(name, job)
    record_value(name, job, {"run": count, "pid": os.getpid(), "task_id": self.request.id,
                             "fence": self.request.idempotency_fence, "started": time.time()})
    return count


def record_done(name: str, job: str, run: int) -> None:
    """The task body finished (before its outcome is written to the key store)."""
    effects().rpush(f"done:{name}:{job}", json.dumps({"run": run, "at": time.time()}))


def _tracked(self: Any, name: str, job: str, sleep: float) -> dict[str, Any]:
    count = record_run(self, name, job)
    time.sleep(sleep)
    record_done(name, job, count)
    return {"job": job, "run": count, "fence": self.request.idempotency_fence,
            "pid": os.getpid()}


@app.task(base=IdempotentTask, bind=True, idempotency_lease=30)
def long_lease(self: Any, job: str, sleep: float = 2.0) -> dict[str, Any]:
    """A lease far longer than the test waits: if the key frees up, something released it."""
    return _tracked(self, "long_lease", job, sleep)


@app.task(base=IdempotentTask, bind=True, idempotency_lease=30, reject_on_worker_lost=False)
def long_lease_unrequeued(self: Any, job: str, sleep: float = 2.0) -> dict[str, Any]:
    """As `long_lease`, but a lost worker's message is acknowledged (and so lost)."""
    return _tracked(self, "long_lease_unrequeued", job, sleep)


@app.task(base=IdempotentTask, bind=True, idempotency_lease=6)
def six_second_lease(self: Any, job: str, sleep: float = 1.0) -> dict[str, Any]:
    """A lease that a test can wait out (store outages at completion)."""
    return _tracked(self, "six_second_lease", job, sleep)


@app.task(base=IdempotentTask, bind=True, idempotency_lease=30)
def interruptible(self: Any, job: str, sleep: float = 10.0, grace: float = 1.0) -> dict[str, Any]:
    """Stops early, and still returns a result ``grace`` seconds later, when interrupted with
    SoftTimeLimitExceeded (``revoke(terminate=True, signal='SIGUSR1')``)."""
    from celery.exceptions import SoftTimeLimitExceeded

    count = record_run(self, "interruptible", job)
    try:
        time.sleep(sleep)
    except SoftTimeLimitExceeded:
        record_effect("interrupted", job)
        time.sleep(grace)
        record_done("interruptible", job, count)
        return {"job": job, "run": count, "interrupted": True}
    record_done("interruptible", job, count)
    return {"job": job, "run": count, "interrupted": False}


@app.task(base=IdempotentTask, bind=True, idempotency_lease=30, reject_on_worker_lost=False,
          retry_on_worker_lost=True, max_retries=2, default_retry_delay=0)
def retried_when_lost(self: Any, job: str, sleep: float = 2.0) -> dict[str, Any]:
    """``retry_on_worker_lost``: Celery itself re-sends the task after its worker was lost
    (from the worker's main process, at once; ``task_acks_late`` decides nothing here)."""
    return _tracked(self, "retried_when_lost", job, sleep)


@app.task(base=IdempotentTask, bind=True, idempotency_lease=30, time_limit=1)
def hard_time_limit(self: Any, job: str, sleep: float = 3.0) -> dict[str, Any]:
    """Outlives its hard time limit: the pool kills the child (TimeLimitExceeded)."""
    return _tracked(self, "hard_time_limit", job, sleep)


# -- state machine invariants (tests/integration/test_state_invariants.py) ---------------------

# A TTL shorter than the task and than a countdown: the record must outlive both regardless.
# (A TTL shorter than the lease or the pending timeout is refused, so both are shorter here.)
SHORT_TTL = {"idempotency_ttl": 3, "idempotency_lease": 1.5, "idempotency_pending_timeout": 3}


@app.task(base=IdempotentTask, bind=True, **SHORT_TTL)
def outlives_ttl(self: Any, job: str, sleep: float = 6.0) -> dict[str, Any]:
    """Runs longer than its idempotency_ttl (3 s)."""
    return _tracked(self, "outlives_ttl", job, sleep)


@app.task(base=IdempotentTask, bind=True)
def rejects_first_time(self: Any, job: str, requeue: bool = False) -> dict[str, Any]:
    """The first run rejects its message (``Reject(requeue=...)``); later runs succeed."""
    from celery.exceptions import Reject

    count = record_run(self, "rejects_first_time", job)
    if count == 1:
        raise Reject(f"job {job} rejected", requeue=requeue)
    return {"job": job, "run": count}


@app.task(base=IdempotentTask, bind=True, max_retries=3)
def retry_cannot_be_sent(self: Any, job: str, blob: Any = None) -> dict[str, Any]:
    """The first run's ``self.retry()`` cannot be published (its arguments do not serialize),
    so Celery raises ``Reject(requeue=False)``: the message is gone."""
    count = record_run(self, "retry_cannot_be_sent", job)
    if count == 1:
        raise self.retry(args=(job, object()), countdown=0.1)
    return {"job": job, "run": count}
