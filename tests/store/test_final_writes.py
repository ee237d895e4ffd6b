"""The Redis store's final writes (complete.lua, fail.lua) on the hot path of every task: they
read the whole record (HGETALL) only when its marker (records.F_EXTRAS) says it holds recorded
steps or parked duplicates, and they keep the marker true: set by whatever adds such a field,
kept while one is left, cleared by the final write that leaves none. Counted with the server's
own per-command statistics, which include the commands a script calls.

Redis only: the memory store keeps no marker (a dict is read without a round trip); the
behaviour both share (steps dropped, parked duplicates handed back) is in test_steps.py and
test_parking.py, on every store."""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterator
from typing import Any

import pytest

from celery_idempotency import KeyState, RedisKeyStore, open_store
from celery_idempotency.records import F_EXTRAS, park_field, step_field
from celery_idempotency.store import ClaimStatus, ParkedDuplicate
from tests.support.records import DAY_MS, PENDING_MS, REF, RESULT, read_raw, write_raw

PARK = b'{"task": "tasks.charge", "options": {}}'
ERROR = '{"type": "E", "message": "no"}'


@pytest.fixture
def store(redis_server: Any) -> Iterator[RedisKeyStore]:
    opened = open_store(redis_server.url(3), prefix="fw:")
    assert isinstance(opened, RedisKeyStore)
    opened.client.flushdb()
    yield opened
    opened.client.flushdb()
    opened.close()


def reserve(store: RedisKeyStore, task_id: str = "t1") -> None:
    store.reserve(REF, task_id=task_id, fingerprint="fp1", task_name="tasks.charge",
                  ttl_ms=DAY_MS, pending_ms=PENDING_MS)


def claim(store: RedisKeyStore, task_id: str = "t1", owner: str = "o1",
          park: bytes | None = None) -> Any:
    return store.claim(REF, task_id=task_id, owner=owner, fingerprint="fp1",
                       task_name="tasks.charge", lease_ms=60_000, ttl_ms=DAY_MS, park=park)


def complete(store: RedisKeyStore, owner: str, fence: int) -> list[ParkedDuplicate]:
    return store.complete(REF, owner=owner, fence=fence, result=RESULT, ttl_ms=DAY_MS)


def save_step(store: RedisKeyStore, owner: str, fence: int, name: str = "charge") -> None:
    store.save_step(REF, owner=owner, fence=fence, name=name, value=b"\0\0{}")


def whole_record_reads(store: RedisKeyStore) -> int:
    """HGETALL calls since the last reset, scripts' own calls included."""
    stats = store.client.info("commandstats").get("cmdstat_hgetall")
    return int(stats["calls"]) if stats else 0


def fields(store: RedisKeyStore) -> set[str]:
    return set(read_raw(store, REF))


def test_a_task_without_steps_or_parked_duplicates_never_reads_its_whole_record(
        store: RedisKeyStore) -> None:
    reserve(store)
    fence = claim(store).fence
    store.client.config_resetstat()
    assert complete(store, "o1", fence) == []
    assert complete(store, "o1", fence) == []  # our own write, retried
    reserve(store, "t2")  # a duplicate publish, answered from the record
    claim(store, "t3", "o3")  # a duplicate message, replayed from the record
    assert whole_record_reads(store) == 2  # the two duplicates' replies: the whole record
    store.client.config_resetstat()
    store.client.delete(store.store_key(REF))
    reserve(store)
    fence = claim(store).fence
    store.fail(REF, owner="o1", error=ERROR, retryable=False, ttl_ms=DAY_MS)
    assert whole_record_reads(store) == 0
    assert F_EXTRAS not in fields(store)


def test_a_recorded_step_marks_the_record_and_success_drops_steps_and_marker(
        store: RedisKeyStore) -> None:
    reserve(store)
    fence = claim(store).fence
    assert F_EXTRAS not in fields(store)
    save_step(store, "o1", fence)
    save_step(store, "o1", fence, "receipt")
    assert {F_EXTRAS, step_field("charge"), step_field("receipt")} <= fields(store)
    store.client.config_resetstat()
    assert complete(store, "o1", fence) == []
    assert whole_record_reads(store) == 1
    assert not fields(store) & {F_EXTRAS, step_field("charge"), step_field("receipt")}
    record = store.get(REF)
    assert record is not None and record.state is KeyState.SUCCEEDED and record.steps == ()


