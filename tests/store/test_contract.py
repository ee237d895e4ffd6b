"""The key-store contract: every transition, owner checks, leases, TTLs, mismatches and
undecodable records, run against `MemoryKeyStore` and `RedisKeyStore` alike."""

from __future__ import annotations

import dataclasses
import time

import pytest

from celery_idempotency import (
    CorruptRecord,
    IdempotencyKeyMismatch,
    KeyState,
    KeyStore,
    MemoryKeyStore,
    OwnershipLost,
    RecordRef,
    RedisKeyStore,
)
from celery_idempotency.store import ClaimStatus, ReserveStatus, ResultPayload
from tests.support.records import DAY_MS, PENDING_MS, REF, RESULT, read_raw, write_raw


def reserve(store: KeyStore, task_id: str = "t1", fp: str = "fp1", ttl_ms: int = DAY_MS,
            ref: RecordRef = REF, pending_ms: int = PENDING_MS):
    return store.reserve(ref, task_id=task_id, fingerprint=fp, task_name="tasks.charge",
                         ttl_ms=ttl_ms, pending_ms=pending_ms)


def claim(store: KeyStore, task_id: str = "t1", owner: str = "o1", fp: str = "fp1",
          lease_ms: int = 60_000, ttl_ms: int = DAY_MS, ref: RecordRef = REF):
    return store.claim(ref, task_id=task_id, owner=owner, fingerprint=fp,
                       task_name="tasks.charge", lease_ms=lease_ms, ttl_ms=ttl_ms)


def state(store: KeyStore, ref: RecordRef = REF) -> KeyState | None:
    record = store.get(ref)
    return record.state if record else None


# -- reserve -----------------------------------------------------------------------------------

def test_reserve_creates_pending_record_keeping_the_original_key(store: KeyStore) -> None:
    assert reserve(store).status is ReserveStatus.RESERVED
    record = store.get(REF)
    assert record is not None
    assert (record.state, record.key, record.scope, record.task_id, record.fingerprint) == (
        KeyState.PENDING, "order-42", "tasks.charge", "t1", "fp1")
    assert record.owner is None and record.fence == 0


def test_second_reserve_is_a_duplicate_naming_the_original_task(store: KeyStore) -> None:
    reserve(store, task_id="t1")
    outcome = reserve(store, task_id="t2")
    assert outcome.status is ReserveStatus.DUPLICATE
    assert outcome.record is not None and outcome.record.task_id == "t1"
    assert store.get(REF).task_id == "t1"  # type: ignore[union-attr]


def test_reserve_repeated_by_the_same_task_is_idempotent(store: KeyStore) -> None:
    """A reply lost on the network and the call retried must not turn into a duplicate."""
    reserve(store, task_id="t1")
    assert reserve(store, task_id="t1").status is ReserveStatus.RESERVED


def test_reserve_with_other_arguments_raises_mismatch(store: KeyStore) -> None:
    reserve(store, fp="fp1")
    with pytest.raises(IdempotencyKeyMismatch) as info:
        reserve(store, task_id="t2", fp="fp2")
    assert info.value.key == "order-42" and info.value.task_id == "t1"
    assert store.get(REF).fingerprint == "fp1"  # type: ignore[union-attr]


def test_reserve_of_started_key_with_live_lease_is_duplicate(store: KeyStore) -> None:
    reserve(store)
    claim(store, lease_ms=60_000)
    assert reserve(store, task_id="t2").status is ReserveStatus.DUPLICATE


def test_reserve_of_started_key_with_expired_lease_is_stale(store: KeyStore) -> None:
    reserve(store)
    claim(store, lease_ms=50)
    time.sleep(0.1)
    outcome = reserve(store, task_id="t2")
    assert outcome.status is ReserveStatus.STALE
    # Publishing goes ahead, but the record is untouched until the new message claims it.
    assert state(store) is KeyState.STARTED and store.get(REF).task_id == "t1"  # type: ignore


def test_reserve_after_retryable_failure_reserves_again_keeping_fence(store: KeyStore) -> None:
    reserve(store)
    fence = claim(store).fence
    store.fail(REF, owner="o1", error='{"type":"x.E","message":"m","args":[]}', retryable=True,
               ttl_ms=DAY_MS)
    assert reserve(store, task_id="t2").status is ReserveStatus.RESERVED
    record = store.get(REF)
    assert record is not None
    assert (record.state, record.task_id, record.error, record.fence) == (
        KeyState.PENDING, "t2", None, fence)


