from __future__ import annotations

from collections.abc import Iterator

import pytest

from celery_idempotency import KeyStore, MemoryKeyStore, RedisKeyStore
from tests.support.services import RedisServer

_db_counter = iter(range(1, 16))


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[KeyStore]:
    """Every contract test runs against both stores: the same semantics, or a failing test."""
    if request.param == "memory":
        yield MemoryKeyStore(prefix="t:")
        return
    client = redis_server.client(db=1)
    client.flushdb()
    store = RedisKeyStore(client, prefix="t:")
    yield store
    client.flushdb()
    store.close()
