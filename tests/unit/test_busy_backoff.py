"""A message blocked by a live owner: its re-sends back off exponentially (a header counts
them), never past the owner's lease left; its first look waits briefly in the worker, woken by
the owner's outcome. The protocol driven directly (no Celery), on the memory store."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from celery_idempotency.config import IdempotencyConfig
from celery_idempotency.keys import RecordRef
from celery_idempotency.protocol import BUSY_ATTEMPT_HEADER, Execution, KeyTarget
from celery_idempotency.store import KeyStore, MemoryKeyStore, ResultPayload
from tests.support.executions import DirectExecution, Resent

REF = RecordRef("tasks.report", "report-7")
DAY_MS = 24 * 3600 * 1000


class Duplicate(DirectExecution):
    """A delivery whose body must never run (the owner runs it) and whose re-send is
    recorded instead of published."""

    def __init__(self, store: KeyStore, *, busy_attempt: int, busy_retry_delay: float = 1.0,
                 lease_ms: int = 30_000) -> None:
        config = IdempotencyConfig(store_url="memory://", busy_retry_delay=busy_retry_delay)
        super().__init__(KeyTarget(REF, "fp", config), sender=None, task_name="tasks.report",
                         task_id="dup", lease_ms=lease_ms, busy_attempt=busy_attempt)
        self.store = store

    def run_task(self) -> Any:
        raise AssertionError("the duplicate ran the task body")



def _owned(lease_ms: int) -> MemoryKeyStore:
    store = MemoryKeyStore()
    store.claim(REF, task_id="owner", owner="o1", fingerprint="fp", task_name="tasks.report",
                lease_ms=lease_ms, ttl_ms=DAY_MS)
    return store


def _fence(store: MemoryKeyStore) -> int:
    """The fence of the claim `_owned` made."""
    record = store.get(REF)
    assert record is not None
    return record.fence


def _resend_of(execution: Execution) -> Resent:
    with pytest.raises(Resent) as info:
        execution.execute()
    return info.value


def test_busy_resends_double_and_count_themselves_in_a_header() -> None:
    store = _owned(lease_ms=600_000)
    sent = [_resend_of(Duplicate(store, busy_attempt=n)) for n in range(1, 8)]
    assert [r.delay for r in sent] == [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
    assert [r.headers[BUSY_ATTEMPT_HEADER] for r in sent] == list(range(2, 9))


def test_busy_resends_never_wait_past_the_owners_lease() -> None:
    """A dead owner stops renewing: the duplicate must be back when the lease runs out."""
    store = _owned(lease_ms=3_000)
    for attempt in range(1, 12):
        assert _resend_of(Duplicate(store, busy_attempt=attempt)).delay <= 3.0


def test_a_first_look_that_times_out_is_resent_after_busy_retry_delay() -> None:
    store = _owned(lease_ms=600_000)
    resent = _resend_of(Duplicate(store, busy_attempt=0, busy_retry_delay=0.2))
    assert (resent.delay, resent.headers) == (0.2, {BUSY_ATTEMPT_HEADER: 1})


def test_a_first_look_waits_for_the_owners_outcome_and_replays_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """The owner completes while the duplicate waits: the duplicate replays the result at
    once, without a re-send."""
    store = _owned(lease_ms=600_000)
    caplog.set_level(logging.INFO, logger="celery_idempotency")
    box: dict[str, Any] = {}

    def deliver() -> None:
        try:
            box["value"] = Duplicate(store, busy_attempt=0, busy_retry_delay=60.0).execute()
        except BaseException as exc:
            box["error"] = exc

    duplicate = threading.Thread(target=deliver)
    duplicate.start()
    waiting = threading.Event()
    for _ in range(2000):
        if "waiting up to" in caplog.text:
            waiting.set()
            break
        duplicate.join(0.005)
    assert waiting.is_set(), "the duplicate waited for the owner"
    rows = ResultPayload(b'{"rows": 3}', "application/json", "utf-8", "stored")
    store.complete(REF, owner="o1", fence=_fence(store), result=rows, ttl_ms=DAY_MS)
    duplicate.join(30)
    assert box == {"value": {"rows": 3}}
    assert "looking again" not in caplog.text


def test_a_later_look_does_not_hold_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    """Only the first look waits in the worker: later ones are re-sent at once."""
    store = _owned(lease_ms=600_000)
    caplog.set_level(logging.INFO, logger="celery_idempotency")
    _resend_of(Duplicate(store, busy_attempt=1))
    assert "looking again in 2.00 s" in caplog.text
    assert "waiting up to" not in caplog.text