def test_reserve_after_cached_failure_is_duplicate(store: KeyStore) -> None:
    reserve(store)
    claim(store)
    store.fail(REF, owner="o1", error='{"type":"x.E","message":"m","args":[]}', retryable=False,
               ttl_ms=DAY_MS)
    assert reserve(store, task_id="t2").status is ReserveStatus.DUPLICATE


def test_reserve_after_success_is_duplicate(store: KeyStore) -> None:
    reserve(store)
    store.complete(REF, owner="o1", fence=claim(store).fence, result=RESULT, ttl_ms=DAY_MS)
    outcome = reserve(store, task_id="t2")
    assert outcome.status is ReserveStatus.DUPLICATE
    assert outcome.record is not None and outcome.record.state is KeyState.SUCCEEDED


def test_unreserve_deletes_only_our_own_pending_reservation(store: KeyStore) -> None:
    reserve(store, task_id="t1")
    assert store.unreserve(REF, task_id="other") is False
    assert state(store) is KeyState.PENDING
    assert store.unreserve(REF, task_id="t1") is True
    assert store.get(REF) is None


def test_unreserve_leaves_a_claimed_record_alone(store: KeyStore) -> None:
    reserve(store, task_id="t1")
    claim(store, task_id="t1")
    assert store.unreserve(REF, task_id="t1") is False
    assert state(store) is KeyState.STARTED


# -- claim -------------------------------------------------------------------------------------

def test_claim_of_absent_key_creates_started_record(store: KeyStore) -> None:
    before_us = store.now_ms() * 1000
    outcome = claim(store)
    # The first fence of a key is the store's clock in µs (see the fencing tests below).
    assert outcome.status is ClaimStatus.CLAIMED and outcome.fence >= before_us
    record = store.get(REF)
    assert record is not None and record.state is KeyState.STARTED
    assert (record.owner, record.key, record.fingerprint) == ("o1", "order-42", "fp1")
    assert record.lease_expires_ms is not None
    assert record.lease_expires_ms > store.now_ms() + 50_000


def test_claim_of_pending_key_by_any_task_id(store: KeyStore) -> None:
    reserve(store, task_id="t1")
    outcome = claim(store, task_id="t-other")
    assert outcome.status is ClaimStatus.CLAIMED
    assert store.get(REF).task_id == "t-other"  # type: ignore[union-attr]


def test_claim_while_live_owner_holds_it_is_busy(store: KeyStore) -> None:
    claim(store, owner="o1")
    outcome = claim(store, task_id="t2", owner="o2")
    assert outcome.status is ClaimStatus.BUSY
    assert outcome.record is not None and outcome.record.owner == "o1"
    # The reply says how long the live lease still runs (the caller needs no clock of its own).
    assert outcome.record.lease_expires_ms is not None
    remaining = outcome.record.lease_expires_ms - store.now_ms()
    assert outcome.lease_remaining_ms is not None
    assert remaining - 1_000 <= outcome.lease_remaining_ms <= 60_000


def test_claim_repeated_by_the_same_owner_is_idempotent(store: KeyStore) -> None:
    first = claim(store, owner="o1")
    again = claim(store, owner="o1")
    assert again.status is ClaimStatus.CLAIMED and again.fence == first.fence


def test_claim_of_expired_lease_takes_over_with_new_fence(store: KeyStore) -> None:
    first = claim(store, task_id="t1", owner="o1", lease_ms=50)
    time.sleep(0.1)
    outcome = claim(store, task_id="t2", owner="o2")
    assert outcome.status is ClaimStatus.TAKEN_OVER
    assert outcome.fence > first.fence and outcome.previous_task_id == "t1"
    record = store.get(REF)
    assert record is not None and (record.owner, record.task_id) == ("o2", "t2")


def test_late_original_owner_cannot_write_after_takeover(store: KeyStore) -> None:
    first = claim(store, owner="o1", lease_ms=50)
    time.sleep(0.1)
    claim(store, task_id="t2", owner="o2")
    with pytest.raises(OwnershipLost) as info:
        store.complete(REF, owner="o1", fence=first.fence, result=RESULT, ttl_ms=DAY_MS)
    assert info.value.key == "order-42" and info.value.task_id == "t2"
    with pytest.raises(OwnershipLost):
        store.fail(REF, owner="o1", error="{}", retryable=True, ttl_ms=DAY_MS)
    assert store.requeue(REF, owner="o1", pending_ms=PENDING_MS) is False
    assert store.renew(REF, owner="o1", lease_ms=60_000) is False
    assert store.discard(REF, owner="o1") is False
    record = store.get(REF)
    assert record is not None and (record.state, record.owner) == (KeyState.STARTED, "o2")


