"""The Celery app of the replay tests (tests/integration/test_replay.py), run by real workers.

Configured from the environment like ``tests.integration.app`` (BROKER_URL, STORE_URL,
EFFECTS_URL, QUEUE). Every task counts, per job, in the effects database:
``deliveries`` (task_prerun: each time a message of it reaches execution, replays included),
``finished`` (task_postrun) and ``runs`` (the task body itself ran).
"""

from __future__ import annotations

from typing import Any

from billiard.exceptions import WorkerLostError
from celery.signals import task_postrun, task_prerun

from celery_idempotency import IdempotentTask
from tests.support.apps import RedisFromEnv, worker_app

app = worker_app("replay")

effects = RedisFromEnv("EFFECTS_URL")  # effects(): the effects db's client


def count(what: str, job: Any) -> int:
    return int(effects().incr(f"{what}:{job}"))


def _job_of(args: Any, kwargs: Any) -> Any:
    return (kwargs or {}).get("job") or (args[0] if args else None)


@task_prerun.connect
def _delivered(sender: Any = None, args: Any = None, kwargs: Any = None, **_: Any) -> None:
    if sender is not None and sender.name.startswith("replay."):
        count("deliveries", _job_of(args, kwargs))


@task_postrun.connect
def _finished(sender: Any = None, args: Any = None, kwargs: Any = None, **_: Any) -> None:
    if sender is not None and sender.name.startswith("replay."):
        count("finished", _job_of(args, kwargs))


class Audited(Exception):
    """Its constructor has a side effect: each run is counted (``constructed:<job>``)."""

    def __init__(self, job: str, message: str) -> None:
        count("constructed", job)
        super().__init__(job, message)


@app.task(base=IdempotentTask, bind=True, name="replay.plain")
def plain(self: Any, job: str) -> str:
    count("runs", job)
    return job


@app.task(base=IdempotentTask, bind=True, name="replay.lost_cached", reject_on_worker_lost=True,
          idempotency_cache_errors=(WorkerLostError,))
def lost_cached(self: Any, job: str) -> None:
    """Raises WorkerLostError itself; cached. Celery requeues the message once (it takes the
    error for a lost child); the redelivery must replay, not requeue again."""
    count("runs", job)
    raise WorkerLostError(f"raised by the task itself ({job})")


@app.task(base=IdempotentTask, bind=True, name="replay.lost_uncached")
def lost_uncached(self: Any, job: str) -> None:
    """Raises WorkerLostError itself; not cached (a retryable failure)."""
    count("runs", job)
    raise WorkerLostError(f"raised by the task itself ({job})")


@app.task(base=IdempotentTask, bind=True, name="replay.audited_cached",
          idempotency_cache_errors=(Audited,))
def audited_cached(self: Any, job: str) -> None:
    count("runs", job)
    raise Audited(job, "declined")


@app.task(base=IdempotentTask, bind=True, name="replay.audited_uncached")
def audited_uncached(self: Any, job: str) -> None:
    count("runs", job)
    raise Audited(job, "declined")


class Unprintable(Exception):
    """``str()`` and ``repr()`` both raise: the outcome must be recorded all the same."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ is broken")


@app.task(base=IdempotentTask, bind=True, name="replay.unprintable")
def unprintable(self: Any, job: str) -> None:
    count("runs", job)
    raise Unprintable(job)
