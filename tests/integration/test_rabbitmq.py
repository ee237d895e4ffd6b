"""The same deduplication with RabbitMQ as the broker (the shared server on 127.0.0.1:5672),
on a queue of this test run's own that is deleted afterwards. The key store stays on the
session's private redis-server."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.integration import app as itest
from tests.integration.app import charge
from tests.support.integration import (
    EFFECTS_DB,
    STORE_DB,
    TIMEOUT,
    Effects,
    PublishLog,
    Stack,
    amqp_queue_exists,
    new_order_id,
    succeeded_result,
    task_log,
    unique,
    use_stack,
    wait_for,
)
from tests.support.services import (
    RABBITMQ_URL,
    RedisServer,
    delete_amqp_queue,
    rabbitmq_available,
)
from tests.support.skipping import missing_service
from tests.support.workers import Worker


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer) -> Iterator[Stack]:
    if not rabbitmq_available():
        missing_service(f"RabbitMQ is not reachable at {RABBITMQ_URL}")
    made = Stack(broker_url=RABBITMQ_URL, store_url=redis_server.url(STORE_DB),
                 effects_url=redis_server.url(EFFECTS_DB), queue=unique("idem-itest-amqp"),
                 # No pidbox queue/exchange on the shared server: the test needs no control.
                 extra_conf={"worker_enable_remote_control": False})
    use_stack(itest.app, made)
    yield made
    delete_amqp_queue(RABBITMQ_URL, made.queue)


@pytest.fixture(scope="module")
def worker(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    # A worker name of its own: the shared broker may see other runs' workers.
    running = stack.worker(tmp_path_factory.mktemp("amqp-worker"), name=unique("amqp")).start()
    yield running
    running.stop()


def test_dedup_over_rabbitmq(stack: Stack, worker: Worker, effects: Effects,
                             published: PublishLog) -> None:
    assert itest.app.connection_for_write().transport.driver_type == "amqp"
    assert amqp_queue_exists(RABBITMQ_URL, stack.queue)

    # Duplicate publish with an explicit key: one message, one run, one result.
    order, key = new_order_id(), unique("amqp-order")
    first = charge.apply_async((order,), idempotency_key=key)
    second = charge.apply_async((order,), idempotency_key=key)
    assert (first.duplicate, second.duplicate) == (False, True)
    assert second.id == first.id
    expected = {"order_id": order, "amount": 100, "run": 1, "task_id": first.id}
    assert first.get(timeout=TIMEOUT) == second.get(timeout=TIMEOUT) == expected
    assert published.ids_for(key) == [first.id]

    # Sent by name with the key header, twice: both delivered, one run.
    by_name_order, by_name_key = new_order_id(), unique("amqp-by-name")
    sent = [itest.app.send_task("tests.integration.app.charge", args=(by_name_order,),
                                kwargs={"sleep": 0.3}, headers={"idempotency_key": by_name_key})
            for _ in range(2)]
    ids = [s.id for s in sent]
    assert published.ids_for(by_name_key) == ids
    handle = wait_for(lambda: charge.result_for_key(by_name_key), what="the key to be claimed",
                      worker=worker)
    outcome = handle.get(timeout=TIMEOUT)
    assert outcome["order_id"] == by_name_order and outcome["run"] == 1
    assert outcome["task_id"] in ids
    logged = [wait_for(lambda i=i: succeeded_result(worker, i), what=f"task {i} to succeed",
                       worker=worker) for i in ids]
    assert logged[0] == logged[1] == repr(outcome)

    time.sleep(0.5)
    assert effects.count("charge", order) == 1
    assert effects.count("charge", by_name_order) == 1
    assert len(task_log(worker, first.id, "received")) == 1
