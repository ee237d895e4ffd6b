"""Checks of our own, run beside Celery's integration tests with their fixtures and tasks
(`celery_suite.py` copies this file into ``t/integration/``): what Celery's tests cannot see,
such as that a duplicate did not run again, with a real worker and a real result backend.
"""

import os
from uuid import uuid4

import pytest
from celery import chain
from celery.result import AsyncResult
from t.integration.tasks import add, build_chain_inside_task, get_redis_connection, sum_and_record

TIMEOUT = 30

pytestmark = pytest.mark.skipif(os.environ.get("COMPAT_MODE") != "idempotent",
                                reason="checks of IdempotentTask as the app's task class")


@pytest.fixture
def runs():
    """The task ids that ran ``sum_and_record`` for a key of this test."""
    key = f"idempotent-checks-{uuid4()}"
    connection = get_redis_connection()
    yield key, lambda: [run.decode() for run in connection.lrange(key, 0, -1)]
    connection.delete(key)


def test_a_duplicate_is_not_sent_and_gets_the_outcome(manager, runs):
    key, ran = runs
    first = sum_and_record.delay([1, 2], key)
    assert first.get(timeout=TIMEOUT) == 3
    again = sum_and_record.delay([1, 2], key)
    assert again.duplicate and again.id == first.id
    assert again.get(timeout=TIMEOUT) == 3
    assert ran() == [first.id]


def test_a_frozen_signature_gets_the_originals_outcome_under_its_own_id(app, manager, runs):
    key, ran = runs
    first = sum_and_record.delay([1, 2], key)
    assert first.get(timeout=TIMEOUT) == 3
    signature = sum_and_record.si([1, 2], key)
    frozen_id = signature.freeze().id
    handle = signature.delay()
    assert handle.id == frozen_id and handle.duplicate
    # Celery's own handle of the frozen id (as a group or chord result holds it) resolves:
    # the message was sent, and the worker replayed the cached outcome instead of running.
    assert AsyncResult(frozen_id, app=app).get(timeout=TIMEOUT) == 3
    assert ran() == [first.id]


def test_the_last_step_of_a_chain_is_sent_when_its_call_was_seen_before(manager, runs):
    key, ran = runs
    first = sum_and_record.delay([1, 2], key)
    assert first.get(timeout=TIMEOUT) == 3
    # The last step is published by the worker with chain=[]: still part of the canvas.
    result = chain(add.si(1, 1), sum_and_record.si([1, 2], key)).delay()
    assert result.get(timeout=TIMEOUT) == 3
    assert ran() == [first.id]


def test_a_duplicate_reads_the_key_store_when_the_backend_forgot(manager, runs):
    key, ran = runs
    first = sum_and_record.delay([1, 2], key)
    assert first.get(timeout=TIMEOUT) == 3
    first.forget()
    assert AsyncResult(first.id).state == "PENDING"
    again = sum_and_record.delay([1, 2], key)
    assert again.duplicate and again.id == first.id
    assert again.state == "SUCCESS"
    assert again.get(timeout=TIMEOUT) == 3
    assert ran() == [first.id]


def test_a_returned_result_handle_is_cached_as_celery_stores_it(manager):
    # The task returns an AsyncResult: Celery's backend stores its id tuple, and so does the
    # key store, so that a duplicate gets that value even once the backend has forgotten it.
    handle = build_chain_inside_task.delay()
    value = handle.get(timeout=TIMEOUT)
    handle.forget()
    again = build_chain_inside_task.delay()
    assert again.duplicate and again.id == handle.id
    assert again.get(timeout=TIMEOUT) == value
