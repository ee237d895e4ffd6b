"""Parked duplicates (docs/wakeups.md, "A duplicate message blocked by a live owner"): a busy
claim with ``park`` registers the message on the record, the owner's final write hands it
back, and of the copies of that message (the woken one, the countdown one) exactly one gets
past the outcome. Run against every store (memory, Redis, Sentinel, Cluster)."""

from __future__ import annotations

import time

from celery_idempotency import KeyState, KeyStore
from celery_idempotency.records import park_field
from celery_idempotency.store import ClaimStatus, ParkedDuplicate
from tests.support.records import DAY_MS, REF, RESULT

PARK = b'{"task": "tasks.charge", "options": {"link": []}}'


def claim(store: KeyStore, task_id: str, owner: str, *, park: bytes | None = None,
          unpark: bool = False, lease_ms: int = 60_000):
    return store.claim(REF, task_id=task_id, owner=owner, fingerprint="fp1",
                       task_name="tasks.charge", lease_ms=lease_ms, ttl_ms=DAY_MS, park=park,
                       unpark=unpark)


def complete(store: KeyStore, owner: str = "o1") -> list[ParkedDuplicate]:
    """The running claim's complete, under its fence (read back from the record)."""
    entry = store.entry(REF)
    assert entry is not None and entry.record is not None
    return store.complete(REF, owner=owner, fence=entry.record.fence, result=RESULT, ttl_ms=DAY_MS)


def fields(store: KeyStore) -> set[str]:
    """The record's field names, parked duplicates included."""
    entry = store.entry(REF)
    assert entry is not None
    raw = store.client.hkeys(entry.store_key) if hasattr(store, "client") \
        else store._records[entry.store_key]  # type: ignore[attr-defined]
    return {name.decode() if isinstance(name, bytes) else name for name in raw}


def test_a_busy_claim_with_park_parks_and_the_final_write_hands_it_back(
        store: KeyStore) -> None:
    claim(store, "t1", "o1")
    busy = claim(store, "d1", "o2", park=PARK)
    assert busy.status is ClaimStatus.BUSY and busy.parked
    assert busy.lease_remaining_ms is not None and busy.lease_remaining_ms > 0
    # A parked duplicate is no field of the record as read (nor a step).
    record = store.get(REF)
    assert record is not None and record.steps == () and record.task_id == "t1"
    assert park_field("d1") in fields(store)
    assert complete(store) == [ParkedDuplicate("d1", PARK)]
    # Left in the record for the copy that replays it; a retried write hands it back again.
    assert complete(store) == [ParkedDuplicate("d1", PARK)]


def test_without_park_nothing_is_parked_and_the_final_write_returns_none(
        store: KeyStore) -> None:
    claim(store, "t1", "o1")
    busy = claim(store, "d1", "o2")
    assert busy.status is ClaimStatus.BUSY and not busy.parked
    assert complete(store) == []


def test_exactly_one_copy_of_a_parked_message_replays_the_outcome(store: KeyStore) -> None:
    claim(store, "t1", "o1")
    claim(store, "d1", "o2", park=PARK)
    claim(store, "d2", "o3", park=PARK)
    parked = complete(store)
    assert sorted(duplicate.task_id for duplicate in parked) == ["d1", "d2"]
    # The woken copy of d1 replays; its countdown copy finds the field gone: handled.
    assert claim(store, "d1", "o4", unpark=True).status is ClaimStatus.SUCCEEDED
    assert claim(store, "d1", "o5", unpark=True).status is ClaimStatus.HANDLED
    # d2's countdown copy came first this time: the woken one is handled.
    assert claim(store, "d2", "o6", unpark=True).status is ClaimStatus.SUCCEEDED
    assert claim(store, "d2", "o7", unpark=True).status is ClaimStatus.HANDLED
    assert park_field("d1") not in fields(store) and park_field("d2") not in fields(store)
    record = store.get(REF)
    assert record is not None and record.state is KeyState.SUCCEEDED


def test_a_cached_failure_hands_back_its_parked_duplicates_once(store: KeyStore) -> None:
    claim(store, "t1", "o1")
    claim(store, "d1", "o2", park=PARK)
    assert store.fail(REF, owner="o1", error='{"type": "E"}', retryable=False,
                      ttl_ms=DAY_MS) == [ParkedDuplicate("d1", PARK)]
    assert claim(store, "d1", "o3", unpark=True).status is ClaimStatus.FAILED
    assert claim(store, "d1", "o4", unpark=True).status is ClaimStatus.HANDLED


