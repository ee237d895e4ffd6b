from __future__ import annotations

import pytest

from celery_idempotency import (
    ConfigurationError,
    MemoryKeyStore,
    RedisKeyStore,
    StoreUnavailable,
    open_store,
)
from tests.support.services import free_port


@pytest.mark.parametrize(("url", "message"), [
    ("http://127.0.0.1:6379", "unsupported idempotency store URL scheme 'http'"),
    ("redis+sentinel://127.0.0.1:26379", "service_name"),
    ("redis+sentinel://127.0.0.1:26379/master/x", "service_name"),
    ("redis+sentinel://127.0.0.1/master", "host:port"),
    ("redis+cluster://127.0.0.1:7000/3", "no database number"),
    ("redis+cluster://127.0.0.1:7000,nohost", "host:port"),
])
def test_unusable_urls_are_configuration_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        open_store(url)


def test_url_schemes_give_the_right_stores_without_connecting() -> None:
    assert isinstance(open_store("memory://"), MemoryKeyStore)
    single = open_store("redis://127.0.0.1:1/0", prefix="p:")
    assert isinstance(single, RedisKeyStore) and single.prefix == "p:"
    sentinel = open_store("redis+sentinel://:secret@127.0.0.1:1,127.0.0.1:2/svc/4")
    assert isinstance(sentinel, RedisKeyStore)
    pool = sentinel.client.connection_pool
    assert (pool.service_name, pool.connection_kwargs["db"],
            pool.connection_kwargs["password"]) == ("svc", 4, "secret")
    ports = [s.connection_pool.connection_kwargs["port"] for s in pool.sentinel_manager.sentinels]
    assert ports == [1, 2]


def test_unreachable_cluster_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match="unreachable"):
        open_store(f"redis+cluster://127.0.0.1:{free_port()}", timeout=0.2)
