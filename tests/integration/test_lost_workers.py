"""Lost workers and lost messages on real workers: a prefork child killed mid-task (with and
without the message requeued), Celery re-sending a lost task (``retry_on_worker_lost``), a hard
time limit, and a message the broker lost after its key was reserved. None may leave the key
stuck in ``pending`` or ``started`` with no message to run it.

The tests that kill a child share the module's prefork worker (-c 2); the others start the
worker their settings need. Each test checks what the caller's handle returns, how often the
side effect really ran (the effects db) and the key's record in the store.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_idempotency import KeyState, ReplayedTaskError, celery_compat
from celery_idempotency.keys import RecordRef
from tests.integration import app as itest
from tests.integration.app import (
    hard_time_limit,
    long_lease,
    long_lease_unrequeued,
    retried_when_lost,
)
from tests.support.integration import (
    TIMEOUT,
    Effects,
    PublishLog,
    Stack,
    log_lines,
    redis_stack,
    start_worker,
    task_log,
    unique,
    use_stack,
    wait_for,
)
from tests.support.runs import (
    SETTLE,
    done_of,
    error_type,
    given_up_lines,
    measured,
    record_of,
    runs_of,
    wait_for_runs,
    wait_for_state,
)
from tests.support.services import RedisServer
from tests.support.workers import Worker

# -- a prefork child killed mid-task -----------------------------------------------------------

def test_killed_child_with_requeue_gives_up_the_claim_and_the_redelivery_runs_at_once(
        module_stack: Stack, worker: Worker, effects: Effects, published: PublishLog) -> None:
    """acks_late + reject_on_worker_lost: the main process puts the key back to ``pending``
    as it requeues the message, so the redelivery claims it at once; the lease (30 s) plays no
    part. The side effect ran twice: the child died after it, before the outcome was written
    (the documented limit)."""
    job, key = unique("kill"), unique("kill-key")

    handle = long_lease.apply_async((job, 2.0), idempotency_key=key)
    first = wait_for_runs(effects, "long_lease", job, 1, worker)[0]
    claimed = record_of(long_lease, key)
    assert claimed is not None and claimed.state is KeyState.STARTED
    assert (claimed.fence, claimed.task_id) == (first["fence"], handle.id)
    assert claimed.lease_expires_ms is not None

    os.kill(first["pid"], signal.SIGKILL)
    killed_at = time.time()
    result = handle.get(timeout=TIMEOUT)
    returned_at = time.time()

    runs = runs_of(effects, "long_lease", job)
    assert len(runs) == 2, runs
    second = runs[1]
    assert result == {"job": job, "run": 2, "fence": second["fence"], "pid": second["pid"]}
    assert second["task_id"] == handle.id, "the redelivered message, not a new publish"
    assert second["pid"] != first["pid"]
    assert second["fence"] > first["fence"]
    # Freed by the main process, not by the lease running out.
    assert second["started"] * 1000 < claimed.lease_expires_ms - 20_000

    given_up = given_up_lines(worker, handle.id)
    assert len(given_up) == 1, given_up
    assert given_up[0].process == "MainProcess"
    assert "claim given up (pending for the redelivery)" in given_up[0].message
    assert not log_lines(worker, f"[{handle.id}] key={key!r} is running as task"), \
        "the redelivery never found the key busy: the claim was given up first"
    assert not [line for line in log_lines(worker, "taken over") if key in line.message]

    final = record_of(long_lease, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert (final.fence, final.task_id) == (second["fence"], handle.id)

    time.sleep(SETTLE)
    assert effects.count("long_lease", job) == 2
    assert [d["run"] for d in done_of(effects, "long_lease", job)] == [2]
    assert published.ids_for(key) == [handle.id]
    assert len(task_log(worker, handle.id, "succeeded")) == 1

    measured("1: kill -> claim given up (main process log)", given_up[0].at - killed_at)
    measured("1: claim given up -> redelivered run starts", second["started"] - given_up[0].at)
    measured("1: kill -> redelivered run starts", second["started"] - killed_at)
    measured("1: kill -> .get() returns (2 s task)", returned_at - killed_at)


def test_killed_child_without_requeue_fails_the_key_retryable(
        module_stack: Stack, worker: Worker, effects: Effects, published: PublishLog) -> None:
    """reject_on_worker_lost=False: Celery acknowledges the lost message, nothing will run it.
    The key becomes ``failed`` (retryable) with the WorkerLostError: the handle raises it (as a
    ReplayedTaskError: a replay never raises a control-flow exception), and
    the next publish with the key runs the task again (it is not a duplicate)."""
    job, key = unique("lost"), unique("lost-key")

    handle = long_lease_unrequeued.apply_async((job, 1.0), idempotency_key=key)
    first = wait_for_runs(effects, "long_lease_unrequeued", job, 1, worker)[0]
    os.kill(first["pid"], signal.SIGKILL)

    failed = wait_for_state(long_lease_unrequeued, key, KeyState.FAILED, worker)
    assert failed.retryable is True
    assert error_type(failed) == "billiard.exceptions.WorkerLostError"
    assert (failed.task_id, failed.fence) == (handle.id, first["fence"])
    # A control-flow exception is never raised by a replay (.get() included): the stand-in.
    with pytest.raises(ReplayedTaskError) as raised:
        handle.get(timeout=TIMEOUT)
    assert raised.value.error_type == "billiard.exceptions.WorkerLostError"
    given_up = given_up_lines(worker, handle.id)
    assert len(given_up) == 1
    assert "claim given up (failed, the next publish runs it)" in given_up[0].message

    time.sleep(SETTLE)  # the acknowledged message must not come back
    assert effects.count("long_lease_unrequeued", job) == 1
    assert len(task_log(worker, handle.id, "received")) == 1

    again = long_lease_unrequeued.apply_async((job, 1.0), idempotency_key=key)
    assert again.duplicate is False
    assert again.id != handle.id
    result = again.get(timeout=TIMEOUT)
    second = runs_of(effects, "long_lease_unrequeued", job)[1]
    assert result == {"job": job, "run": 2, "fence": second["fence"], "pid": second["pid"]}
    assert second["fence"] > first["fence"]
    assert second["task_id"] == again.id
    # The first handle reads the key: it now sees the new run's result.
    assert handle.get(timeout=TIMEOUT) == result

    time.sleep(SETTLE)
    final = record_of(long_lease_unrequeued, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert (final.task_id, final.fence) == (again.id, second["fence"])
    assert effects.count("long_lease_unrequeued", job) == 2
    assert published.ids_for(key) == [handle.id, again.id]


# -- Celery's other ways of handling a lost child, and a lost message --------------------------

@pytest.fixture
def started(redis_server: RedisServer, tmp_path: Path,
            request: pytest.FixtureRequest) -> Iterator[tuple[Worker, Effects]]:
    conf: dict[str, Any] = getattr(request, "param", {})
    stack = redis_stack(redis_server, **conf)
    saved = {name: itest.app.conf.get(name) for name in conf}
    use_stack(itest.app, stack)
    worker = start_worker(stack, tmp_path)
    effects = Effects(stack.effects())
    yield worker, effects
    worker.stop()
    effects.client.close()
    itest.app.conf.update(saved)


@pytest.mark.skipif(not celery_compat.RETRIES_ON_WORKER_LOST,
                    reason="Celery has task_retry_on_worker_lost from 5.7 on")
@pytest.mark.parametrize("started", [{}, {"task_acks_late": False}], indirect=True,
                         ids=["acks_late", "early_ack"])
def test_retry_on_worker_lost_reruns_the_task(started: tuple[Worker, Effects]) -> None:
    """Celery re-sends the task from the main process (retry_on_worker_lost): it must run."""
    worker, effects = started
    job, key = unique("retry-lost"), unique("key")
    handle = retried_when_lost.apply_async((job, 1.0), idempotency_key=key)
    run = wait_for(lambda: effects.values("retried_when_lost", job), what="the first run",
                   worker=worker)[0]
    os.kill(run["pid"], signal.SIGKILL)
    result = handle.get(timeout=TIMEOUT)
    assert result["run"] == 2
    assert effects.count("retried_when_lost", job) == 2
    assert "duplicate publish" not in worker.output()


def test_hard_time_limit_fails_the_key_retryable(started: tuple[Worker, Effects]) -> None:
    """A hard time limit is a terminal error: failed (retryable), not a key stuck pending."""
    worker, effects = started
    job, key = unique("time-limit"), unique("key")
    handle = hard_time_limit.apply_async((job, 3.0), idempotency_key=key)
    wait_for(lambda: "Hard time limit" in worker.output(), what="the time limit", worker=worker)
    # A control-flow exception is never raised by a replay (.get() included): the stand-in.
    with pytest.raises(ReplayedTaskError) as raised:
        handle.get(timeout=10)
    assert raised.value.error_type == "billiard.exceptions.TimeLimitExceeded"
    assert effects.count("hard_time_limit", job) == 1
    record = hard_time_limit.idem_store().get(RecordRef(hard_time_limit.name, key))
    assert record is not None and record.state is KeyState.FAILED and record.retryable
    again = hard_time_limit.apply_async((job, 3.0), idempotency_key=key)
    assert again.duplicate is False


@pytest.mark.parametrize("started", [{"idempotency_pending_timeout": 1.0}], indirect=True,
                         ids=["pending_timeout_1s"])
def test_a_reservation_whose_message_never_arrives_is_published_again(
        started: tuple[Worker, Effects], caplog: pytest.LogCaptureFixture) -> None:
    """A broker can lose a message (kombu's Redis transport: a worker killed between taking it
    and recording it as unacked). Its reservation must not block the key for the whole TTL:
    past idempotency_pending_timeout the next publish is sent, and runs once."""
    _worker, effects = started
    job, key = unique("lost-msg"), unique("key")
    # Sent where no worker listens: for this key, the message is as good as lost.
    lost = hard_time_limit.apply_async((job, 0.0), idempotency_key=key,
                                       queue=unique("nobody-listens"))
    early = hard_time_limit.apply_async((job, 0.0), idempotency_key=key)
    assert (early.duplicate, early.id) == (True, lost.id)  # within the deadline: a duplicate
    time.sleep(1.2)
    with caplog.at_level(logging.WARNING, logger="celery_idempotency"):
        again = hard_time_limit.apply_async((job, 0.0), idempotency_key=key)
    assert again.duplicate is False and again.id != lost.id
    result = again.get(timeout=TIMEOUT)
    assert result["run"] == 1
    assert lost.get(timeout=TIMEOUT) == result  # the first handle sees the key's outcome
    assert effects.count("hard_time_limit", job) == 1
    assert "never reached a worker within idempotency_pending_timeout" in caplog.text