def test_a_message_without_the_parked_header_also_removes_its_field(store: KeyStore) -> None:
    """A copy that does not know it parked (e.g. the original message, requeued after its
    re-send failed) replays and removes the field: the woken copy is then handled."""
    claim(store, "t1", "o1")
    claim(store, "d1", "o2", park=PARK)
    complete(store)
    assert claim(store, "d1", "o3").status is ClaimStatus.SUCCEEDED
    assert claim(store, "d1", "o4", unpark=True).status is ClaimStatus.HANDLED


def test_a_copy_of_the_owners_own_message_does_not_park(store: KeyStore) -> None:
    claim(store, "t1", "o1")
    busy = claim(store, "t1", "o2", park=PARK)
    assert busy.status is ClaimStatus.BUSY and not busy.parked
    assert complete(store) == []


def test_after_a_retryable_failure_one_copy_runs_the_task_and_the_other_does_nothing(
        store: KeyStore) -> None:
    claim(store, "t1", "o1")
    claim(store, "d1", "o2", park=PARK)
    # A retryable failure hands the parked duplicate back too: it runs the task.
    assert store.fail(REF, owner="o1", error='{"type": "E"}', retryable=True,
                      ttl_ms=DAY_MS) == [ParkedDuplicate("d1", PARK)]
    assert claim(store, "d1", "o3", unpark=True).status is ClaimStatus.CLAIMED
    # The other copy of d1 meets its own task running: busy, not parked again...
    again = claim(store, "d1", "o4", park=PARK, unpark=True)
    assert again.status is ClaimStatus.BUSY and not again.parked
    assert complete(store, "o3") == []
    # ...and once it is done, it neither replays the outcome nor runs the task again.
    assert claim(store, "d1", "o5", unpark=True).status is ClaimStatus.HANDLED


def test_a_parked_copy_that_takes_a_dead_owners_key_over_runs_it_once(
        store: KeyStore) -> None:
    claim(store, "t1", "o1", lease_ms=100)
    claim(store, "d1", "o2", park=PARK)
    time.sleep(0.25)  # the owner's lease runs out: no final write, nothing handed back
    assert claim(store, "d1", "o3", unpark=True).status is ClaimStatus.TAKEN_OVER
    assert park_field("d1") not in fields(store)
    assert complete(store, "o3") == []
    assert claim(store, "d1", "o4", unpark=True).status is ClaimStatus.HANDLED


def test_a_new_reservation_after_a_retryable_failure_keeps_the_parked_duplicates(
        store: KeyStore) -> None:
    """A new publish runs the task after a retryable failure before any copy of the parked
    message looks again: its outcome still hands the parked message back."""
    claim(store, "t1", "o1")
    claim(store, "d1", "o2", park=PARK)
    store.fail(REF, owner="o1", error='{"type": "E"}', retryable=True, ttl_ms=DAY_MS)
    store.reserve(REF, task_id="t2", fingerprint="fp1", task_name="tasks.charge",
                  ttl_ms=DAY_MS)
    assert claim(store, "t2", "o5").status is ClaimStatus.CLAIMED
    assert complete(store, "o5") == [ParkedDuplicate("d1", PARK)]
    assert claim(store, "d1", "o6", unpark=True).status is ClaimStatus.SUCCEEDED
    assert claim(store, "d1", "o7", unpark=True).status is ClaimStatus.HANDLED


def test_after_the_record_is_deleted_only_one_copy_runs(store: KeyStore) -> None:
    """An operator deletes the record (its parked fields go with it): the first copy of the
    parked message claims and runs the task, the second finds it running (busy, not parked)
    and then done (handled)."""
    claim(store, "t1", "o1")
    claim(store, "d1", "o2", park=PARK)
    record = store.get(REF)
    assert record is not None and store.delete_if_unchanged(record)
    assert claim(store, "d1", "o3", unpark=True).status is ClaimStatus.CLAIMED
    again = claim(store, "d1", "o4", park=PARK, unpark=True)
    assert again.status is ClaimStatus.BUSY and not again.parked
    assert complete(store, "o3") == []
    assert claim(store, "d1", "o5", unpark=True).status is ClaimStatus.HANDLED
