"""Hooks: the API handler's key context, publish stamping, and this library's own signals.

``with idempotency_key("..."):`` around ``.delay()`` / ``.apply_async()`` / ``app.send_task()``
gives those publishes that key. `IdempotentTask.apply_async` reads the context itself (it must
reserve the key before publishing); for ``app.send_task`` by name, from a service that does not
import the task, `install` connects a ``before_task_publish`` receiver that stamps the key into
the message headers, and the worker deduplicates when it runs the message.

The library's own signals are sent with the task as sender and ``key``, ``scope`` and
``task_id`` arguments, so that they can be counted (see the README for a Prometheus example).
Like all Celery signals, a receiver that raises is logged and does not break the task.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

from celery.signals import before_task_publish
from celery.utils.dispatch import Signal

from . import events
from .config import KEY_HEADER
from .keys import validate_key

_ARGS = {"key", "scope", "task_id"}

#: A worker claimed a key and is about to run the task (``fence``, ``took_over`` also sent).
key_claimed = Signal(name="idempotency_key_claimed", providing_args=_ARGS | {"fence",
                                                                             "took_over"})
#: A publish was deduplicated: nothing was sent (``original_task_id`` also sent).
duplicate_published = Signal(name="idempotency_duplicate_published",
                             providing_args=_ARGS | {"original_task_id"})
#: A worker replayed a cached outcome instead of running (``state``: succeeded or failed).
outcome_replayed = Signal(name="idempotency_outcome_replayed", providing_args=_ARGS | {"state"})
#: A worker took over a claim whose lease had expired (``previous_task_id``, ``fence``).
lease_taken_over = Signal(name="idempotency_lease_taken_over",
                          providing_args=_ARGS | {"previous_task_id", "fence"})
#: A worker lost its claim before writing the outcome; nothing was written (``action``).
ownership_lost = Signal(name="idempotency_ownership_lost", providing_args=_ARGS | {"action"})
#: A claim ended without an outcome of the task's own (``reason``: ``retry``, ``ignore`` (the key
#: was discarded), ``reject``, ``shutdown``, ``requeued``, ``abandoned``; see the README).
claim_released = Signal(name="idempotency_claim_released", providing_args=_ARGS | {"reason"})



def _forward(event: str, sender: Any, fields: dict[str, Any]) -> None:
    """Send the protocol's event as the public signal of the same name, if there is one."""
    signal = _SIGNALS.get(event)
    if signal is not None and signal.receivers:  # as Signal.send checks first: one call less
        signal.send(sender=sender, **fields)


_SIGNALS: dict[str, Signal] = {
    events.KEY_CLAIMED: key_claimed, events.DUPLICATE_PUBLISHED: duplicate_published,
    events.OUTCOME_REPLAYED: outcome_replayed, events.LEASE_TAKEN_OVER: lease_taken_over,
    events.OWNERSHIP_LOST: ownership_lost, events.CLAIM_RELEASED: claim_released,
}
# At import: the protocol announces, the signals are sent (this module is imported with the
# package, before any task runs).
events.subscribe("celery_idempotency.signals", _forward)

_current_key: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "celery_idempotency_key", default=None)


@contextlib.contextmanager
def idempotency_key(key: str) -> Iterator[str]:
    """Publishes inside this block use ``key`` (validated now, not at the first publish)."""
    token = _current_key.set(validate_key(key))
    try:
        yield key
    finally:
        _current_key.reset(token)


def current_idempotency_key() -> str | None:
    return _current_key.get()


def _stamp_key(sender: Any = None, headers: dict[str, Any] | None = None,
               **_: Any) -> None:
    key = _current_key.get()
    # Never overwrite a key that is already there: a retry carries its own, and
    # IdempotentTask.apply_async stamps the key it reserved.
    if key is not None and headers is not None and headers.get(KEY_HEADER) is None:
        headers[KEY_HEADER] = key


_install_lock = threading.Lock()


def install(app: Any = None) -> None:
    """Stamp the context's key onto every message published by name (``app.send_task``).

    Celery's publish signal is process-wide, so this connects one receiver for every app;
    calling it again does nothing.
    """
    with _install_lock:
        before_task_publish.connect(_stamp_key, weak=False,
                                    dispatch_uid="celery_idempotency.stamp_key")