def test_claim_of_succeeded_key_returns_the_record(store: KeyStore) -> None:
    store.complete(REF, owner="o1", fence=claim(store).fence, result=RESULT, ttl_ms=DAY_MS)
    outcome = claim(store, task_id="t2", owner="o2")
    assert outcome.status is ClaimStatus.SUCCEEDED
    assert outcome.record is not None and outcome.record.result == RESULT.data


def test_claim_of_cached_failure_replays_it(store: KeyStore) -> None:
    claim(store)
    store.fail(REF, owner="o1", error='{"type":"x.E","message":"m","args":[]}', retryable=False,
               ttl_ms=DAY_MS)
    outcome = claim(store, task_id="t2", owner="o2")
    assert outcome.status is ClaimStatus.FAILED
    assert outcome.record is not None and outcome.record.error == {
        "type": "x.E", "message": "m", "args": []}


def test_retryable_failure_is_rerun_by_a_new_message_but_replayed_to_its_own(
        store: KeyStore) -> None:
    first = claim(store, task_id="t1")
    store.fail(REF, owner="o1", error='{"type":"x.E","message":"m","args":[]}', retryable=True,
               ttl_ms=DAY_MS)
    # The failed message itself, redelivered: replay the error, do not run again.
    assert claim(store, task_id="t1", owner="o2").status is ClaimStatus.FAILED
    # A new message with the key: run again.
    outcome = claim(store, task_id="t2", owner="o3")
    assert outcome.status is ClaimStatus.CLAIMED and outcome.fence > first.fence
    record = store.get(REF)
    assert record is not None and record.error is None and not record.retryable


def test_claim_with_other_arguments_raises_mismatch(store: KeyStore) -> None:
    reserve(store, fp="fp1")
    with pytest.raises(IdempotencyKeyMismatch):
        claim(store, fp="fp2")
    assert state(store) is KeyState.PENDING


# -- complete / fail / requeue / renew / discard ----------------------------------------------

def test_complete_stores_result_and_clears_lease(store: KeyStore) -> None:
    fence = claim(store).fence
    store.complete(REF, owner="o1", fence=fence, result=RESULT, ttl_ms=DAY_MS)
    record = store.get(REF)
    assert record is not None
    assert (record.state, record.result, record.content_type, record.lease_expires_ms) == (
        KeyState.SUCCEEDED, RESULT.data, "application/json", None)
    # Repeating the same claim's write (reply lost, call retried) is harmless: recognised by
    # the fence, as the owner token is gone.
    store.complete(REF, owner="o1", fence=fence, result=RESULT, ttl_ms=DAY_MS)
    assert store.get(REF) == record


def test_a_succeeded_record_keeps_no_owner_and_no_creation_time(store: KeyStore) -> None:
    reserve(store)
    fence = claim(store).fence
    store.complete(REF, owner="o1", fence=fence, result=RESULT, ttl_ms=DAY_MS)
    record = store.get(REF)
    assert record is not None and record.state is KeyState.SUCCEEDED
    # Bytes per record: what a replay, the state machine and the CLI do not need goes.
    assert (record.owner, record.created_ms, record.fence) == (None, None, fence)
    assert record.since_ms == record.updated_ms > 0
    assert (record.key, record.scope, record.task_id, record.fingerprint) == (
        "order-42", "tasks.charge", "t1", "fp1")


def test_a_succeeded_record_holds_only_the_fields_it_still_needs(store: KeyStore) -> None:
    """The layout of docs/benchmarks.md (memory): key, scope, one-letter state, task id,
    fingerprint, fence, completion time and result; the task name only when it is not the
    scope. Both stores write it alike."""
    reserve(store)
    store.complete(REF, owner="o1", fence=claim(store).fence, result=RESULT, ttl_ms=DAY_MS)
    fields = read_raw(store, REF)
    assert sorted(fields) == sorted(["k", "s", "st", "t", "fp", "f", "u", "r"])
    assert fields["st"] == b"D" and fields["k"] == b"order-42"


def test_complete_under_another_fence_is_refused_once_succeeded(store: KeyStore) -> None:
    """Only the claim that wrote the success may repeat it: the same owner token under another
    fence (or another owner under any fence) is not that claim."""
    fence = claim(store).fence
    store.complete(REF, owner="o1", fence=fence, result=RESULT, ttl_ms=DAY_MS)
    for owner, other in (("o1", fence + 1), ("o2", fence - 1), ("o2", 0)):
        with pytest.raises(OwnershipLost, match="succeeded"):
            store.complete(REF, owner=owner, fence=other, result=RESULT, ttl_ms=DAY_MS)
    record = store.get(REF)
    assert record is not None and record.result == RESULT.data


