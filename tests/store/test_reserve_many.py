"""`KeyStore.reserve_many` and `unreserve_many`: a batch of reservations answered as `reserve`
would answer each, in order, with per-request errors, on every store (memory, Redis direct,
through a Sentinel, as a Cluster); and, on Redis, in one round trip."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_idempotency import (
    CorruptRecord,
    IdempotencyKeyMismatch,
    KeyState,
    KeyStore,
    RecordRef,
    RedisKeyStore,
    StoreUnavailable,
)
from celery_idempotency.store import Reservation, ReserveRequest, ReserveStatus, ResultPayload
from tests.support.counting import counting_round_trips
from tests.support.records import write_raw
from tests.support.services import RedisServer, free_port

DAY_MS = 24 * 3600 * 1000
RESULT = ResultPayload(b'{"ok":true}', "application/json", "utf-8", "stored")


def request(key: str, task_id: str, fp: str = "fp1", scope: str = "tasks.charge",
            pending_ms: int = 600_000) -> ReserveRequest:
    return ReserveRequest(RecordRef(scope, key), task_id=task_id, fingerprint=fp,
                          task_name="tasks.charge", ttl_ms=DAY_MS, pending_ms=pending_ms)


def reservation(outcome: Any) -> Reservation:
    assert isinstance(outcome, Reservation), f"expected a reservation, got {outcome!r}"
    return outcome


def test_empty_batch_answers_nothing(store: KeyStore) -> None:
    assert store.reserve_many([]) == []
    assert store.unreserve_many([]) == []


def test_new_keys_are_each_reserved_pending_for_their_task(store: KeyStore) -> None:
    requests = [request(f"order-{n}", f"t{n}") for n in range(20)]
    outcomes = store.reserve_many(requests)
    assert [reservation(o).status for o in outcomes] == [ReserveStatus.RESERVED] * 20
    for req in requests:
        record = store.get(req.ref)
        assert record is not None
        assert (record.state, record.task_id, record.fingerprint, record.key) == (
            KeyState.PENDING, req.task_id, "fp1", req.ref.key)


def test_a_key_twice_in_one_batch_is_reserved_then_a_duplicate_of_the_first(
        store: KeyStore) -> None:
    outcomes = store.reserve_many([request("a", "t1"), request("b", "t2"), request("a", "t3")])
    first, other, again = (reservation(o) for o in outcomes)
    assert first.status is ReserveStatus.RESERVED and other.status is ReserveStatus.RESERVED
    assert again.status is ReserveStatus.DUPLICATE
    assert again.record is not None and again.record.task_id == "t1"


def test_batch_answers_exactly_as_reserve_would_for_each_existing_state(
        store: KeyStore) -> None:
    """The same decisions as `reserve`: done and pending keys are duplicates, a stale claim
    is STALE, a retryable failure is reserved anew, the same task's retry is RESERVED."""
    store.reserve(RecordRef("tasks.charge", "done"), task_id="d", fingerprint="fp1",
                  task_name="tasks.charge", ttl_ms=DAY_MS)
    done = store.claim(RecordRef("tasks.charge", "done"), task_id="d", owner="o",
                       fingerprint="fp1", task_name="tasks.charge", lease_ms=60_000,
                       ttl_ms=DAY_MS)
    store.complete(RecordRef("tasks.charge", "done"), owner="o", fence=done.fence, result=RESULT,
                   ttl_ms=DAY_MS)
    store.reserve(RecordRef("tasks.charge", "stale"), task_id="s", fingerprint="fp1",
                  task_name="tasks.charge", ttl_ms=DAY_MS)
    store.claim(RecordRef("tasks.charge", "stale"), task_id="s", owner="o", fingerprint="fp1",
                task_name="tasks.charge", lease_ms=1, ttl_ms=DAY_MS)
    store.reserve(RecordRef("tasks.charge", "failed"), task_id="f", fingerprint="fp1",
                  task_name="tasks.charge", ttl_ms=DAY_MS)
    store.claim(RecordRef("tasks.charge", "failed"), task_id="f", owner="o", fingerprint="fp1",
                task_name="tasks.charge", lease_ms=60_000, ttl_ms=DAY_MS)
    store.fail(RecordRef("tasks.charge", "failed"), owner="o", error='{"type":"E"}',
               retryable=True, ttl_ms=DAY_MS)
    store.reserve(RecordRef("tasks.charge", "mine"), task_id="m", fingerprint="fp1",
                  task_name="tasks.charge", ttl_ms=DAY_MS)
    time.sleep(0.01)  # the 1 ms lease of "stale" has run out

    done, stale, failed, mine = (reservation(o) for o in store.reserve_many([
        request("done", "n1"), request("stale", "n2"), request("failed", "n3"),
        request("mine", "m")]))

    assert done.status is ReserveStatus.DUPLICATE and done.record is not None
    assert (done.record.task_id, done.record.state) == ("d", KeyState.SUCCEEDED)
    assert stale.status is ReserveStatus.STALE
    assert failed.status is ReserveStatus.RESERVED
    assert mine.status is ReserveStatus.RESERVED  # a retried batch finds its own reservation
    record = store.get(RecordRef("tasks.charge", "failed"))
    assert record is not None and (record.state, record.task_id) == (KeyState.PENDING, "n3")


