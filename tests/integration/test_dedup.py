"""Deduplication through a real Redis broker and a real prefork worker (one for the module).

Every test uses its own keys and order ids, and checks both what the callers get back and how
often the side effect really happened (a counter the task increments in a separate Redis db).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from celery import chain

from celery_idempotency import IdempotencyKeyMismatch, IdempotentResult, KeyState
from tests.integration import app as itest
from tests.integration.app import Flaky, after, cached_failure, charge, fails_first_time, retry_once
from tests.support.integration import (
    TIMEOUT,
    Effects,
    PublishLog,
    Stack,
    new_order_id,
    succeeded_result,
    task_log,
    unique,
    wait_for,
)
from tests.support.workers import Worker

CHARGE = "tests.integration.app.charge"
SETTLE = 0.5  # after an outcome: long enough for a stray second execution to show up


@pytest.fixture(autouse=True)
def _running(stack: Stack, worker: Worker) -> None:
    """Every test here needs the module's worker up (and the publisher pointed at it)."""


def test_duplicate_publish_with_explicit_key(worker: Worker, effects: Effects,
                                             published: PublishLog) -> None:
    order, key = new_order_id(), unique("order")

    first = charge.apply_async((order,), idempotency_key=key)
    second = charge.apply_async((order,), idempotency_key=key)

    assert isinstance(first, IdempotentResult) and isinstance(second, IdempotentResult)
    assert first.duplicate is False
    assert second.duplicate is True
    assert second.id == first.id
    assert first.idempotency_key == second.idempotency_key == key
    assert published.ids_for(key) == [first.id], "the duplicate must not be published"

    expected = {"order_id": order, "amount": 100, "run": 1, "task_id": first.id}
    assert first.get(timeout=TIMEOUT) == expected
    assert second.get(timeout=TIMEOUT) == expected

    # After the outcome: still the same handle and the cached result, still nothing sent.
    third = charge.apply_async((order,), idempotency_key=key)
    assert (third.id, third.duplicate) == (first.id, True)
    assert third.get(timeout=TIMEOUT) == expected
    assert third.state == "SUCCESS"

    # The same key with other arguments is a client bug: refused, nothing published.
    with pytest.raises(IdempotencyKeyMismatch):
        charge.apply_async((order, 999), idempotency_key=key)

    time.sleep(SETTLE)
    assert published.ids_for(key) == [first.id]
    assert effects.count("charge", order) == 1
    assert len(task_log(worker, first.id, "received")) == 1
    assert len(task_log(worker, first.id, "succeeded")) == 1


def test_derived_key_ignores_how_arguments_are_passed(effects: Effects,
                                                      published: PublishLog) -> None:
    order = new_order_id()

    handles = [
        charge.apply_async((order,)),
        charge.apply_async(kwargs={"order_id": order}),
        charge.apply_async((order,), {"amount": 100}),  # the default, given explicitly
        charge.delay(order, 100, 0.0),
        charge.delay(order_id=order, sleep=0.0),
    ]

    key = handles[0].idempotency_key
    assert key.startswith("args:")
    assert {h.idempotency_key for h in handles} == {key}
    assert {h.id for h in handles} == {handles[0].id}
    assert [h.duplicate for h in handles] == [False, True, True, True, True]
    assert published.ids_for(key) == [handles[0].id]
    results = [h.get(timeout=TIMEOUT) for h in handles]
    assert results == [{"order_id": order, "amount": 100, "run": 1,
                        "task_id": handles[0].id}] * len(handles)

    # Control: other arguments derive another key, and do run.
    other = charge.apply_async((order,), {"amount": 250})
    assert other.idempotency_key != key
    assert other.duplicate is False and other.id != handles[0].id
    assert other.get(timeout=TIMEOUT) == {"order_id": order, "amount": 250, "run": 2,
                                          "task_id": other.id}
    time.sleep(SETTLE)
    assert effects.count("charge", order) == 2  # once per distinct argument set