def test_complete_keeps_non_default_content_type_and_status(store: KeyStore) -> None:
    fence = claim(store).fence
    payload = ResultPayload(b"\x80\x04K\x01.", "application/x-python-serialize", "binary",
                            "stored")
    store.complete(REF, owner="o1", fence=fence, result=payload, ttl_ms=DAY_MS)
    record = store.get(REF)
    assert record is not None
    assert (record.content_type, record.content_encoding, record.result) == (
        "application/x-python-serialize", "binary", b"\x80\x04K\x01.")


def test_complete_without_result_keeps_the_success(store: KeyStore) -> None:
    fence = claim(store).fence
    store.complete(REF, owner="o1", fence=fence, result=ResultPayload(
        b"", "application/json", "utf-8", "unserializable"), ttl_ms=DAY_MS)
    record = store.get(REF)
    assert record is not None and record.state is KeyState.SUCCEEDED
    assert record.result_status.value == "unserializable"


def test_complete_of_a_pending_record_is_refused(store: KeyStore) -> None:
    reserve(store)
    with pytest.raises(OwnershipLost):
        # Fence 0 is a pending record's: the fence alone never makes a write ours.
        store.complete(REF, owner="o1", fence=0, result=RESULT, ttl_ms=DAY_MS)
    assert state(store) is KeyState.PENDING


def test_complete_of_a_missing_record_is_refused(store: KeyStore) -> None:
    with pytest.raises(OwnershipLost, match="gone"):
        store.complete(REF, owner="o1", fence=1, result=RESULT, ttl_ms=DAY_MS)
    assert store.get(REF) is None


def test_fail_records_error_and_retryable_flag(store: KeyStore) -> None:
    claim(store)
    store.fail(REF, owner="o1", error='{"type":"builtins.ValueError","message":"bad",'
               '"args":["bad"]}', retryable=False, ttl_ms=DAY_MS)
    record = store.get(REF)
    assert record is not None and record.state is KeyState.FAILED
    assert record.error is not None and record.error["message"] == "bad"
    assert record.retryable is False


def test_requeue_returns_claim_to_pending_for_the_same_task(store: KeyStore) -> None:
    reserve(store, task_id="t1")
    first = claim(store, task_id="t1", owner="o1")
    assert store.requeue(REF, owner="o2", pending_ms=PENDING_MS) is False
    assert store.requeue(REF, owner="o1", ttl_ms=DAY_MS, pending_ms=PENDING_MS) is True
    record = store.get(REF)
    assert record is not None
    assert (record.state, record.task_id, record.lease_expires_ms) == (
        KeyState.PENDING, "t1", None)
    # Repeated by the same owner (reply lost, call retried): harmless.
    assert store.requeue(REF, owner="o1", pending_ms=PENDING_MS) is True
    # The retried message claims it again, with a new fence.
    assert claim(store, task_id="t1", owner="o3").fence > first.fence


def test_renew_extends_only_our_own_lease(store: KeyStore) -> None:
    claim(store, owner="o1", lease_ms=200)
    assert store.renew(REF, owner="o2", lease_ms=60_000) is False
    assert store.renew(REF, owner="o1", lease_ms=60_000) is True
    time.sleep(0.3)
    assert claim(store, task_id="t2", owner="o2").status is ClaimStatus.BUSY


def test_discard_deletes_only_our_own_claim(store: KeyStore) -> None:
    claim(store, owner="o1")
    assert store.discard(REF, owner="o2") is False
    assert store.discard(REF, owner="o1") is True
    assert store.get(REF) is None


# -- TTLs, scopes, scanning, decoding ---------------------------------------------------------

def test_records_expire_after_their_ttl(store: KeyStore) -> None:
    reserve(store, ttl_ms=100, pending_ms=100)
    assert state(store) is KeyState.PENDING
    time.sleep(0.2)
    assert store.get(REF) is None
    fence = claim(store, ttl_ms=100, lease_ms=100).fence
    store.complete(REF, owner="o1", fence=fence, result=RESULT, ttl_ms=150)
    assert state(store) is KeyState.SUCCEEDED
    time.sleep(0.25)
    assert store.get(REF) is None


def test_requeue_with_ttl_covers_a_retry_countdown(store: KeyStore) -> None:
    claim(store, ttl_ms=100, lease_ms=100)
    store.requeue(REF, owner="o1", ttl_ms=5_000, pending_ms=1_000)
    time.sleep(0.2)
    assert state(store) is KeyState.PENDING


def test_scopes_keep_equal_keys_apart(store: KeyStore) -> None:
    other = RecordRef("receipts", "order-42")
    reserve(store, task_id="t1")
    assert reserve(store, task_id="t2", fp="other", ref=other).status is ReserveStatus.RESERVED
    assert store.get(other).task_id == "t2"  # type: ignore[union-attr]


