"""Refuse a Redis store that may evict records.

Every record has a TTL, so with ``maxmemory`` set every policy but ``noeviction`` may evict
one (the ``volatile-*`` policies pick among keys with a TTL, i.e. among records): an evicted
record is a key the store has forgotten, and the next publish of it runs the task again.
Such a store is refused with `StoreMisconfigured` unless ``idempotency_allow_evicting_store``
says the user accepts that risk.

The policy is read once per store and process (``CONFIG GET maxmemory*``; where CONFIG is
denied by an ACL or renamed by a managed service, ``INFO memory``), on every primary of a
Cluster and on the master behind Sentinel. A store that cannot be reached at that moment is
not marked as checked: the task's own store call then fails as unreachable, and the next use
checks again. A refused store is read again on every use, so that fixing the policy with
``CONFIG SET`` takes effect without restarting anything.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import ClusterError, RedisClusterException

from ..exceptions import StoreMisconfigured
from .base import KeyStore
from .errors import Fault, classify

logger = logging.getLogger("celery_idempotency")

NOEVICTION = "noeviction"
OPT_OUT = "idempotency_allow_evicting_store"
FIX = f"CONFIG SET maxmemory-policy {NOEVICTION}"
# "Not now": the check is skipped and made again on the next use.
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, ClusterError, RedisClusterException)


@dataclass(frozen=True)
class MemoryPolicy:
    """What one Redis server says about its memory limit and what it does when reaching it."""

    server: str
    maxmemory: int
    policy: str
    source: str  # "CONFIG GET" or "INFO memory"
    evicted_keys: int | None = None  # INFO stats; None when not read or not allowed

    @property
    def evicts(self) -> bool:
        """Whether this server may evict a record (maxmemory 0 means no limit)."""
        return self.maxmemory > 0 and self.policy != NOEVICTION

    def describe(self) -> str:
        limit = f"maxmemory {self.maxmemory}" if self.maxmemory else "maxmemory 0 (no limit)"
        return f"{self.server}: maxmemory-policy {self.policy}, {limit} (from {self.source})"


class PolicyUnknown(Exception):
    """The server would not tell (CONFIG GET and INFO both denied)."""


def _denied(exc: redis.ResponseError) -> bool:
    """NOPERM (ACL), or a command renamed away by a managed service: ask another way."""
    return classify(exc) is Fault.MISCONFIGURED


def _server_name(server: redis.Redis) -> str:
    kwargs = server.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    service = getattr(server.connection_pool, "service_name", None)
    if service is not None:  # Sentinel: the master's address changes on failover
        return f"master of {service!r}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


def _servers(client: redis.Redis | RedisCluster) -> list[tuple[str, redis.Redis]]:
    if isinstance(client, RedisCluster):
        return [(node.name, client.get_redis_connection(node))
                for node in client.get_primaries()]  # type: ignore[no-untyped-call]
    return [(_server_name(client), client)]


def _from_config(server: redis.Redis) -> tuple[int, str] | None:
    try:
        config: Mapping[Any, Any] = server.config_get("maxmemory*")
    except redis.ResponseError as exc:
        if _denied(exc):
            return None
        raise
    if "maxmemory" not in config or "maxmemory-policy" not in config:
        return None
    return int(config["maxmemory"]), str(config["maxmemory-policy"])


def _from_info(server: redis.Redis) -> tuple[int, str]:
    try:
        info: Mapping[str, Any] = server.info("memory")
    except redis.ResponseError as exc:
        if _denied(exc):
            raise PolicyUnknown(str(exc)) from None
        raise
    if "maxmemory" not in info or "maxmemory_policy" not in info:
        raise PolicyUnknown("INFO memory has no maxmemory or maxmemory_policy")
    return int(info["maxmemory"]), str(info["maxmemory_policy"])


def _evicted_keys(server: redis.Redis) -> int | None:
    try:
        return int(server.info("stats").get("evicted_keys", 0))
    except redis.ResponseError:
        return None


def read_policies(client: redis.Redis | RedisCluster, *,
                  with_evictions: bool = False) -> list[MemoryPolicy]:
    """The memory policy of every server that holds records (Cluster: every primary).

    Raises `PolicyUnknown` when a server denies both CONFIG GET and INFO, and redis-py's
    errors when it cannot be reached.
    """
    policies = []
    for name, server in _servers(client):
        found = _from_config(server)
        source = "CONFIG GET"
        if found is None:
            found, source = _from_info(server), "INFO memory"
        maxmemory, policy = found
        policies.append(MemoryPolicy(name, maxmemory, policy, source,
                                     _evicted_keys(server) if with_evictions else None))
    return policies


def refusal(evicting: list[MemoryPolicy]) -> StoreMisconfigured:
    servers = "; ".join(policy.describe() for policy in evicting)
    return StoreMisconfigured(
        f"the idempotency store may evict records ({servers}): every record has a TTL, so "
        "this policy can drop a key while its work is in flight or cached, and the next "
        f"publish runs the task again. Fix: `{FIX}` (and in the server's config file), or set "
        "maxmemory 0; to accept the risk, set "
        f"{OPT_OUT} = True")


class EvictionGuard:
    """Remembers, per store object, that its servers were found not to evict (or that a task
    that allows it accepted the risk)."""

    def __init__(self) -> None:
        self._safe: weakref.WeakKeyDictionary[KeyStore, bool] = weakref.WeakKeyDictionary()
        self._accepted: weakref.WeakKeyDictionary[KeyStore, bool] = (
            weakref.WeakKeyDictionary())
        self._lock = threading.Lock()

    def passed(self, store: KeyStore, *, allow_evicting: bool) -> bool:
        """Whether `check` of ``store`` is settled: it would return at once from now on (a
        caller may then keep the store and skip asking again)."""
        return bool(self._safe.get(store) or (allow_evicting and self._accepted.get(store)))

    def check(self, store: KeyStore, *, allow_evicting: bool) -> None:
        """Raise `StoreMisconfigured` if ``store`` may evict records and that is not allowed.

        One round trip per server the first time; nothing after a check that passed.
        """
        if self._safe.get(store) or (allow_evicting and self._accepted.get(store)):
            return
        client = getattr(store, "client", None)
        if not isinstance(client, (redis.Redis, RedisCluster)):
            return  # the memory store never evicts
        try:
            policies = read_policies(client)
        except _TRANSIENT:
            return  # not checked: the next use tries again
        except PolicyUnknown as exc:
            if allow_evicting:
                self._accept(store, None)
                return
            raise StoreMisconfigured(
                "cannot tell whether the idempotency store may evict records: CONFIG GET "
                f"maxmemory* and INFO memory were both refused ({exc}). Allow this user INFO "
                f"(ACL: +info), or, having checked maxmemory-policy is {NOEVICTION} yourself, "
                f"set {OPT_OUT} = True") from None
        except redis.ResponseError:
            return  # LOADING, BUSY, MASTERDOWN...: not now; the next use tries again
        evicting = [policy for policy in policies if policy.evicts]
        if not evicting:
            self._safe[store] = True
        elif allow_evicting:
            self._accept(store, evicting)
        else:
            raise refusal(evicting)

    def _accept(self, store: KeyStore, evicting: list[MemoryPolicy] | None) -> None:
        with self._lock:
            if self._accepted.get(store):
                return
            self._accepted[store] = True
        if evicting is None:
            logger.warning("idempotency store: maxmemory-policy cannot be read (CONFIG GET "
                           "and INFO denied); accepted because %s = True", OPT_OUT)
        else:
            logger.warning("idempotency store may evict records (%s); accepted because %s = "
                           "True: an evicted record runs its task again",
                           "; ".join(policy.describe() for policy in evicting), OPT_OUT)


eviction_guard = EvictionGuard()
