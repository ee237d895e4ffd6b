"""Key stores, and the one place that turns a store URL into a store."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from .base import (
    Claim,
    ClaimStatus,
    Entry,
    KeyStore,
    ParkedDuplicate,
    Reservation,
    ReserveOutcome,
    ReserveRequest,
    ReserveStatus,
    ResultPayload,
)
from .eviction import eviction_guard
from .memory import MemoryKeyStore
from .redis import RedisKeyStore

__all__ = [
    "Claim",
    "ClaimStatus",
    "Entry",
    "KeyStore",
    "MemoryKeyStore",
    "ParkedDuplicate",
    "RedisKeyStore",
    "Reservation",
    "ReserveOutcome",
    "ReserveRequest",
    "ReserveStatus",
    "ResultPayload",
    "open_store",
    "store_for_app",
]

def open_store(url: str, *, prefix: str = "idem:", timeout: float = 2.0) -> KeyStore:
    """A new store for ``url``: ``memory://``, or Redis (``redis://``, ``rediss://``,
    ``unix://``, ``redis+sentinel://``, ``redis+cluster://``: see `connect`)."""
    if url.split("://", 1)[0].lower() == "memory":
        return MemoryKeyStore(prefix=prefix)
    return RedisKeyStore.from_url(url, prefix=prefix, timeout=timeout)


# One set of stores per Celery app (never one global client shared by every app). Weak keys:
# an app that is garbage collected takes its connections with it.
_stores: weakref.WeakKeyDictionary[Any, dict[tuple[str, str, float], KeyStore]] = (
    weakref.WeakKeyDictionary())
_stores_lock = threading.Lock()


def store_for_app(app: Any, url: str, *, prefix: str, timeout: float,
                  allow_evicting: bool | None = None) -> KeyStore:
    """The app's store for these settings, opened on first use and then shared by its tasks.

    ``allow_evicting`` (``idempotency_allow_evicting_store``): ``False`` refuses a store that
    may evict records with `StoreMisconfigured`, ``True`` accepts it with a warning; checked
    once per store (see `eviction`). ``None`` skips the check: reading records (the CLI, a
    result lookup) is safe on any store, and the CLI must be able to inspect one it refuses.
    """
    cache_key = (url, prefix, timeout)
    with _stores_lock:
        per_app = _stores.setdefault(app, {})
        store = per_app.get(cache_key)
        if store is None:
            store = per_app[cache_key] = open_store(url, prefix=prefix, timeout=timeout)
    if allow_evicting is not None:
        eviction_guard.check(store, allow_evicting=allow_evicting)
    return store