def test_scan_streams_every_record(store: KeyStore) -> None:
    refs = [RecordRef("s", f"k{i}") for i in range(25)]
    for ref in refs:
        reserve(store, ref=ref)
    assert sorted(r.key for r in store.scan()) == sorted(ref.key for ref in refs)


def test_entries_stream_every_record_with_its_ttl(store: KeyStore) -> None:
    refs = [RecordRef("s", f"k{i}") for i in range(25)]
    for ref in refs:
        reserve(store, ref=ref)
    entries = list(store.entries(batch=7))
    assert sorted(e.record.key for e in entries if e.record) == sorted(r.key for r in refs)
    for entry in entries:
        assert entry.error is None and entry.record is not None
        assert entry.store_key == entry.record.store_key
        assert entry.ttl_ms is not None and DAY_MS - 60_000 < entry.ttl_ms <= DAY_MS


def test_entries_without_result_leave_out_only_the_payload(store: KeyStore) -> None:
    store.complete(REF, owner="o1", fence=claim(store).fence, result=RESULT, ttl_ms=DAY_MS)
    [full] = store.entries()
    [light] = store.entries(with_result=False)
    assert full.record is not None and full.record.result == RESULT.data
    assert light.record == dataclasses.replace(full.record, result=None)


def test_entries_report_an_undecodable_record_and_go_on(store: KeyStore) -> None:
    reserve(store, ref=RecordRef("s", "good"))
    write_raw(store, REF, {"k": b"order-42", "s": b"tasks.charge", "st": b"exploded",
                           "t": b"t1", "fp": b"fp1"})
    entries = list(store.entries())
    [bad] = [e for e in entries if e.error is not None]
    assert bad.record is None and "exploded" in str(bad.error)
    assert [e.record.key for e in entries if e.record is not None] == ["good"]
    with pytest.raises(CorruptRecord):
        list(store.scan())


def test_entry_reads_one_record_with_its_ttl(store: KeyStore) -> None:
    assert store.entry(REF) is None
    reserve(store, ttl_ms=60_000, pending_ms=1_000)
    entry = store.entry(REF)
    assert entry is not None and entry.record == store.get(REF)
    assert entry.ttl_ms is not None and 50_000 < entry.ttl_ms <= 60_000


def test_memory_usage_sizes_live_records_only(store: KeyStore) -> None:
    reserve(store)
    entry = store.entry(REF)
    assert entry is not None
    size, missing = store.memory_usage([entry.store_key, "t:{0123456789abcdef}"])
    assert size is not None and size > 50 and missing is None


def test_keys_with_glob_characters_are_plain_keys(store: KeyStore) -> None:
    star = RecordRef("s", "*")
    reserve(store, ref=star)
    assert store.get(RecordRef("s", "a")) is None
    assert store.get(star) is not None


def test_undecodable_record_raises_error_naming_the_key(store: KeyStore) -> None:
    write_raw(store, REF, {"k": b"order-42", "s": b"tasks.charge", "st": b"exploded",
                           "t": b"t1", "fp": b"fp1"})
    with pytest.raises(CorruptRecord) as info:
        store.get(REF)
    assert "exploded" in str(info.value) and info.value.key is not None
    with pytest.raises(CorruptRecord):
        reserve(store, task_id="t2")


def test_deeply_nested_error_is_corrupt_record_not_recursion_error(store: KeyStore) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000  # hand-made: json.loads recurses past the limit
    write_raw(store, REF, {"k": b"order-42", "s": b"tasks.charge", "st": b"F",
                           "t": b"t1", "fp": b"fp1", "e": nested})
    with pytest.raises(CorruptRecord, match="undecodable error"):
        store.get(REF)


def test_record_missing_fields_raises_error(store: KeyStore) -> None:
    write_raw(store, REF, {"st": b"P"})
    with pytest.raises(CorruptRecord, match="no field"):
        store.get(REF)


def test_clock_is_the_stores_own(store: KeyStore) -> None:
    assert abs(store.now_ms() - time.time() * 1000) < 5_000


def test_delete_if_unchanged_refuses_a_record_that_moved_on(store: KeyStore) -> None:
    claim(store, owner="o1", lease_ms=50)
    seen = store.get(REF)
    assert seen is not None
    time.sleep(0.1)
    claim(store, task_id="t2", owner="o2")  # taken over after the operator looked
    assert store.delete_if_unchanged(seen) is False
    assert state(store) is KeyState.STARTED
    current = store.get(REF)
    assert current is not None and store.delete_if_unchanged(current) is True
    assert store.get(REF) is None