def test_send_task_with_key_header_runs_once(worker: Worker, effects: Effects,
                                             published: PublishLog) -> None:
    """A service that only knows the task's name: no reservation at publish, so both messages
    reach the worker, and the claim at execution lets only one of them run."""
    order, key = new_order_id(), unique("by-name")

    sent = [itest.app.send_task(CHARGE, args=(order,), kwargs={"sleep": 0.5},
                                headers={"idempotency_key": key}) for _ in range(2)]
    ids = [s.id for s in sent]
    assert ids[0] != ids[1]
    assert published.ids_for(key) == ids  # both really went to the broker

    # No result backend: the outcome comes from the key.
    handle = wait_for(lambda: charge.result_for_key(key), what="the key to be claimed",
                      worker=worker)
    outcome = handle.get(timeout=TIMEOUT)
    assert outcome["order_id"] == order and outcome["run"] == 1
    assert outcome["task_id"] in ids
    assert handle.id == outcome["task_id"]

    # Both Celery tasks finish as SUCCESS, with the one result: the second replays the first.
    logged = [wait_for(lambda i=i: succeeded_result(worker, i),
                       what=f"task {i} to succeed", worker=worker) for i in ids]
    assert logged[0] == logged[1] == repr(outcome)
    time.sleep(SETTLE)
    assert effects.count("charge", order) == 1
    assert handle.record().state is KeyState.SUCCEEDED  # type: ignore[union-attr]

    # A later publish through apply_async sees the key and returns the owner's handle.
    again = charge.apply_async((order,), {"sleep": 0.5}, idempotency_key=key)
    assert (again.id, again.duplicate) == (outcome["task_id"], True)
    assert again.get(timeout=TIMEOUT) == outcome


def test_send_task_without_key_derives_it_at_execution(worker: Worker, effects: Effects) -> None:
    """Sent by name with no key at all: the worker derives the key from the bound arguments,
    so positional and keyword forms of the same call run once."""
    order = new_order_id()
    sent = [itest.app.send_task(CHARGE, args=(order,), kwargs={"sleep": 0.3}),
            itest.app.send_task(CHARGE, kwargs={"order_id": order, "amount": 100,
                                                "sleep": 0.3})]
    logged = [wait_for(lambda s=s: succeeded_result(worker, s.id),
                       what=f"task {s.id} to succeed", worker=worker) for s in sent]
    assert logged[0] == logged[1]
    assert "'run': 1" in logged[0]
    time.sleep(SETTLE)
    assert effects.count("charge", order) == 1


def test_retry_keeps_the_key(worker: Worker, effects: Effects, published: PublishLog) -> None:
    order, key = new_order_id(), unique("retry")

    handle = retry_once.apply_async((order,), idempotency_key=key)
    early = retry_once.apply_async((order,), idempotency_key=key)
    assert (early.id, early.duplicate) == (handle.id, True)

    wait_for(lambda: effects.count("retry_once", order) >= 1, what="the first attempt",
             worker=worker)
    during = retry_once.apply_async((order,), idempotency_key=key)
    assert (during.id, during.duplicate) == (handle.id, True)

    expected = {"order_id": order, "attempts": 2, "retries": 1}
    assert handle.get(timeout=TIMEOUT) == expected
    assert early.get(timeout=TIMEOUT) == during.get(timeout=TIMEOUT) == expected

    after_done = retry_once.apply_async((order,), idempotency_key=key)
    assert (after_done.id, after_done.duplicate) == (handle.id, True)
    assert after_done.get(timeout=TIMEOUT) == expected

    time.sleep(SETTLE)
    assert effects.count("retry_once", order) == 2  # two attempts of one task, nothing more
    assert published.ids_for(key) == [handle.id]  # the retry came from the worker
    assert len(task_log(worker, handle.id, "retry")) == 1
    assert len(task_log(worker, handle.id, "succeeded")) == 1


def test_cacheable_error_is_replayed_to_duplicates(worker: Worker, effects: Effects,
                                                   published: PublishLog) -> None:
    order, key = new_order_id(), unique("declined")
    message = f"order {order} declined"

    handle = cached_failure.apply_async((order,), idempotency_key=key)
    with pytest.raises(Flaky, match=message) as first_error:
        handle.get(timeout=TIMEOUT)
    assert type(first_error.value) is Flaky
    record = handle.record()
    assert record is not None and record.state is KeyState.FAILED and not record.retryable

    duplicate = cached_failure.apply_async((order,), idempotency_key=key)
    assert (duplicate.id, duplicate.duplicate) == (handle.id, True)
    with pytest.raises(Flaky) as replayed:
        duplicate.get(timeout=TIMEOUT)
    assert type(replayed.value) is Flaky and str(replayed.value) == message
    assert duplicate.state == "FAILURE"

    # A message sent by name with the key reaches the worker, which replays the error.
    by_name = itest.app.send_task("tests.integration.app.cached_failure", args=(order,),
                                  headers={"idempotency_key": key})
    raised = wait_for(lambda: task_log(worker, by_name.id, "raised"),
                      what="the replayed error in the worker log", worker=worker)
    assert "Flaky" in raised[0] and message in raised[0]

    time.sleep(SETTLE)
    assert effects.count("cached_failure", order) == 1
    assert published.ids_for(key) == [handle.id, by_name.id]


