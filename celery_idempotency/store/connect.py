"""Redis clients from store URLs: a single server, Redis Sentinel, or Redis Cluster.

``redis://``, ``rediss://``, ``unix://``
    a single server (redis-py's own URL syntax).
``redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]``
    the current master of ``service_name``, found through the given sentinels (re-resolved
    on failover by redis-py's SentinelConnectionPool).
``redis+cluster://[:password@]host:port[,host:port...]``
    a Redis Cluster, reached through any of the given nodes. Every record's key name is a
    single hash tag, so each Lua script touches one slot.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from ..exceptions import ConfigurationError, StoreUnavailable

SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
SCHEMES = (*SINGLE_SCHEMES, SENTINEL_SCHEME, CLUSTER_SCHEME)


def _common_options(timeout: float) -> dict[str, Any]:
    # Few, fast retries: a store that is down must surface as StoreUnavailable quickly so
    # that publishing fails closed and workers back off, instead of blocking for seconds.
    # Every script is safe to repeat (a repeated call by the same caller is recognised).
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout,
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 2)}


def _hosts(netloc: str, url: str) -> list[tuple[str, int]]:
    hosts = []
    for item in netloc.rpartition("@")[2].split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigurationError(f"bad idempotency store URL {url!r}: expected host:port "
                                     f"pairs separated by commas, got {item!r}")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def _password(netloc: str) -> str | None:
    userinfo = netloc.rpartition("@")[0]
    if not userinfo:
        return None
    return unquote(userinfo.partition(":")[2]) or None


def _sentinel_master(url: str, timeout: float) -> redis.Redis:
    parts = urlsplit(url)
    path = [segment for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigurationError(f"bad idempotency store URL {url!r}: expected "
                                 "redis+sentinel://host:port[,host:port]/service_name[/db]")
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        _hosts(parts.netloc, url), sentinel_kwargs={"socket_timeout": timeout},
        password=_password(parts.netloc), **_common_options(timeout))
    master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        path[0], db=int(path[1]) if len(path) == 2 else 0)
    return master


def _cluster(url: str, timeout: float) -> RedisCluster:
    parts = urlsplit(url)
    if parts.path.strip("/"):
        raise ConfigurationError(
            f"bad idempotency store URL {url!r}: a cluster has no database number")
    nodes = [ClusterNode(host, port)  # type: ignore[no-untyped-call]
             for host, port in _hosts(parts.netloc, url)]
    try:
        # Unlike the other clients, RedisCluster connects at once (to learn the slots).
        return RedisCluster(startup_nodes=nodes, password=_password(parts.netloc),
                            **_common_options(timeout))
    except (RedisClusterException, redis.RedisError) as exc:
        raise StoreUnavailable(f"idempotency store unreachable: {exc}") from exc


def redis_client(url: str, *, timeout: float) -> redis.Redis | RedisCluster:
    """A client for ``url``; `ConfigurationError` for a URL it cannot use."""
    scheme = url.split("://", 1)[0].lower()
    if scheme == SENTINEL_SCHEME:
        return _sentinel_master(url, timeout)
    if scheme == CLUSTER_SCHEME:
        return _cluster(url, timeout)
    if scheme not in SINGLE_SCHEMES:
        raise ConfigurationError(
            f"unsupported idempotency store URL scheme {scheme!r} in {url!r}; use one of "
            f"{', '.join(s + '://' for s in SCHEMES)} or memory://")
    try:
        return redis.Redis.from_url(url, health_check_interval=30, **_common_options(timeout))
    except ValueError as exc:  # redis-py's own URL parsing
        raise ConfigurationError(f"bad idempotency store URL {url!r}: {exc}") from exc