# -- abandon (worker main process, for a dead child or a revoked task) ------------------------

LOST = '{"type":"billiard.exceptions.WorkerLostError","message":"lost","args":["lost"]}'


def test_abandon_of_a_dead_childs_claim_requeued_goes_back_to_pending(store: KeyStore) -> None:
    reserve(store, task_id="t1")
    claim(store, task_id="t1", owner="h1:1f.abc")
    assert store.abandon(REF, task_id="t1", owner_prefix="h1:2f.", requeued=True, error=LOST,
                         ttl_ms=DAY_MS, pending_ms=PENDING_MS) is False  # another child's pid
    assert store.abandon(REF, task_id="t2", owner_prefix="h1:1f.", requeued=True, error=LOST,
                         ttl_ms=DAY_MS, pending_ms=PENDING_MS) is False  # another task
    assert state(store) is KeyState.STARTED
    assert store.abandon(REF, task_id="t1", owner_prefix="h1:1f.", requeued=True, error=LOST,
                         ttl_ms=DAY_MS, pending_ms=PENDING_MS) is True
    record = store.get(REF)
    assert record is not None and (record.state, record.task_id) == (KeyState.PENDING, "t1")
    # The redelivered message claims it at once, without waiting out the lease.
    assert claim(store, task_id="t1", owner="h1:3a.def").status is ClaimStatus.CLAIMED


def test_abandon_without_requeue_fails_retryable(store: KeyStore) -> None:
    claim(store, task_id="t1", owner="h1:1f.abc")
    assert store.abandon(REF, task_id="t1", owner_prefix="h1:1f.", requeued=False, error=LOST,
                         ttl_ms=DAY_MS, pending_ms=PENDING_MS) is True
    record = store.get(REF)
    assert record is not None and record.state is KeyState.FAILED and record.retryable
    assert record.error is not None and record.error["message"] == "lost"
    assert reserve(store, task_id="t2").status is ReserveStatus.RESERVED


def test_abandon_of_a_revoked_pending_task_needs_no_owner(store: KeyStore) -> None:
    reserve(store, task_id="t1")
    assert store.abandon(REF, task_id="t1", owner_prefix="", requeued=False, error=LOST,
                         ttl_ms=DAY_MS, pending_ms=PENDING_MS) is True
    assert state(store) is KeyState.FAILED


def test_abandon_leaves_finished_records_and_other_owners_alone(store: KeyStore) -> None:
    fence = claim(store, task_id="t1", owner="h1:1f.abc").fence
    assert store.abandon(REF, task_id="t1", owner_prefix="", requeued=False, error=LOST,
                         ttl_ms=DAY_MS, pending_ms=PENDING_MS) is False
    store.complete(REF, owner="h1:1f.abc", fence=fence, result=RESULT, ttl_ms=DAY_MS)
    assert store.abandon(REF, task_id="t1", owner_prefix="h1:1f.", requeued=False, error=LOST,
                         ttl_ms=DAY_MS, pending_ms=PENDING_MS) is False
    assert state(store) is KeyState.SUCCEEDED


# -- a reservation whose message never reaches a worker ---------------------------------------

def test_reservation_unclaimed_past_its_deadline_is_reserved_anew(store: KeyStore) -> None:
    store.reserve(REF, task_id="t1", fingerprint="fp1", task_name="tasks.charge", ttl_ms=DAY_MS,
                  pending_ms=50)
    assert reserve(store, task_id="t2").status is ReserveStatus.DUPLICATE  # still in time
    time.sleep(0.1)
    outcome = store.reserve(REF, task_id="t3", fingerprint="fp1", task_name="tasks.charge",
                            ttl_ms=DAY_MS, pending_ms=60_000)
    assert (outcome.status, outcome.replaced_task_id) == (ReserveStatus.RESERVED, "t1")
    record = store.get(REF)
    assert record is not None and (record.state, record.task_id) == (KeyState.PENDING, "t3")
    # Only one publisher replaces it: the next is a duplicate of the new reservation.
    again = reserve(store, task_id="t4")
    assert again.status is ReserveStatus.DUPLICATE and again.record.task_id == "t3"  # type: ignore
    # Should the first message arrive after all, it claims the key; the other replays.
    assert claim(store, task_id="t1").status is ClaimStatus.CLAIMED


def test_a_claimed_key_has_no_pending_deadline(store: KeyStore) -> None:
    store.reserve(REF, task_id="t1", fingerprint="fp1", task_name="tasks.charge", ttl_ms=DAY_MS,
                  pending_ms=50)
    claim(store, task_id="t1")
    time.sleep(0.1)
    record = store.get(REF)
    assert record is not None and record.pending_deadline_ms is None
    assert reserve(store, task_id="t2").status is ReserveStatus.DUPLICATE