def test_a_retryable_failure_keeps_steps_and_marker_through_the_next_reservation(
        store: RedisKeyStore) -> None:
    reserve(store)
    fence = claim(store).fence
    save_step(store, "o1", fence)
    store.fail(REF, owner="o1", error=ERROR, retryable=True, ttl_ms=DAY_MS)
    assert {F_EXTRAS, step_field("charge")} <= fields(store)
    reserve(store, "t2")  # a new run: every own field replaced, the steps and marker kept
    assert {F_EXTRAS, step_field("charge")} <= fields(store)
    fence = claim(store, "t2", "o2").fence
    store.fail(REF, owner="o2", error=ERROR, retryable=False, ttl_ms=DAY_MS)
    assert not fields(store) & {F_EXTRAS, step_field("charge")}
    assert store.get(REF).steps == ()  # type: ignore[union-attr]


def test_a_parked_duplicate_keeps_the_marker_until_a_final_write_finds_none(
        store: RedisKeyStore) -> None:
    reserve(store)
    fence = claim(store).fence
    busy = claim(store, "d1", "o2", park=PARK)
    assert busy.status is ClaimStatus.BUSY and busy.parked
    assert {F_EXTRAS, park_field("d1")} <= fields(store)
    assert complete(store, "o1", fence) == [ParkedDuplicate("d1", PARK)]
    # Still parked (its copy has not replayed yet): the marker stays, and a retried write
    # hands it back again.
    assert {F_EXTRAS, park_field("d1")} <= fields(store)
    assert complete(store, "o1", fence) == [ParkedDuplicate("d1", PARK)]
    assert claim(store, "d1", "o2").status is ClaimStatus.SUCCEEDED
    assert park_field("d1") not in fields(store)


def test_the_marker_outlives_its_last_parked_duplicate_until_the_next_final_write(
        store: RedisKeyStore) -> None:
    reserve(store)
    fence = claim(store).fence
    claim(store, "d1", "o2", park=PARK)
    store.fail(REF, owner="o1", error=ERROR, retryable=True, ttl_ms=DAY_MS)
    # The woken duplicate runs the task again (a retryable failure): its claim removes its
    # parked field, but does not look for others, so the marker stays...
    fence = claim(store, "d1", "o2").fence
    assert park_field("d1") not in fields(store) and F_EXTRAS in fields(store)
    # ... and its final write reads the record once, finds nothing, and clears it.
    store.client.config_resetstat()
    assert complete(store, "o2", fence) == []
    assert whole_record_reads(store) == 1
    assert F_EXTRAS not in fields(store)


def test_a_record_whose_marker_was_removed_by_hand_still_completes_once(
        store: RedisKeyStore) -> None:
    reserve(store)
    fence = claim(store).fence
    save_step(store, "o1", fence)
    claim(store, "d1", "o2", park=PARK)
    store.client.hdel(store.store_key(REF), F_EXTRAS)
    # Nothing handed back and the step left in place (bytes until the record expires): the
    # parked duplicate's own countdown copy replays the outcome, and a succeeded key never
    # runs again, so its steps are never read.
    assert complete(store, "o1", fence) == []
    record = store.get(REF)
    assert record is not None and record.state is KeyState.SUCCEEDED
    assert record.result == RESULT.data and record.steps == ("charge",)
    assert claim(store, "d1", "o2").status is ClaimStatus.SUCCEEDED


def test_a_marker_added_by_hand_to_a_plain_record_is_read_once_and_cleared(
        store: RedisKeyStore) -> None:
    reserve(store)
    fence = claim(store).fence
    write_raw(store, REF, {F_EXTRAS: b"1"})
    assert complete(store, "o1", fence) == []
    assert F_EXTRAS not in fields(store)
    record = store.get(REF)
    assert record is not None and record.state is KeyState.SUCCEEDED


def test_the_lua_marker_is_records_marker() -> None:
    common = importlib.resources.files("celery_idempotency.store").joinpath(
        "lua", "_common.lua").read_text()
    assert re.findall(r"local EXTRAS = '([^']*)'", common) == [F_EXTRAS]
