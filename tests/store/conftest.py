from __future__ import annotations

from collections.abc import Iterator

import pytest

from celery_idempotency import KeyStore, MemoryKeyStore, RedisKeyStore, open_store


@pytest.fixture(params=["memory", "redis", "sentinel", "cluster"])
def store(request: pytest.FixtureRequest) -> Iterator[KeyStore]:
    """Every contract test runs against every store: the same semantics, or a failing test.
    Redis is reached directly, through a Sentinel, and as a three-primary Cluster."""
    if request.param == "memory":
        yield MemoryKeyStore(prefix="t:")
        return
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url(1)
    elif request.param == "sentinel":
        url = request.getfixturevalue("redis_sentinel").url(2)
    else:
        url = request.getfixturevalue("redis_cluster").url()
    store = open_store(url, prefix="t:")
    assert isinstance(store, RedisKeyStore)
    store.client.flushdb()
    yield store
    store.client.flushdb()
    store.close()