# -- no record forgotten while its work is in flight, none pending without a deadline -------

def ttl_left(store: KeyStore, ref: RecordRef = REF) -> int:
    entry = store.entry(ref)
    assert entry is not None and entry.ttl_ms is not None
    return entry.ttl_ms


def test_renew_extends_the_ttl_to_cover_the_lease(store: KeyStore) -> None:
    """A task running longer than idempotency_ttl keeps its record (issue: it expired at
    4.5 s of a 6 s task with ttl=3)."""
    claim(store, ttl_ms=300, lease_ms=300)
    assert store.renew(REF, owner="o1", lease_ms=5_000) is True
    assert ttl_left(store) > 4_000
    time.sleep(0.4)  # past the TTL the claim was made with
    record = store.get(REF)
    assert record is not None and record.state is KeyState.STARTED
    assert claim(store, task_id="t2", owner="o2").status is ClaimStatus.BUSY


def test_renew_never_shortens_the_ttl(store: KeyStore) -> None:
    claim(store, ttl_ms=DAY_MS)
    store.renew(REF, owner="o1", lease_ms=1_000)
    assert ttl_left(store) > DAY_MS - 60_000


def test_claim_ttl_covers_the_lease_whatever_the_ttl(store: KeyStore) -> None:
    claim(store, ttl_ms=100, lease_ms=5_000)
    assert ttl_left(store) > 4_000


def test_reservation_ttl_covers_its_pending_deadline(store: KeyStore) -> None:
    store.reserve(REF, task_id="t1", fingerprint="fp1", task_name="tasks.charge", ttl_ms=100,
                  pending_ms=5_000)
    record = store.get(REF)
    assert record is not None and record.pending_deadline_ms is not None
    assert ttl_left(store) > 4_000
    # A reservation taken over past its deadline: the TTL covers the new deadline too.
    other = RecordRef("s", "replaced")
    store.reserve(other, task_id="t1", fingerprint="fp1", task_name="tasks.charge", ttl_ms=100,
                  pending_ms=50)
    time.sleep(0.07)
    outcome = store.reserve(other, task_id="t2", fingerprint="fp1", task_name="tasks.charge",
                            ttl_ms=100, pending_ms=5_000)
    assert outcome.replaced_task_id == "t1" and ttl_left(store, other) > 4_000


def test_requeue_gives_the_pending_record_a_deadline(store: KeyStore) -> None:
    """A retry's (or a requeued message's) pending record has a deadline: should the message
    never come, the next publish after it runs the task."""
    claim(store, task_id="t1", ttl_ms=DAY_MS)
    before = store.now_ms()
    assert store.requeue(REF, owner="o1", ttl_ms=100, pending_ms=5_000) is True
    record = store.get(REF)
    assert record is not None and record.pending_deadline_ms is not None
    assert before + 5_000 <= record.pending_deadline_ms <= store.now_ms() + 5_000
    assert ttl_left(store) > 4_000  # the TTL covers the deadline


def test_requeued_key_is_published_again_once_its_deadline_passes(store: KeyStore) -> None:
    claim(store, task_id="t1")
    store.requeue(REF, owner="o1", pending_ms=50)
    assert reserve(store, task_id="t2").status is ReserveStatus.DUPLICATE
    time.sleep(0.1)
    outcome = reserve(store, task_id="t3")
    assert (outcome.status, outcome.replaced_task_id) == (ReserveStatus.RESERVED, "t1")


def test_abandon_requeued_gives_the_pending_record_a_deadline(store: KeyStore) -> None:
    claim(store, task_id="t1", owner="h1:1f.abc", ttl_ms=100, lease_ms=100)
    assert store.abandon(REF, task_id="t1", owner_prefix="h1:1f.", requeued=True, error=LOST,
                         ttl_ms=DAY_MS, pending_ms=5_000) is True
    record = store.get(REF)
    assert record is not None and record.state is KeyState.PENDING
    assert record.pending_deadline_ms is not None and ttl_left(store) > 4_000


def test_abandon_failed_drops_the_pending_deadline(store: KeyStore) -> None:
    reserve(store, task_id="t1")
    store.abandon(REF, task_id="t1", owner_prefix="", requeued=False, error=LOST, ttl_ms=DAY_MS,
                  pending_ms=PENDING_MS)
    record = store.get(REF)
    assert record is not None and record.state is KeyState.FAILED
    assert record.pending_deadline_ms is None