def test_errors_are_the_requests_own_and_the_others_are_reserved(store: KeyStore) -> None:
    store.reserve(RecordRef("tasks.charge", "taken"), task_id="t0", fingerprint="fp-other",
                  task_name="tasks.charge", ttl_ms=DAY_MS)
    write_raw(store, RecordRef("tasks.charge", "broken"),
              {"k": b"broken", "s": b"tasks.charge", "st": b"exploded", "t": b"t9",
               "fp": b"fp1"})

    before, mismatch, corrupt, after = store.reserve_many([
        request("before", "t1"), request("taken", "t2"), request("broken", "t3"),
        request("after", "t4")])

    assert isinstance(mismatch, IdempotencyKeyMismatch)
    assert (mismatch.key, mismatch.task_id) == ("taken", "t0")
    assert isinstance(corrupt, CorruptRecord) and "exploded" in str(corrupt)
    assert reservation(before).status is ReserveStatus.RESERVED
    assert reservation(after).status is ReserveStatus.RESERVED
    taken = store.get(RecordRef("tasks.charge", "taken"))
    assert taken is not None and taken.task_id == "t0"  # the mismatch changed nothing


def test_unreserve_many_deletes_only_our_own_pending_reservations(store: KeyStore) -> None:
    store.reserve_many([request("a", "t1"), request("b", "t2"), request("c", "t3")])
    claimed = RecordRef("tasks.charge", "c")
    store.claim(claimed, task_id="t3", owner="o", fingerprint="fp1", task_name="tasks.charge",
                lease_ms=60_000, ttl_ms=DAY_MS)

    undone = store.unreserve_many([(RecordRef("tasks.charge", "a"), "t1"),
                                   (RecordRef("tasks.charge", "b"), "someone-else"),
                                   (claimed, "t3")])

    assert undone == [True, False, False]
    assert store.get(RecordRef("tasks.charge", "a")) is None
    assert store.get(RecordRef("tasks.charge", "b")) is not None
    record = store.get(claimed)
    assert record is not None and record.state is KeyState.STARTED


# -- Redis: one round trip, and what the round trip meets -----------------------------------

def test_batch_after_the_server_lost_its_scripts(store: KeyStore) -> None:
    """A restart or SCRIPT FLUSH empties the script cache (of every node of a Cluster): the
    batch's EVALSHAs are answered NOSCRIPT without running; they are sent again once the
    script is loaded."""
    if not isinstance(store, RedisKeyStore):
        pytest.skip("Redis only: the memory store has no script cache")
    store.reserve_many([request("warm-up", "w")])
    store.client.script_flush()
    keys = [f"order-{n}" for n in range(30)]  # spread over the nodes of a Cluster

    outcomes = store.reserve_many([request(key, f"t-{key}") for key in keys]
                                  + [request(key, f"again-{key}") for key in keys[:3]])

    assert [reservation(o).status for o in outcomes] == (
        [ReserveStatus.RESERVED] * 30 + [ReserveStatus.DUPLICATE] * 3)
    assert [reservation(o).record.task_id for o in outcomes[30:]] == [  # type: ignore[union-attr]
        f"t-{key}" for key in keys[:3]]


@pytest.fixture
def counted(redis_server: RedisServer) -> Iterator[tuple[RedisKeyStore, redis.Redis]]:
    client = redis_server.client(3)
    client.flushdb()
    yield RedisKeyStore(client, prefix="t:"), redis_server.client(3)
    client.flushdb()
    client.close()


def _evalsha_calls(admin: redis.Redis) -> int:
    stats = admin.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_redis_answers_a_batch_in_one_round_trip(
        counted: tuple[RedisKeyStore, redis.Redis]) -> None:
    store, admin = counted
    store.reserve(RecordRef("tasks.charge", "warm-up"), task_id="w", fingerprint="fp1",
                  task_name="tasks.charge", ttl_ms=DAY_MS)  # connected, script loaded
    requests = [request(f"order-{n % 700}", f"t{n}") for n in range(1000)]  # 300 duplicates
    calls = _evalsha_calls(admin)

    with counting_round_trips(store.client) as round_trips:
        outcomes = store.reserve_many(requests)

    assert round_trips.count == 1
    assert _evalsha_calls(admin) - calls == 1000  # every request ran the script, as EVALSHA
    statuses = [reservation(o).status for o in outcomes]
    assert statuses.count(ReserveStatus.RESERVED) == 700
    assert statuses.count(ReserveStatus.DUPLICATE) == 300


def test_redis_error_reply_is_each_requests_store_unavailable(own_redis: RedisServer) -> None:
    """maxmemory with noeviction: every reservation in the batch is refused (OOM), a "not
    now" reply, each request's `StoreUnavailable`, exactly as `reserve` raises it."""
    store = RedisKeyStore.from_url(own_redis.url(), prefix="t:")
    admin = own_redis.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    try:
        outcomes = store.reserve_many([request("a", "t1"), request("b", "t2")])
    finally:
        admin.config_set("maxmemory", 0)
    assert all(isinstance(o, StoreUnavailable) and "OOM" in str(o) for o in outcomes)
    assert admin.dbsize() == 0
    store.close()


def test_unreachable_redis_fails_the_whole_batch() -> None:
    store = RedisKeyStore.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix="t:",
                                   timeout=0.5)
    with pytest.raises(StoreUnavailable):
        store.reserve_many([request("a", "t1")])
    with pytest.raises(StoreUnavailable):
        store.unreserve_many([(RecordRef("tasks.charge", "a"), "t1")])
    store.close()
