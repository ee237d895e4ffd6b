"""The worker-start check that refuses a memory store split between pool processes (the real
``celery worker`` processes are in tests/integration/test_memory_store_pools.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.concurrency.solo import TaskPool as SoloPool
from celery.concurrency.thread import TaskPool as ThreadPool
from celery.contrib.testing.worker import start_worker

from celery_idempotency import ConfigurationError, IdempotentTask
from celery_idempotency.pool_check import (
    MemoryStoreCheck,
    check_worker,
    memory_store_tasks,
    runs_in_one_process,
)


def make_app(store_url: str = "memory://") -> Celery:
    app = Celery("pools", broker="memory://", set_as_current=False)
    app.conf.update(idempotency_store_url=store_url)
    return app


def add_task(app: Celery, name: str, **options: Any) -> Any:
    @app.task(shared=False, base=IdempotentTask, name=name, **options)
    def task(x: int) -> int:
        return x

    return task


def test_binding_an_idempotent_task_gives_the_app_the_check() -> None:
    app = make_app()
    assert MemoryStoreCheck not in app.steps["worker"]
    add_task(app, "a")
    add_task(app, "b")
    app.finalize()  # tasks are bound here (a worker finalizes before it builds its steps)
    assert MemoryStoreCheck in app.steps["worker"]


class MySoloPool(SoloPool):  # type: ignore[misc]
    pass


@pytest.mark.parametrize(("pool", "single"), [
    ("solo", True), ("threads", True), ("gevent", True), ("eventlet", True),
    (SoloPool, True), (ThreadPool, True), (MySoloPool, True),
    ("prefork", False), ("processes", False), (PreforkPool, False), (None, False),
    ("custom", False), ("some.module:Pool", False),
])
def test_pools_that_run_tasks_in_the_workers_own_process(pool: Any, single: bool) -> None:
    assert runs_in_one_process(pool) is single


def test_the_check_names_the_tasks_on_the_memory_store_and_the_way_out() -> None:
    app = make_app("redis://127.0.0.1:1/0")  # never contacted
    add_task(app, "on.redis")
    add_task(app, "on.memory", idempotency_store_url="memory://")
    add_task(app, "disabled", idempotency_store_url="memory://", idempotency_enabled=False)
    assert memory_store_tasks(app) == ["on.memory"]
    with pytest.raises(ConfigurationError) as raised:
        check_worker(SimpleNamespace(app=app, pool_cls=PreforkPool))
    message = str(raised.value)
    assert "(task(s) on.memory)" in message and "pool 'prefork'" in message
    assert "redis://" in message and "-P solo, -P threads" in message
    check_worker(SimpleNamespace(app=app, pool_cls=ThreadPool))  # accepted


def test_an_app_without_a_memory_store_is_not_checked() -> None:
    app = make_app("redis://127.0.0.1:1/0")
    add_task(app, "on.redis")
    check_worker(SimpleNamespace(app=app, pool_cls=PreforkPool))


def test_an_in_process_worker_is_refused_with_prefork_and_runs_with_solo() -> None:
    app = make_app()
    task = add_task(app, "double")
    with (pytest.raises(ConfigurationError, match="memory store lives in one process"),
          start_worker(app, pool="prefork", concurrency=1, perform_ping_check=False)):
        pass  # pragma: no cover - refused while the worker is built
    # One process: publisher, worker and store share the memory; duplicates get the result.
    with start_worker(app, pool="solo", perform_ping_check=False):
        first = task.apply_async((21,), idempotency_key="k")
        second = task.apply_async((21,), idempotency_key="k")
        assert second.duplicate and first.get(timeout=10) == second.get(timeout=10) == 21