def test_a_claim_starts_clean(store: KeyStore) -> None:
    """Whatever the state it leaves, a claim keeps no outcome and no deadline of it."""
    claim(store, task_id="t1")
    store.fail(REF, owner="o1", error='{"type":"x.E","message":"m","args":[]}', retryable=True,
               ttl_ms=DAY_MS)
    claim(store, task_id="t2", owner="o2")
    record = store.get(REF)
    assert record is not None and record.state is KeyState.STARTED
    assert (record.error, record.retryable, record.result, record.pending_deadline_ms) == (
        None, False, None, None)


# -- fencing: strictly increasing per key, deletions, expiry and eviction included ------------

def test_fence_is_higher_after_an_operator_deletes_the_record(store: KeyStore) -> None:
    """CLI ``release``/``purge`` delete a stale claim; the zombie owner's fence stays below."""
    zombie = claim(store, owner="o1", lease_ms=50)
    time.sleep(0.07)
    seen = store.get(REF)
    assert seen is not None and store.delete_if_unchanged(seen) is True
    assert claim(store, task_id="t2", owner="o2").fence > zombie.fence


def test_fence_is_higher_after_a_discard(store: KeyStore) -> None:
    """A task that raised Ignore leaves no record; the next claim still fences above it."""
    first = claim(store, owner="o1")
    assert store.discard(REF, owner="o1") is True
    assert store.get(REF) is None
    assert claim(store, task_id="t2", owner="o2").fence > first.fence


def test_fence_is_higher_after_the_record_expired(store: KeyStore) -> None:
    first = claim(store, owner="o1", ttl_ms=50, lease_ms=50)
    time.sleep(0.1)
    assert store.get(REF) is None
    assert claim(store, task_id="t2", owner="o2").fence > first.fence


def test_fence_is_higher_after_unreserve_and_reserve_again(store: KeyStore) -> None:
    first = claim(store, owner="o1")
    store.complete(REF, owner="o1", fence=first.fence, result=RESULT, ttl_ms=DAY_MS)
    seen = store.get(REF)
    assert seen is not None and store.delete_if_unchanged(seen)
    reserve(store, task_id="t2")
    assert store.get(REF).fence == 0  # type: ignore[union-attr]  # never claimed since
    assert claim(store, task_id="t2", owner="o2").fence > first.fence


def test_fence_of_the_same_owner_retrying_its_claim_is_unchanged(store: KeyStore) -> None:
    first = claim(store, owner="o1")
    assert claim(store, owner="o1").fence == first.fence
    assert store.get(REF).fence == first.fence  # type: ignore[union-attr]


def test_redis_fence_is_the_server_clock_in_microseconds_exactly(redis_server) -> None:
    """µs since the epoch need 51 bits: a Lua number holds them exactly, and the record keeps
    every digit (Lua's tostring would round to 14)."""
    store = RedisKeyStore.from_url(redis_server.url(1), prefix="fence-us:")
    try:
        seconds, micros = store.client.time()
        before = seconds * 1_000_000 + micros
        fence = claim(store, owner="o1").fence
        seconds, micros = store.client.time()
        assert before <= fence <= seconds * 1_000_000 + micros
        raw = store.client.hget(store.store_key(REF), "f")
        assert raw == str(fence).encode()
        store.discard(REF, owner="o1")
    finally:
        store.close()


def test_memory_fence_rises_by_one_while_the_record_lives_even_if_the_clock_steps_back() -> None:
    now = [1_800_000_000_000_000]
    store = MemoryKeyStore(prefix="t:", clock_us=lambda: now[0])
    first = claim(store, owner="o1", lease_ms=10)
    now[0] += 20_000  # lease expired
    second = claim(store, task_id="t2", owner="o2", lease_ms=10)
    assert second.fence == now[0] > first.fence
    store.fail(REF, owner="o2", error="{}", retryable=True, ttl_ms=DAY_MS)
    now[0] -= 3_600_000_000  # the clock steps back an hour: the record still carries the fence
    third = claim(store, task_id="t3", owner="o3")
    assert (third.status, third.fence) == (ClaimStatus.CLAIMED, second.fence + 1)


def test_memory_fence_after_deletion_relies_on_the_clock_not_stepping_back() -> None:
    """The documented limit: across a deletion the fence comes from the clock alone."""
    now = [1_800_000_000_000_000]
    store = MemoryKeyStore(prefix="t:", clock_us=lambda: now[0])
    first = claim(store, owner="o1")
    assert store.discard(REF, owner="o1")
    now[0] += 1  # any forward step keeps it increasing
    assert claim(store, task_id="t2", owner="o2").fence > first.fence
    assert store.discard(REF, owner="o2")
    now[0] -= 1_000_000  # stepped back by more than the time since the last claim
    assert claim(store, task_id="t3", owner="o3").fence < first.fence
