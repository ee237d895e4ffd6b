"""Raw records for tests: write a record's hash fields directly, bypassing the store's scripts
(damaged, foreign or hand-made records)."""

from __future__ import annotations

from celery_idempotency import KeyStore, MemoryKeyStore, RecordRef, RedisKeyStore


def write_raw(store: KeyStore, ref: RecordRef, fields: dict[str, bytes]) -> None:
    if isinstance(store, MemoryKeyStore):
        store.put_raw(ref, fields)
    else:
        assert isinstance(store, RedisKeyStore)
        store.client.hset(store.store_key(ref), mapping=fields)
