"""`apply_many` through a real Redis broker and store and a real prefork worker: one execution
per key, duplicates answered with the originals' handles and results, one store round trip per
batch."""

from __future__ import annotations

import time

import pytest
import redis

from celery_idempotency import BulkPublishError, IdempotencyKeyMismatch, IdempotentResult
from celery_idempotency.store import RedisKeyStore
from tests.integration.app import charge
from tests.support.counting import counting_round_trips
from tests.support.integration import (
    TIMEOUT,
    Effects,
    PublishLog,
    Stack,
    new_order_id,
    task_log,
    unique,
)
from tests.support.workers import Worker

SETTLE = 0.5  # after the outcomes: long enough for a stray second execution to show up


@pytest.fixture(autouse=True)
def _running(stack: Stack, worker: Worker) -> None:
    """Every test here needs the module's worker up (and the publisher pointed at it)."""


def test_thirty_percent_duplicates_run_once_per_key(worker: Worker, effects: Effects,
                                                     published: PublishLog) -> None:
    run = unique("bulk")
    orders = [new_order_id() for _ in range(28)]
    # 40 calls: 28 keys, and 12 calls (30%) repeating one of them further down the batch.
    calls = [charge.s(order).set(idempotency_key=f"{run}-{order}") for order in orders]
    calls += [charge.s(order).set(idempotency_key=f"{run}-{order}") for order in orders[:12]]
    store = charge.idem_store()
    assert isinstance(store, RedisKeyStore) and isinstance(store.client, redis.Redis)
    # Once, so that the server has the script: a server without it (fresh, restarted, SCRIPT
    # FLUSH) answers NOSCRIPT, and that batch takes two more round trips (load, send again).
    charge.apply_many([charge.s(new_order_id())])

    with counting_round_trips(store.client) as round_trips:
        handles = charge.apply_many(calls)
    reserve_round_trips = round_trips.count

    assert all(isinstance(h, IdempotentResult) for h in handles)
    assert [h.duplicate for h in handles] == [False] * 28 + [True] * 12
    assert [h.id for h in handles[28:]] == [h.id for h in handles[:12]]
    results = [h.get(timeout=TIMEOUT) for h in handles]
    for order, result, handle in zip(orders + orders[:12], results, handles, strict=True):
        assert result == {"order_id": order, "amount": 100, "run": 1, "task_id": handle.id}

    time.sleep(SETTLE)
    assert reserve_round_trips == 1, "the 40 reservations must be one round trip"
    for order, handle in zip(orders, handles[:28], strict=True):
        assert effects.count("charge", order) == 1
        assert published.ids_for(f"{run}-{order}") == [handle.id], "duplicates are not sent"
        assert len(task_log(worker, handle.id, "succeeded")) == 1


def test_calls_repeated_later_are_duplicates_of_the_first_batch(effects: Effects,
                                                                published: PublishLog) -> None:
    """Derived keys, (args, kwargs) pairs; a second apply_many of the same calls after the
    first ran sends nothing and replays the cached results."""
    orders = [new_order_id() for _ in range(10)]
    first = charge.apply_many([((order,), {"amount": 7}) for order in orders])
    expected = [h.get(timeout=TIMEOUT) for h in first]

    again = charge.apply_many([((order,), {"amount": 7}) for order in orders])

    assert all(h.duplicate for h in again)
    assert [h.id for h in again] == [h.id for h in first]
    assert [h.get(timeout=TIMEOUT) for h in again] == expected
    assert len(published.messages) == 10
    time.sleep(SETTLE)
    assert all(effects.count("charge", order) == 1 for order in orders)


def test_a_mismatch_in_one_call_does_not_stop_the_others(effects: Effects,
                                                         published: PublishLog) -> None:
    key, order, other = unique("bulk-key"), new_order_id(), new_order_id()
    original = charge.apply_async((order,), idempotency_key=key)

    with pytest.raises(BulkPublishError) as info:
        charge.apply_many([((other,), {}), charge.s(order, 999).set(idempotency_key=key)])

    error = info.value
    assert list(error.errors) == [1]
    assert isinstance(error.errors[1], IdempotencyKeyMismatch)
    assert error.results[0].get(timeout=TIMEOUT)["order_id"] == other
    assert original.get(timeout=TIMEOUT)["amount"] == 100
    assert published.ids_for(key) == [original.id]
    time.sleep(SETTLE)
    assert effects.count("charge", order) == 1 and effects.count("charge", other) == 1
