"""Records for tests: the suite's sample record (one key, its TTL, a stored result), and raw
hash fields written directly, bypassing the store's scripts (damaged, foreign or hand-made
records)."""

from __future__ import annotations

from celery_idempotency import KeyStore, MemoryKeyStore, RecordRef, RedisKeyStore
from celery_idempotency.store import ResultPayload

#: The sample key: scope ``tasks.charge`` (also the task's name), key ``order-42``.
REF = RecordRef("tasks.charge", "order-42")
DAY_MS = 24 * 3600 * 1000
#: A reservation's deadline, as `idempotency_pending_timeout`'s default (600 s).
PENDING_MS = 600_000
#: A small stored JSON result.
RESULT = ResultPayload(b'{"ok":true}', "application/json", "utf-8", "stored")


def write_raw(store: KeyStore, ref: RecordRef, fields: dict[str, bytes]) -> None:
    if isinstance(store, MemoryKeyStore):
        store.put_raw(ref, fields)
    else:
        assert isinstance(store, RedisKeyStore)
        store.client.hset(store.store_key(ref), mapping=fields)


def read_raw(store: KeyStore, ref: RecordRef) -> dict[str, bytes]:
    """The record's fields as stored (names decoded), bypassing the decoder."""
    name = store.store_key(ref)
    if isinstance(store, MemoryKeyStore):
        return dict(store._records.get(name, {}))
    assert isinstance(store, RedisKeyStore)
    return {field.decode(): value for field, value in store.client.hgetall(name).items()}


def take_claim_away(store: KeyStore, ref: RecordRef) -> None:
    """What an operator's release followed by another task's claim does to a running task: the
    record is deleted and claimed by ``other``, so the running task's next write is refused."""
    record = store.get(ref)
    assert record is not None and store.delete_if_unchanged(record)
    store.claim(ref, task_id="other", owner="other-owner", fingerprint="fp",
                task_name=ref.scope, lease_ms=60_000, ttl_ms=60_000)
