"""No key is forgotten while its work is in flight, and none blocks publishes without a live
owner or message, with real workers: a message that is gone (``Reject(requeue=False)``, a
``self.retry()`` that could not be published) fails the key retryable, a record outlives a
task and a countdown longer than its TTL."""

from __future__ import annotations

import time

import pytest

from celery_idempotency import IdempotentTask, KeyState, ReplayedTaskError
from celery_idempotency.keys import RecordRef
from celery_idempotency.store import Entry
from tests.integration import app as itest
from tests.integration.app import outlives_ttl, rejects_first_time, retry_cannot_be_sent
from tests.support.integration import (
    TIMEOUT,
    Effects,
    PublishLog,
    task_log,
    unique,
    wait_for,
)
from tests.support.workers import Worker

SETTLE = 0.5
REJECT = "celery.exceptions.Reject"


def entry_of(task: IdempotentTask, key: str) -> Entry | None:
    return task.idem_store().entry(RecordRef(task.idem_config().scope or task.name, key))


def runs(effects: Effects, name: str, job: str) -> list[dict[str, object]]:
    return effects.values(name, job)


@pytest.mark.parametrize(("task", "name"), [
    (rejects_first_time, "rejects_first_time"),
    (retry_cannot_be_sent, "retry_cannot_be_sent"),
], ids=["reject-requeue-false", "retry-publish-fails"])
def test_a_rejected_message_fails_the_key_and_the_next_publish_runs(
        worker: Worker, effects: Effects, published: PublishLog, task: IdempotentTask,
        name: str) -> None:
    """``Reject(requeue=False)`` (raised by the task, or by Celery when ``self.retry()`` cannot
    publish the retry) drops the message: the key must not stay ``pending`` for its TTL. The
    first handle gets an error at once, and the next publish with the key runs the task."""
    job, key = unique("rejected"), unique("rejected-key")
    handle = task.apply_async((job,), idempotency_key=key)
    started = time.monotonic()
    with pytest.raises(ReplayedTaskError) as info:
        handle.get(timeout=TIMEOUT)
    assert time.monotonic() - started < TIMEOUT, "the handle raised instead of waiting it out"
    assert info.value.error_type == REJECT

    entry = entry_of(task, key)
    assert entry is not None and entry.record is not None
    record = entry.record
    assert (record.state, record.retryable, record.task_id) == (KeyState.FAILED, True,
                                                                handle.id)
    assert record.pending_deadline_ms is None and record.lease_expires_ms is None

    again = task.apply_async((job,), idempotency_key=key)
    assert again.duplicate is False and again.id != handle.id
    assert again.get(timeout=TIMEOUT) == {"job": job, "run": 2}
    assert handle.get(timeout=TIMEOUT) == {"job": job, "run": 2}, "the key's outcome now"
    time.sleep(SETTLE)
    assert effects.count(name, job) == 2
    assert published.ids_for(key) == [handle.id, again.id]


def test_a_requeued_message_runs_again_at_once(worker: Worker, effects: Effects,
                                               published: PublishLog) -> None:
    """``Reject(requeue=True)`` under acks_late: the message comes back, and the key is
    ``pending`` (with a deadline) for it, so the redelivery runs without waiting for a lease."""
    job, key = unique("requeued"), unique("requeued-key")
    handle = rejects_first_time.apply_async((job, True), idempotency_key=key)
    assert handle.get(timeout=TIMEOUT) == {"job": job, "run": 2}
    first, second = runs(effects, "rejects_first_time", job)
    assert first["task_id"] == second["task_id"] == handle.id, "the same message, requeued"
    assert not [line for line in worker.output().splitlines()
                if f"[{handle.id}]" in line and "is running as task" in line]
    time.sleep(SETTLE)
    assert effects.count("rejects_first_time", job) == 2
    assert published.ids_for(key) == [handle.id]


def test_the_record_outlives_a_task_longer_than_its_ttl(worker: Worker, effects: Effects,
                                                        published: PublishLog) -> None:
    """idempotency_ttl=3, the task runs 6 s: the lease renewals keep the record, so neither
    a publish nor a message sent by name (deduplicated at execution) runs it again."""
    job, key = unique("long"), unique("long-key")
    handle = outlives_ttl.apply_async((job, 6.0), idempotency_key=key)
    wait_for(lambda: runs(effects, "outlives_ttl", job), what="the task to start",
             worker=worker)
    time.sleep(4.5)  # well past the 3 s TTL the claim was made with

    entry = entry_of(outlives_ttl, key)
    assert entry is not None and entry.record is not None, "the record expired mid-task"
    assert entry.record.state is KeyState.STARTED and entry.ttl_ms is not None
    duplicate = outlives_ttl.apply_async((job, 6.0), idempotency_key=key)
    assert (duplicate.id, duplicate.duplicate) == (handle.id, True)
    by_name = itest.app.send_task(outlives_ttl.name, args=(job, 6.0),
                                  headers={"idempotency_key": key})

    result = handle.get(timeout=TIMEOUT)
    assert result["run"] == 1
    wait_for(lambda: task_log(worker, by_name.id, "succeeded"),
             what="the message sent by name to replay the result", worker=worker)
    time.sleep(SETTLE)
    assert effects.count("outlives_ttl", job) == 1
    assert published.ids_for(key) == [handle.id, by_name.id]


def test_a_countdown_longer_than_the_ttl_does_not_run_twice(
        worker: Worker, effects: Effects, published: PublishLog) -> None:
    """countdown=5 with idempotency_ttl=3: the reservation lives TTL + countdown, so a client
    retry while the message waits is a duplicate, not a second message."""
    job, key = unique("countdown"), unique("countdown-key")
    handle = outlives_ttl.apply_async((job, 0.1), idempotency_key=key, countdown=5)
    time.sleep(4)  # past the TTL, before the message is due
    entry = entry_of(outlives_ttl, key)
    assert entry is not None and entry.record is not None, "the reservation expired"
    assert entry.record.state is KeyState.PENDING
    assert entry.record.pending_deadline_ms is not None
    retry = outlives_ttl.apply_async((job, 0.1), idempotency_key=key)
    assert (retry.id, retry.duplicate) == (handle.id, True)

    assert handle.get(timeout=TIMEOUT)["run"] == 1
    time.sleep(SETTLE)
    assert effects.count("outlives_ttl", job) == 1
    assert published.ids_for(key) == [handle.id]
