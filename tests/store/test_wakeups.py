"""Waiting without polling: a store's `watch` wakes on the writes a waiter must notice (an
outcome, a release, a deletion), for every store; `IdempotentResult.get()` returns on them,
also across a restart of the store and under an ACL without pub/sub (then by polling).

A watch that is not `live` never reports a wake-up (it only sleeps), so ``wait(...) is True``
shows a notification arrived, not that a poll happened to see the change."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from redis.cluster import RedisCluster as ClusterClient

from celery_idempotency import KeyStore, MemoryKeyStore, RecordRef, RedisKeyStore
from celery_idempotency.leases import owner_prefix
from celery_idempotency.result import IdempotentResult, accept_for
from celery_idempotency.store import ResultPayload
from celery_idempotency.store.errors import REQUIRED_COMMANDS, WAKEUP_COMMANDS
from celery_idempotency.store.wakeups import wake_channel
from tests.support.services import RedisServer, wait_until

REF = RecordRef("tasks.charge", "order-42")
OTHER = RecordRef("tasks.charge", "order-43")
DAY_MS = 24 * 3600 * 1000
RESULT = ResultPayload(b'{"ok": true}', "application/json", "utf-8", "stored")
ERROR = '{"type": "builtins.ValueError", "message": "declined"}'
OWNER = owner_prefix(4242) + "abcd"
PREFIX = "t:"
# Long enough never to be what ends a wait that should be woken.
WAKE_TIMEOUT = 30.0


def _claim(store: KeyStore, ref: RecordRef = REF, owner: str = OWNER) -> None:
    store.claim(ref, task_id="t1", owner=owner, fingerprint="fp1", task_name="tasks.charge",
                lease_ms=60_000, ttl_ms=DAY_MS)


def _complete(store: KeyStore, ref: RecordRef = REF, owner: str = OWNER) -> None:
    """Complete under the fence of the claim `_claim` made."""
    record = store.get(ref)
    assert record is not None
    store.complete(ref, owner=owner, fence=record.fence, result=RESULT, ttl_ms=DAY_MS)


def _delete_as_operator(store: KeyStore) -> None:
    record = store.get(REF)
    assert record is not None
    assert store.delete_if_unchanged(record)


WAKING_WRITES: dict[str, Callable[[KeyStore], Any]] = {
    "complete": _complete,
    "fail": lambda s: s.fail(REF, owner=OWNER, error=ERROR, retryable=False, ttl_ms=DAY_MS),
    "discard": lambda s: s.discard(REF, owner=OWNER),
    "abandon": lambda s: s.abandon(REF, task_id="t1", owner_prefix=owner_prefix(4242),
                                   requeued=False, error=ERROR, ttl_ms=DAY_MS,
                                   pending_ms=60_000),
    "operator delete": _delete_as_operator,
}


def _is_cluster(store: KeyStore) -> bool:
    return isinstance(store, RedisKeyStore) and isinstance(store.client, ClusterClient)


@pytest.mark.parametrize("write", list(WAKING_WRITES))
def test_a_final_write_or_a_deletion_wakes_the_watch(store: KeyStore, write: str) -> None:
    _claim(store)
    with store.watch(REF) as watch:
        if _is_cluster(store):
            # Documented: no notifications on a Cluster; the waiter polls.
            assert not watch.live and watch.wait(0.01) is False
            return
        assert watch.live
        WAKING_WRITES[write](store)
        assert watch.wait(WAKE_TIMEOUT) is True


def test_a_write_to_another_key_does_not_wake_the_watch(store: KeyStore) -> None:
    if _is_cluster(store):
        pytest.skip("no notifications on a Cluster")
    _claim(store)
    _claim(store, OTHER)
    with store.watch(REF) as watch:
        _complete(store, OTHER)
        assert watch.wait(0.3) is False
        _complete(store)
        assert watch.wait(WAKE_TIMEOUT) is True


def _handle(store: KeyStore, ref: RecordRef = REF) -> IdempotentResult:
    """A result handle without a result backend: it reads the key store."""
    return IdempotentResult("t1", store=store, ref=ref, accept=accept_for("json"),
                            duplicate=True, app=Celery("wakeups", set_as_current=False))


class Waiter:
    """``handle.get()`` in a thread; ``outcome()`` is what it returned or raised."""

    def __init__(self, handle: IdempotentResult, timeout: float = 60.0) -> None:
        self.box: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, args=(handle, timeout), daemon=True)
        self.thread.start()

    def _run(self, handle: IdempotentResult, timeout: float) -> None:
        try:
            self.box["value"] = handle.get(timeout=timeout)
        except BaseException as exc:
            self.box["error"] = exc

    def outcome(self) -> Any:
        self.thread.join(90)
        assert not self.thread.is_alive(), "get() did not return"
        if "error" in self.box:
            raise self.box["error"]
        return self.box["value"]


def _subscribers(client: Any, ref: RecordRef) -> int:
    channel = wake_channel(ref.store_key(PREFIX))
    reply = client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1])


@pytest.mark.parametrize("outcome", ["success", "failure"])
def test_get_returns_the_outcome_written_while_it_waits(store: KeyStore, outcome: str) -> None:
    _claim(store)
    waiters = [Waiter(_handle(store)) for _ in range(5)]
    if isinstance(store, RedisKeyStore) and not _is_cluster(store):
        # Subscribed before the outcome is written: the wake-up, not the first read, ends it.
        wait_until(lambda: _subscribers(store.client, REF) == 1,
                   "the waiters to subscribe (one shared subscription)")
    if outcome == "success":
        _complete(store)
        assert [w.outcome() for w in waiters] == [{"ok": True}] * 5
    else:
        store.fail(REF, owner=OWNER, error=ERROR, retryable=False, ttl_ms=DAY_MS)
        for waiter in waiters:
            with pytest.raises(Exception, match="declined"):
                waiter.outcome()


def test_get_keeps_waiting_after_a_deletion_and_returns_the_next_outcome(
        store: KeyStore) -> None:
    """A released key has no outcome: the handle re-reads, keeps waiting, and returns the
    outcome of whichever task runs the key next (the key's outcome, as documented)."""
    _claim(store)
    waiter = Waiter(_handle(store))
    store.discard(REF, owner=OWNER)
    assert waiter.thread.is_alive()
    _claim(store, owner=OWNER + "2")
    _complete(store, owner=OWNER + "2")
    assert waiter.outcome() == {"ok": True}


def test_many_watches_share_one_subscriber_connection(redis_server: RedisServer) -> None:
    store = RedisKeyStore.from_url(redis_server.url(3), prefix=PREFIX)
    admin = redis_server.client()

    def pubsub_clients() -> int:
        return len(admin.client_list(_type="pubsub"))

    before = pubsub_clients()
    refs = [RecordRef("tasks.charge", f"order-{i}") for i in range(20)]
    watches = [store.watch(ref) for ref in refs for _ in range(5)]
    try:
        assert all(w.live for w in watches)
        assert pubsub_clients() == before + 1
    finally:
        for watch in watches:
            watch.close()
        store.close()


def test_the_memory_store_forgets_a_key_nobody_watches() -> None:
    store = MemoryKeyStore(prefix=PREFIX)
    _claim(store)
    with store.watch(REF) as watch:
        _complete(store)
        assert watch.wait(WAKE_TIMEOUT) is True
    assert store._watched == {}, "no bookkeeping left for unwatched keys"


# -- a store restarted while handles wait -----------------------------------------------------

def test_waiters_get_the_outcome_written_after_the_store_restarted(
        own_redis: RedisServer) -> None:
    """The subscriber connection dies with the server; the handles poll meanwhile (their reads
    fail: waited out), the subscription comes back, and the outcome written after the restart
    reaches every handle."""
    store = RedisKeyStore.from_url(own_redis.url(), prefix=PREFIX, timeout=0.5)
    try:
        _claim(store)
        waiters = [Waiter(_handle(store)) for _ in range(3)]
        wait_until(lambda: _subscribers(own_redis.client(), REF) == 1, "the waiters to subscribe")
        own_redis.restart(keep_data=True)
        wait_until(lambda: _subscribers(own_redis.client(), REF) == 1,
                   "the subscription to come back after the restart")
        assert all(w.thread.is_alive() for w in waiters), "still waiting: no outcome yet"
        _complete(store)
        assert [w.outcome() for w in waiters] == [{"ok": True}] * 3
    finally:
        store.close()


def test_an_outcome_written_while_the_subscription_is_down_is_not_missed(
        own_redis: RedisServer) -> None:
    """The server restarts and the outcome is written before the waker re-subscribed: the
    handles, polling meanwhile, or woken by the re-subscription, still see it."""
    store = RedisKeyStore.from_url(own_redis.url(), prefix=PREFIX, timeout=0.5)
    writer = RedisKeyStore.from_url(own_redis.url(), prefix=PREFIX)
    try:
        _claim(store)
        waiter = Waiter(_handle(store))
        wait_until(lambda: _subscribers(own_redis.client(), REF) == 1, "the waiter to subscribe")
        own_redis.restart(keep_data=True)
        _complete(writer)
        assert waiter.outcome() == {"ok": True}
    finally:
        writer.close()
        store.close()


# -- ACLs -------------------------------------------------------------------------------------

@pytest.fixture
def acl_server(own_redis: RedisServer) -> RedisServer:
    return own_redis


def _store_as(server: RedisServer, user: str, commands: list[str],
              channels: list[str]) -> RedisKeyStore:
    server.client().acl_setuser(user, enabled=True, passwords=["+pw"], keys=[f"{PREFIX}*"],
                                channels=channels, commands=commands)
    return RedisKeyStore.from_url(f"redis://{user}:pw@127.0.0.1:{server.port}/0", prefix=PREFIX)


def _acl(names: tuple[str, ...]) -> list[str]:
    return ["+" + c.lower().replace(" ", "|") for c in names]


def test_without_pubsub_permissions_writes_work_and_waiters_poll(
        acl_server: RedisServer) -> None:
    """The documented required ACL only: the scripts' PUBLISH is refused (and ignored), the
    subscription is refused, and a waiting handle still gets the outcome, by polling."""
    store = _store_as(acl_server, "idem", _acl(REQUIRED_COMMANDS), channels=[])
    try:
        _claim(store)
        waiter = Waiter(_handle(store))
        with store.watch(REF) as watch:
            wait_until(lambda: store._waker is not None and store._waker.forbidden,
                       "the subscription to be refused")
            assert not watch.live
        _complete(store)
        assert waiter.outcome() == {"ok": True}
        with store.watch(REF) as later:
            assert not later.live, "a refused store is not asked again"
    finally:
        store.close()


def test_the_optional_pubsub_permissions_are_enough_to_wake_waiters(
        acl_server: RedisServer) -> None:
    store = _store_as(acl_server, "idem", _acl(REQUIRED_COMMANDS + WAKEUP_COMMANDS),
                      channels=[f"{PREFIX}*"])
    try:
        _claim(store)
        with store.watch(REF) as watch:
            assert watch.live
            _complete(store)
            assert watch.wait(WAKE_TIMEOUT) is True
    finally:
        store.close()


@pytest.fixture
def redis_store(redis_server: RedisServer) -> Iterator[RedisKeyStore]:
    store = RedisKeyStore.from_url(redis_server.url(4), prefix=PREFIX)
    store.client.flushdb()
    yield store
    store.close()


def test_a_closed_store_hands_out_polling_watches(redis_store: RedisKeyStore) -> None:
    redis_store.close()
    with redis_store.watch(REF) as watch:
        assert not watch.live


def test_watches_of_one_key_share_one_read_per_wake_up(redis_store: RedisKeyStore) -> None:
    _claim(redis_store)
    watches = [redis_store.watch(REF) for _ in range(10)]
    reads: list[int] = []

    def fetch() -> Any:
        reads.append(1)
        return redis_store.get(REF)

    try:
        _complete(redis_store)
        assert all(watch.wait(WAKE_TIMEOUT) for watch in watches)
        records = [watch.read(fetch) for watch in watches]
        assert len(reads) == 1
        assert all(r is not None and r.state.value == "succeeded" for r in records)
    finally:
        for watch in watches:
            watch.close()
