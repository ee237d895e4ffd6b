"""The key store goes down: fail closed, lose nothing.

The store is a redis-server of its own (``own_redis``) that the test stops and restarts; the
broker and the effects db stay up on the session server. Each test starts its own worker, at
the moment the scenario needs it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_idempotency import StoreUnavailable
from tests.integration import app as itest
from tests.integration.app import charge
from tests.support.integration import (
    BROKER_DB,
    TIMEOUT,
    Effects,
    PublishLog,
    Stack,
    new_order_id,
    redis_queue_length,
    redis_stack,
    task_log,
    unique,
    use_stack,
    wait_for,
)
from tests.support.services import RedisServer
from tests.support.workers import Worker


@pytest.fixture
def failing_stack(redis_server: RedisServer, own_redis: RedisServer) -> Stack:
    # A short backoff cap, so that the worker looks again soon after the store is back.
    made = redis_stack(redis_server, store=own_redis,
                       idempotency_store_retry_max_delay=1.0,
                       idempotency_store_timeout=0.5)
    use_stack(itest.app, made)
    return made


@pytest.fixture
def late_worker(failing_stack: Stack, tmp_path: Path) -> Iterator[Worker]:
    """A worker for the failing stack, not started: the test starts it when it wants."""
    worker = failing_stack.worker(tmp_path)
    yield worker
    worker.stop()


@pytest.fixture
def effects(failing_stack: Stack) -> Iterator[Effects]:
    client = failing_stack.effects()
    yield Effects(client)
    client.close()


def test_store_down_at_publish_raises_and_publishes_nothing(
        redis_server: RedisServer, own_redis: RedisServer, failing_stack: Stack,
        late_worker: Worker, effects: Effects, published: PublishLog) -> None:
    order, key = new_order_id(), unique("down-at-publish")
    broker = redis_server.client(BROKER_DB)

    own_redis.stop()
    with pytest.raises(StoreUnavailable) as error:
        charge.apply_async((order,), idempotency_key=key)
    assert error.value.key == key
    assert published.ids_for(key) == []
    assert redis_queue_length(broker, failing_stack.queue) == 0

    own_redis.start()
    assert charge.result_for_key(key) is None, "a failed publish leaves no reservation"

    # Control: with the store back, the same publish goes out (one message) and runs once.
    handle = charge.apply_async((order,), idempotency_key=key)
    assert handle.duplicate is False
    assert redis_queue_length(broker, failing_stack.queue) == 1
    late_worker.start()
    assert handle.get(timeout=TIMEOUT) == {"order_id": order, "amount": 100, "run": 1,
                                           "task_id": handle.id}
    time.sleep(0.5)
    assert effects.count("charge", order) == 1
    assert published.ids_for(key) == [handle.id]
    assert len(task_log(late_worker, handle.id, "received")) == 1
    assert len(re.findall(r"Task \S+ received", late_worker.output())) == 1


def test_store_down_at_execution_fails_closed_and_runs_once_when_back(
        own_redis: RedisServer, failing_stack: Stack, late_worker: Worker,
        effects: Effects, published: PublishLog) -> None:
    order, key = new_order_id(), unique("down-at-execution")

    # Published (and reserved) while the store is up, then the store goes down, keeping its
    # data on disk, before any worker has seen the message.
    handle = charge.apply_async((order,), idempotency_key=key)
    assert handle.duplicate is False
    own_redis.stop(save=True)

    late_worker.start()
    wait_for(lambda: "idempotency store unreachable" in late_worker.output(),
             what="the worker to report the store unreachable", worker=late_worker)
    time.sleep(2.0)  # several attempts, none of which may run the task unprotected
    assert effects.count("charge", order) == 0
    log = late_worker.output()
    assert f"charge[{handle.id}] key={key!r} not run" in log
    assert f"charge[{handle.id}] succeeded" not in log

    own_redis.start(keep_data=True)
    assert handle.record() is not None, "the reservation survived the store's restart"
    assert handle.get(timeout=TIMEOUT) == {"order_id": order, "amount": 100, "run": 1,
                                           "task_id": handle.id}
    time.sleep(1.5)  # longer than the retry backoff: a second run would show by now
    assert effects.count("charge", order) == 1
    assert len(task_log(late_worker, handle.id, "succeeded")) == 1
    assert published.ids_for(key) == [handle.id]
