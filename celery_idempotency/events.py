"""What the protocol announces, as plain events, free of Celery.

`celery_idempotency.protocol` calls `announce` at each point worth observing; listeners
subscribed here turn the events into something else. `celery_idempotency.signals` forwards
each event that has a public Celery signal of the same name (``key_claimed`` →
``signals.key_claimed``), and the OpenTelemetry integration reads them too. Events without a
signal (``key_reserved``, ``claim_busy``) exist for such listeners only.

A listener that raises is logged and skipped: observing must never change what the protocol
does (Celery's own signals behave the same way).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("celery_idempotency")

#: A publish reserved the key and its message is about to be sent (``fence`` is not known yet).
KEY_RESERVED = "key_reserved"
#: A publish was deduplicated: nothing was sent (``original_task_id``).
DUPLICATE_PUBLISHED = "duplicate_published"
#: A worker claimed the key and is about to run the task (``fence``, ``took_over``).
KEY_CLAIMED = "key_claimed"
#: A worker took over a claim whose lease had expired (``previous_task_id``, ``fence``).
LEASE_TAKEN_OVER = "lease_taken_over"
#: Another worker holds the key; this delivery looks again later (``owner_task_id``,
#: ``delay``).
CLAIM_BUSY = "claim_busy"
#: A worker replayed a cached outcome instead of running (``state``).
OUTCOME_REPLAYED = "outcome_replayed"
#: A worker lost its claim before a write; nothing was written (``action``).
OWNERSHIP_LOST = "ownership_lost"
#: A claim ended without an outcome of the task's own (``reason``).
CLAIM_RELEASED = "claim_released"

#: ``listener(event, sender, fields)``; every event's fields include ``key``, ``scope`` and
#: ``task_id``.
Listener = Callable[[str, Any, dict[str, Any]], None]

_listeners: dict[str, Listener] = {}
_lock = threading.Lock()


def subscribe(uid: str, listener: Listener) -> None:
    """Call ``listener`` for every event; subscribing again under ``uid`` replaces it."""
    with _lock:
        _listeners[uid] = listener


def unsubscribe(uid: str) -> None:
    with _lock:
        _listeners.pop(uid, None)


def announce(event: str, sender: Any, **fields: Any) -> None:
    for uid, listener in list(_listeners.items()):
        try:
            listener(event, sender, fields)
        except Exception:
            logger.exception("celery_idempotency: listener %r failed on %s", uid, event)