def test_terminal_error_lets_the_next_publish_run_again(worker: Worker, effects: Effects,
                                                        published: PublishLog) -> None:
    order, key = new_order_id(), unique("transient")
    message = f"transient failure of order {order}"

    # The countdown keeps the key pending long enough to hand out a duplicate handle.
    first = fails_first_time.apply_async((order,), idempotency_key=key, countdown=1)
    duplicate = fails_first_time.apply_async((order,), idempotency_key=key)
    assert (duplicate.id, duplicate.duplicate) == (first.id, True)

    for handle in (first, duplicate):
        with pytest.raises(RuntimeError, match=message) as error:
            handle.get(timeout=TIMEOUT)
        assert type(error.value) is RuntimeError
    record = first.record()
    assert record is not None and record.state is KeyState.FAILED and record.retryable
    assert effects.count("fails_first_time", order) == 1

    rerun = fails_first_time.apply_async((order,), idempotency_key=key)
    assert rerun.duplicate is False and rerun.id != first.id
    assert rerun.get(timeout=TIMEOUT) == {"order_id": order, "run": 2}

    later = fails_first_time.apply_async((order,), idempotency_key=key)
    assert (later.id, later.duplicate) == (rerun.id, True)
    assert later.get(timeout=TIMEOUT) == {"order_id": order, "run": 2}

    time.sleep(SETTLE)
    assert effects.count("fails_first_time", order) == 2
    assert published.ids_for(key) == [first.id, rerun.id]


def test_chain_with_duplicate_head_runs_callbacks_with_cached_value(
        worker: Worker, effects: Effects, published: PublishLog) -> None:
    order, key = new_order_id(), unique("chain")

    def workflow() -> chain:
        return chain(charge.s(order, sleep=1.0).set(idempotency_key=key), after.s())

    workflow().apply_async()
    wait_for(lambda: effects.count("charge", order) == 1, what="the first head to start",
             worker=worker)
    workflow().apply_async()  # while the first head runs

    heads = published.ids_for(key)
    assert len(heads) == 2, "a head with callbacks is always published"
    wait_for(lambda: effects.count("after", order) >= 2, what="both callbacks", worker=worker)
    time.sleep(SETTLE)

    assert effects.count("charge", order) == 1
    assert effects.count("after", order) == 2
    head_result = {"order_id": order, "amount": 100, "run": 1, "task_id": heads[0]}
    assert effects.values("after", order) == [head_result, head_result]
    # The second head ended as a SUCCESS with the cached value, without running.
    assert succeeded_result(worker, heads[1]) == repr(head_result)


def test_concurrent_publishes_of_one_key(worker: Worker, effects: Effects,
                                         published: PublishLog) -> None:
    order, key = new_order_id(), unique("burst")
    threads = 32
    barrier = threading.Barrier(threads)

    def publish(_: int) -> IdempotentResult:
        barrier.wait(timeout=TIMEOUT)
        result: IdempotentResult = charge.apply_async((order,), {"sleep": 0.2},
                                                      idempotency_key=key)
        return result

    with ThreadPoolExecutor(max_workers=threads) as pool:
        handles = list(pool.map(publish, range(threads)))

    ids = {h.id for h in handles}
    assert len(ids) == 1
    assert sum(not h.duplicate for h in handles) == 1
    assert published.ids_for(key) == list(ids), "exactly one message published"

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(lambda h: h.get(timeout=TIMEOUT), handles))
    expected = {"order_id": order, "amount": 100, "run": 1, "task_id": ids.pop()}
    assert results == [expected] * threads
    time.sleep(SETTLE)
    assert effects.count("charge", order) == 1
