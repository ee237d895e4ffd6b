"""Races: many threads on one key, against both stores. Exactly one may win."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from celery_idempotency import KeyState, KeyStore, RecordRef, RedisKeyStore, open_store
from celery_idempotency.store import ClaimStatus, ReserveStatus

THREADS = 32
REF = RecordRef("race", "one-key")


def run_at_once(action: Callable[[int], Any]) -> list[Any]:
    barrier = threading.Barrier(THREADS)
    results: list[Any] = [None] * THREADS

    def target(index: int) -> None:
        barrier.wait()
        results[index] = action(index)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_32_threads_reserving_one_key_give_one_reservation(store: KeyStore) -> None:
    outcomes = run_at_once(lambda i: store.reserve(
        REF, task_id=f"t{i}", fingerprint="fp", task_name="race", ttl_ms=60_000))
    counts = Counter(outcome.status for outcome in outcomes)
    assert counts == {ReserveStatus.RESERVED: 1, ReserveStatus.DUPLICATE: THREADS - 1}
    winner = next(i for i, o in enumerate(outcomes) if o.status is ReserveStatus.RESERVED)
    assert {o.record.task_id for o in outcomes if o.record} == {f"t{winner}"}


def test_32_threads_claiming_one_record_give_one_owner(store: KeyStore) -> None:
    store.reserve(REF, task_id="t", fingerprint="fp", task_name="race", ttl_ms=60_000)
    outcomes = run_at_once(lambda i: store.claim(
        REF, task_id="t", owner=f"o{i}", fingerprint="fp", task_name="race", lease_ms=60_000,
        ttl_ms=60_000))
    counts = Counter(outcome.status for outcome in outcomes)
    assert counts == {ClaimStatus.CLAIMED: 1, ClaimStatus.BUSY: THREADS - 1}
    winner = next(i for i, o in enumerate(outcomes) if o.status is ClaimStatus.CLAIMED)
    record = store.get(REF)
    assert record is not None
    assert (record.state, record.owner, record.fence) == (KeyState.STARTED, f"o{winner}",
                                                          outcomes[winner].fence)


def test_32_threads_taking_over_one_expired_lease_give_one_new_owner(store: KeyStore) -> None:
    dead = store.claim(REF, task_id="t", owner="dead", fingerprint="fp", task_name="race",
                       lease_ms=1, ttl_ms=60_000)
    threading.Event().wait(0.05)
    outcomes = run_at_once(lambda i: store.claim(
        REF, task_id=f"t{i}", owner=f"o{i}", fingerprint="fp", task_name="race",
        lease_ms=60_000, ttl_ms=60_000))
    counts = Counter(outcome.status for outcome in outcomes)
    assert counts == {ClaimStatus.TAKEN_OVER: 1, ClaimStatus.BUSY: THREADS - 1}
    [winner] = [o for o in outcomes if o.status is ClaimStatus.TAKEN_OVER]
    assert store.get(REF).fence == winner.fence > dead.fence  # type: ignore[union-attr]


def _check_out(pool: Any) -> Any:
    try:
        return pool.get_connection()
    except TypeError:  # redis-py 5: the command name is a required argument
        return pool.get_connection("PING")


@pytest.mark.parametrize("kind", ["redis", "sentinel"])
def test_more_than_100_callers_at_once_each_get_a_connection(
        kind: str, request: pytest.FixtureRequest) -> None:
    # redis-py >= 6 caps a pool at 100 connections by default: the 101st caller at once (a
    # thread or gevent pool above 100) got "Too many connections", i.e. StoreUnavailable.
    server = request.getfixturevalue("redis_server" if kind == "redis" else "redis_sentinel")
    store = open_store(server.url(1), prefix="t:")
    assert isinstance(store, RedisKeyStore)
    pool = store.client.connection_pool
    held = [_check_out(pool) for _ in range(150)]
    try:
        assert len({id(connection) for connection in held}) == 150
        for connection in held[:3] + held[-3:]:
            connection.send_command("PING")
            assert connection.read_response() in (b"PONG", "PONG", True)
    finally:
        for connection in held:
            pool.release(connection)
        store.close()
