"""Parked duplicates, the protocol driven directly (no Celery) on the memory store: a re-sent
duplicate parks and says so in a header, the owner's completion hands it to `wake_parked`, and
of the copies of the parked message one replays the outcome, the other ends as handled."""

from __future__ import annotations

from typing import Any

import pytest

from celery_idempotency.config import IdempotencyConfig
from celery_idempotency.keys import RecordRef
from celery_idempotency.protocol import PARKED_HEADER, KeyTarget
from celery_idempotency.records import park_field
from celery_idempotency.store import KeyStore, MemoryKeyStore, ParkedDuplicate
from tests.support.executions import DirectExecution, Resent

REF = RecordRef("tasks.report", "report-7")
PARK = b'{"task": "tasks.report", "options": {}}'


class Handled(Exception):
    pass


class Delivery(DirectExecution):
    """One delivery of the task: runs ``body`` if it gets the key; records re-sends, wake-ups
    and the end of a handled copy instead of acting on them."""

    def __init__(self, store: KeyStore, task_id: str, *, busy_attempt: int = 0,
                 parked: bool = False, park: bytes | None = PARK,
                 body: Any = None) -> None:
        config = IdempotencyConfig(store_url="memory://", busy_retry_delay=0.05)
        super().__init__(KeyTarget(REF, "fp", config), sender=None, task_name="tasks.report",
                         task_id=task_id, lease_ms=30_000, busy_attempt=busy_attempt,
                         parked=parked)
        self.store, self.park, self.body = store, park, body
        self.woken: list[ParkedDuplicate] = []

    def run_task(self) -> Any:
        assert self.body is not None, "this delivery must not run the task"
        return self.body()


    def park_data(self) -> bytes | None:
        return self.park

    def wake_parked(self, parked: list[ParkedDuplicate]) -> None:
        self.woken.extend(parked)

    def end_as_handled(self) -> BaseException:
        return Handled()


def _resend(delivery: Delivery) -> Resent:
    with pytest.raises(Resent) as info:
        delivery.execute()
    return info.value


def test_a_parked_duplicate_is_woken_by_the_completion_and_replays_once() -> None:
    store = MemoryKeyStore()
    owner = Delivery(store, "owner")
    # The owner holds the key while its body runs: the duplicate's looks happen then.

    def body() -> Any:
        # First look: waits (0.05 s here), then parks in the claim that ends the wait.
        first = _resend(Delivery(store, "dup"))
        assert first.headers[PARKED_HEADER] == 1
        assert park_field("dup") in store._records[store.store_key(REF)]
        # A later look parks again (same field) and keeps the header.
        assert _resend(Delivery(store, "dup", busy_attempt=1, parked=True)).headers[
            PARKED_HEADER] == 1
        return {"n": 7}

    owner.body = body
    assert owner.execute() == {"n": 7}
    assert owner.woken == [ParkedDuplicate("dup", PARK)]
    # The woken copy replays; the countdown copy, later, ends as handled.
    assert Delivery(store, "dup", busy_attempt=2, parked=True).execute() == {"n": 7}
    with pytest.raises(Handled):
        Delivery(store, "dup", busy_attempt=2, parked=True).execute()


def test_without_park_data_a_resend_does_not_park() -> None:
    store = MemoryKeyStore()
    store.claim(REF, task_id="owner", owner="o1", fingerprint="fp", task_name="tasks.report",
                lease_ms=30_000, ttl_ms=60_000)
    resent = _resend(Delivery(store, "dup", busy_attempt=1, park=None))
    assert PARKED_HEADER not in resent.headers
    assert not any(name.startswith("w:") for name in store._records[store.store_key(REF)])
