"""The Celery app of the benchmark: the same trivial task five times, as plain `celery.Task`,
`IdempotentTask`, celery-once's `QueueOnce`, celery-singleton's `Singleton`, and `FloorTask`:
plain Celery plus the three bare store round trips the design cannot do without (the floor).

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

import redis
from celery import Celery, Task
from celery.signals import task_postrun, worker_ready, worker_shutdown
from celery_once import QueueOnce
from celery_singleton import Singleton

from celery_idempotency import IdempotentTask
from celery_idempotency.config import FINGERPRINT_HEADER, KEY_HEADER
from celery_idempotency.keys import bind_arguments, fingerprint
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
ENV_PROFILE = "BENCH_PROFILE"  # a path: profile the (solo) worker with pyinstrument, write there

PLAIN, IDEM, ONCE, SINGLETON = "bench.plain", "bench.idem", "bench.once", "bench.singleton"
FLOOR = "bench.floor"


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


_store_clients: dict[tuple[int, str], Any] = {}


def floor_store() -> Any:
    """A redis-py client of the idempotency store's server (the URL IdempotentTask uses), one per
    process and URL: the publisher is re-pointed between blocks, pool children fork."""
    url = app.conf.idempotency_store_url
    key = (os.getpid(), url)
    client = _store_clients.get(key)
    if client is None:
        client = _store_clients[key] = redis.Redis.from_url(url)
    return client


class FloorTask(Task):  # type: ignore[misc]
    """Plain Celery plus three bare round trips to the store's redis-server, where
    `IdempotentTask` makes its three store calls: one PING before publishing (reserve), one
    before the body (claim) and one after it (complete). What is left between this and
    `IdempotentTask` is the library's own work: its Python and its scripts' work above a bare
    round trip."""

    def apply_async(self, *args: Any, **kwargs: Any) -> Any:
        floor_store().ping()
        return super().apply_async(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        floor_store().ping()
        result = super().__call__(*args, **kwargs)
        floor_store().ping()
        return result


def work(work_ms: float) -> None:
    """Optional simulated I/O wait (a call to another service) before the side effect."""
    if work_ms:
        time.sleep(work_ms / 1000)


def bench_task(name: str, base: type[Task] | None) -> Any:
    """The benchmark's one task body, registered as ``name`` on ``base`` (None: the app's plain
    `celery.Task`): the five configurations differ in their base class and nothing else."""

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
floor = bench_task(FLOOR, FloorTask)


TASKS = {"plain": plain, "idempotent": idem, "celery-once": once, "celery-singleton": singleton,
         "floor": floor}


@task_postrun.connect
def _count_finished(sender: Any = None, task_id: Any = None, **_: Any) -> None:
    # Only in the round-trip section: a message that was deduplicated at execution runs no side
    # effect, so the benchmark needs another way to see that it was processed.
    if os.environ.get(ENV_POSTRUN) == "1":
        effects().incr(f"bench:done:{os.environ[ENV_QUEUE]}")


_profiler: list[Any] = []


@worker_ready.connect
def _ready(**_: Any) -> None:
    if os.environ.get(ENV_PROFILE):  # `python -m benchmarks --profile` (benchmarks/profile.py)
        from pyinstrument import Profiler

        _profiler.append(Profiler(interval=0.001))
        _profiler[0].start()
    ready = os.environ.get(ENV_READY)
    if ready:
        Path(ready).write_text("ready")


@worker_shutdown.connect
def _write_profile(**_: Any) -> None:
    if _profiler:
        from .profile import summarise

        session = _profiler[0].stop()
        path = Path(os.environ[ENV_PROFILE])
        path.with_suffix(".txt").write_text(_profiler[0].output_text(unicode=True))
        # The session itself runs to tens of MB: only its summary goes back to the benchmark.
        path.with_suffix(".json").write_text(json.dumps(summarise(session)))


def configure(**kwargs: Any) -> None:
    """Point this process's app (the publisher) at a stack; drop cached connections."""
    point_app_at(app, **settings(**kwargs))


def published_headers(task: Any, key: str, args: tuple[Any, ...]) -> dict[str, Any]:
    """The key and fingerprint headers `apply_async` stamps on a published message of ``task``
    (for in-process runs through ``Task.apply``, as a worker would receive it)."""
    return {KEY_HEADER: key, FINGERPRINT_HEADER: fingerprint(bind_arguments(task.run, args, {}))}
