"""The Celery app of the benchmark: the same trivial task four times, as plain `celery.Task`,
`IdempotentTask`, celery-once's `QueueOnce` and celery-singleton's `Singleton`.

Worker processes import this module (``celery -A benchmarks.app worker``) configured from the
environment; the benchmark process imports it too and points it at the same services with
`configure`. There is no result backend. Each task's side effect, and the one way the benchmark
sees it finish, is one pipelined round trip to a Redis db that is not the store: INCR of the
run's counter and HINCRBY of the per-key counter.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.signals import task_postrun, worker_ready
from celery_once import QueueOnce
from celery_singleton import Singleton

from celery_idempotency import IdempotentTask
from tests.support.apps import RedisFromEnv, point_app_at

ENV_BROKER = "BENCH_BROKER_URL"
ENV_STORE = "BENCH_STORE_URL"  # IdempotentTask's store
ENV_ONCE = "BENCH_ONCE_URL"  # celery-once's lock db (same server as the store)
ENV_SINGLETON = "BENCH_SINGLETON_URL"  # celery-singleton's lock db (same server)
ENV_EFFECTS = "BENCH_EFFECTS_URL"  # side-effect counters (not the store server)
ENV_QUEUE = "BENCH_QUEUE"
ENV_POSTRUN = "BENCH_COUNT_POSTRUN"  # "1": also count every finished message (round trips)
ENV_READY = "BENCH_READY_FILE"
ENV_EXTRA = "BENCH_EXTRA_CONF"  # JSON settings for the worker, for experiments
ENV_PREFETCH = "BENCH_PREFETCH"  # worker_prefetch_multiplier (default 1, as in docs/peers.md)

PLAIN, IDEM, ONCE, SINGLETON = "bench.plain", "bench.idem", "bench.once", "bench.singleton"


def settings(*, broker_url: str, store_url: str, once_url: str, singleton_url: str,
             queue: str, remote_control: bool) -> dict[str, Any]:
    """Celery settings shared by the publisher and the worker (identical for every task)."""
    return {
        "broker_url": broker_url,
        "result_backend": None,
        "task_default_queue": queue,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": int(os.environ.get(ENV_PREFETCH) or 1),
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": 3600},
        "worker_enable_remote_control": remote_control,
        "worker_hijack_root_logger": True,
        # IdempotentTask
        "idempotency_store_url": store_url,
        # celery-once, as in docs/peers.md
        "ONCE": {"backend": "celery_once.backends.Redis",
                 "settings": {"url": once_url, "default_timeout": 60}},
        # celery-singleton, as in docs/peers.md (defaults otherwise)
        "singleton_backend_url": singleton_url,
    }


app = Celery("benchmarks")
if os.environ.get(ENV_BROKER):
    app.conf.update(settings(
        broker_url=os.environ[ENV_BROKER], store_url=os.environ[ENV_STORE],
        once_url=os.environ[ENV_ONCE], singleton_url=os.environ[ENV_SINGLETON],
        queue=os.environ[ENV_QUEUE],
        remote_control=not os.environ[ENV_BROKER].startswith("amqp")))
    app.conf.update(json.loads(os.environ.get(ENV_EXTRA) or "{}"))

effects = RedisFromEnv(ENV_EFFECTS)  # effects(): the counters' client, one per process


def record_effect(run: str, item: int) -> None:
    """The side effect: one pipelined round trip, counting the run and the item."""
    pipe = effects().pipeline(transaction=False)
    pipe.incr(f"bench:n:{run}")
    pipe.hincrby(f"bench:k:{run}", str(item), 1)
    pipe.execute()


def work(work_ms: float) -> None:
    """Optional simulated I/O wait (a call to another service) before the side effect."""
    if work_ms:
        time.sleep(work_ms / 1000)


def bench_task(name: str, base: type[Task] | None) -> Any:
    """The benchmark's one task body, registered as ``name`` on ``base`` (None: the app's plain
    `celery.Task`): the four configurations differ in their base class and nothing else."""

    @app.task(name=name, base=base)
    def bench(run: str, item: int, work_ms: float = 0.0) -> dict[str, Any]:
        work(work_ms)
        record_effect(run, item)
        return {"item": item, "ok": True}

    return bench


plain = bench_task(PLAIN, None)
idem = bench_task(IDEM, IdempotentTask)
once = bench_task(ONCE, QueueOnce)
singleton = bench_task(SINGLETON, Singleton)


TASKS = {"plain": plain, "idempotent": idem, "celery-once": once, "celery-singleton": singleton}


@task_postrun.connect
def _count_finished(sender: Any = None, task_id: Any = None, **_: Any) -> None:
    # Only in the round-trip section: a message that was deduplicated at execution runs no side
    # effect, so the benchmark needs another way to see that it was processed.
    if os.environ.get(ENV_POSTRUN) == "1":
        effects().incr(f"bench:done:{os.environ[ENV_QUEUE]}")


@worker_ready.connect
def _ready(**_: Any) -> None:
    ready = os.environ.get(ENV_READY)
    if ready:
        Path(ready).write_text("ready")


def configure(**kwargs: Any) -> None:
    """Point this process's app (the publisher) at a stack; drop cached connections."""
    point_app_at(app, **settings(**kwargs))
