"""A task that ends without an outcome of its own, run eagerly (no broker: its message cannot
come back): the key ends ``failed`` and retryable, never ``pending`` without a message, so
handles raise at once and the next publish runs the task."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from celery.exceptions import Reject

from celery_idempotency import IdempotentTask, KeyState, RecordRef, ReplayedTaskError


def make_task(app: Celery, first_run: BaseException) -> tuple[Any, list[int]]:
    runs: list[int] = []

    @app.task(shared=False, base=IdempotentTask, bind=True, name="tests.gives_up")
    def gives_up(self: Any, order_id: int) -> dict[str, int]:
        runs.append(order_id)
        if len(runs) == 1:
            raise first_run
        return {"order_id": order_id, "run": len(runs)}

    return gives_up, runs


@pytest.mark.parametrize("requeue", [False, True], ids=["requeue-false", "requeue-true"])
def test_reject_fails_the_key_retryable(app: Celery, requeue: bool) -> None:
    task, runs = make_task(app, Reject("no", requeue=requeue))
    first = task.apply_async((7,), idempotency_key="reject-1")
    record = task.idem_store().get(RecordRef(task.name, "reject-1"))
    assert record is not None
    assert (record.state, record.retryable, record.pending_deadline_ms) == (
        KeyState.FAILED, True, None)
    with pytest.raises(ReplayedTaskError) as info:
        first.get(timeout=1)
    assert info.value.error_type == "celery.exceptions.Reject"
    again = task.apply_async((7,), idempotency_key="reject-1")
    assert again.duplicate is False and again.get(timeout=1) == {"order_id": 7, "run": 2}
    assert runs == [7, 7]


def test_shutdown_mid_task_fails_the_key_retryable_when_no_message_comes_back(
        app: Celery) -> None:
    task, runs = make_task(app, SystemExit(1))
    with pytest.raises(SystemExit):
        task.apply_async((8,), idempotency_key="exit-1")
    record = task.idem_store().get(RecordRef(task.name, "exit-1"))
    assert record is not None and (record.state, record.retryable) == (KeyState.FAILED, True)
    assert task.apply_async((8,), idempotency_key="exit-1").get(timeout=1)["run"] == 2
    assert runs == [8, 8]


def test_a_task_that_raised_ignore_leaves_no_record_and_the_next_claim_fences_higher(
        app: Celery) -> None:
    """Ignore deletes the record; the next run's fence is still above the first run's."""
    from celery.exceptions import Ignore

    fences: list[int] = []

    @app.task(shared=False, base=IdempotentTask, bind=True, name="tests.ignores")
    def ignores(self: Any, order_id: int) -> int:
        fences.append(self.request.idempotency_fence)
        if len(fences) == 1:
            raise Ignore()
        return order_id

    ignores.apply_async((9,), idempotency_key="ignore-1")
    assert ignores.idem_store().get(RecordRef(ignores.name, "ignore-1")) is None
    assert ignores.apply_async((9,), idempotency_key="ignore-1").get(timeout=1) == 9
    assert fences[1] > fences[0]
