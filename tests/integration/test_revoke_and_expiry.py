"""Revoked, expired and terminated tasks on real workers: the key fails (retryable) with what
Celery records for the task, the claim is given up by the main process, nothing runs it again
until the next publish, and a terminated task that returns late cannot write over the key.

The tests share the module's prefork worker (-c 2). Each checks what the caller's handle
returns, how often the side effect really ran (the effects db) and the key's record.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery.exceptions import TaskRevokedError

from celery_idempotency import IdempotentTask, KeyState
from tests.integration import app as itest
from tests.integration.app import interruptible, long_lease
from tests.support.integration import (
    TIMEOUT,
    Effects,
    PublishLog,
    Stack,
    log_lines,
    task_log,
    unique,
    wait_for,
)
from tests.support.procs import pid_alive
from tests.support.runs import (
    REVOKED,
    SETTLE,
    done_of,
    error_type,
    given_up_lines,
    record_of,
    wait_for_runs,
    wait_for_state,
)
from tests.support.workers import Worker


def _assert_runs_again(task: IdempotentTask, args: tuple[Any, ...], key: str,
                       first_id: str, effects: Effects, name: str, job: str,
                       runs_before: int) -> None:
    """The next publish with the key is not a duplicate: it runs the task (a higher fence)."""
    again = task.apply_async(args, idempotency_key=key)
    assert again.duplicate is False and again.id != first_id
    result = again.get(timeout=TIMEOUT)
    assert result["run"] == runs_before + 1
    final = record_of(task, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert final.task_id == again.id
    time.sleep(SETTLE)
    assert effects.count(name, job) == runs_before + 1


def test_revoked_before_it_runs_fails_the_key_retryable(
        module_stack: Stack, worker: Worker, effects: Effects, published: PublishLog) -> None:
    job, key = unique("revoke"), unique("revoke-key")

    handle = long_lease.apply_async((job, 0.1), idempotency_key=key, countdown=3)
    wait_for(lambda: task_log(worker, handle.id, "received"), what="the ETA message to arrive",
             worker=worker)
    itest.app.control.revoke(handle.id)
    wait_for(lambda: [line for line in log_lines(worker, "flagged as revoked")
                      if handle.id in line.message],
             what="the revoke to arrive", worker=worker)

    failed = wait_for_state(long_lease, key, KeyState.FAILED, worker)
    assert failed.retryable is True
    assert error_type(failed) == REVOKED
    assert failed.error is not None and "revoked" in failed.error["message"]
    assert (failed.task_id, failed.fence) == (handle.id, 0), "never claimed"
    with pytest.raises(TaskRevokedError):
        handle.get(timeout=TIMEOUT)
    given_up = given_up_lines(worker, handle.id)
    assert len(given_up) == 1
    assert f"key={key!r}: task revoked; claim given up (failed, the next publish runs it)" in \
        given_up[0].message
    assert effects.count("long_lease", job) == 0

    _assert_runs_again(long_lease, (job, 0.1), key, handle.id, effects, "long_lease", job, 0)
    assert len(published.ids_for(key)) == 2


def test_expired_before_it_runs_fails_the_key_retryable(
        module_stack: Stack, worker: Worker, effects: Effects, published: PublishLog) -> None:
    job, key = unique("expired"), unique("expired-key")

    past = datetime.now(timezone.utc) - timedelta(seconds=5)
    handle = long_lease.apply_async((job, 0.1), idempotency_key=key, expires=past)
    failed = wait_for_state(long_lease, key, KeyState.FAILED, worker)
    assert failed.retryable is True
    assert error_type(failed) == REVOKED
    assert failed.error is not None and "expired" in failed.error["message"]
    with pytest.raises(TaskRevokedError):
        handle.get(timeout=TIMEOUT)
    given_up = given_up_lines(worker, handle.id)
    assert len(given_up) == 1 and f"key={key!r}: task expired; claim given up" in \
        given_up[0].message
    assert effects.count("long_lease", job) == 0

    _assert_runs_again(long_lease, (job, 0.1), key, handle.id, effects, "long_lease", job, 0)
    assert len(published.ids_for(key)) == 2


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
def test_terminated_while_running_fails_the_key_retryable(
        signame: str, module_stack: Stack, worker: Worker, effects: Effects) -> None:
    """revoke(terminate=True): the main process fails the key (retryable) as it acknowledges
    the message. With SIGTERM (Celery's default) the child also unwinds (SystemExit) and gives
    its claim back; whichever comes first, the key ends failed, and nothing runs it again until
    the next publish."""
    job, key = unique("terminate"), unique("terminate-key")

    handle = long_lease.apply_async((job, 2.0), idempotency_key=key)
    first = wait_for_runs(effects, "long_lease", job, 1, worker)[0]
    itest.app.control.revoke(handle.id, terminate=True, signal=signame)

    failed = wait_for_state(long_lease, key, KeyState.FAILED, worker)
    assert failed.retryable is True
    assert error_type(failed) == REVOKED
    assert (failed.task_id, failed.fence) == (handle.id, first["fence"])
    with pytest.raises(TaskRevokedError):
        handle.get(timeout=TIMEOUT)
    given_up = given_up_lines(worker, handle.id)
    assert len(given_up) == 1 and f"key={key!r}: task terminated; claim given up" in \
        given_up[0].message
    wait_for(lambda: not pid_alive(first["pid"]), what="the child to be gone", worker=worker)

    time.sleep(SETTLE)  # the revoked message is acknowledged: no redelivery
    settled = record_of(long_lease, key)
    assert settled is not None and settled.state is KeyState.FAILED, \
        "the child's exit changed nothing"
    assert effects.count("long_lease", job) == 1
    assert done_of(effects, "long_lease", job) == []
    assert len(task_log(worker, handle.id, "received")) == 1

    _assert_runs_again(long_lease, (job, 2.0), key, handle.id, effects, "long_lease", job, 1)
    final = record_of(long_lease, key)
    assert final is not None and final.fence > first["fence"]


def test_terminated_task_that_finishes_late_cannot_write(
        module_stack: Stack, worker: Worker, effects: Effects) -> None:
    """revoke(terminate=True, signal='SIGUSR1') raises SoftTimeLimitExceeded in the task, which
    here still returns a result a second later: the key was failed by the revoke meanwhile,
    and the late success is refused (OwnershipLost, logged), not written over it."""
    job, key = unique("late"), unique("late-key")

    handle = interruptible.apply_async((job, 10.0, 1.0), idempotency_key=key)
    wait_for_runs(effects, "interruptible", job, 1, worker)
    itest.app.control.revoke(handle.id, terminate=True, signal="SIGUSR1")

    failed = wait_for_state(interruptible, key, KeyState.FAILED, worker)
    assert failed.retryable is True and error_type(failed) == REVOKED
    wait_for(lambda: done_of(effects, "interruptible", job), what="the late return",
             worker=worker)
    refused = wait_for(lambda: log_lines(worker, f"[{handle.id}]: did not record success"),
                       what="the late write to be refused", worker=worker)
    assert refused[0].level == "ERROR" and "lost the claim" in refused[0].message

    time.sleep(SETTLE)
    final = record_of(interruptible, key)
    assert final is not None and final.state is KeyState.FAILED
    assert final.retryable is True and error_type(final) == REVOKED
    assert final.result is None
    assert effects.count("interruptible", job) == 1
    assert effects.count("interrupted", job) == 1
    with pytest.raises(TaskRevokedError):
        handle.get(timeout=TIMEOUT)
