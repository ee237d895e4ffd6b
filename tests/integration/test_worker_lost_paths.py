"""The other ways Celery handles a lost child: re-sending it (``retry_on_worker_lost``) and a
hard time limit. Neither may leave the key stuck in ``pending`` with no message to run it."""

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
from tests.integration.app import hard_time_limit, retried_when_lost
from tests.support.integration import (
    TIMEOUT,
    Effects,
    redis_stack,
    start_worker,
    unique,
    use_stack,
    wait_for,
)
from tests.support.services import RedisServer
from tests.support.workers import Worker


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
