"""Publishing many messages with one store round trip: `publish_many`, free of Celery.

`protocol.publish` reserves a key and sends its message, one store call per message. A batch
reserves every key first, in one call (`KeyStore.reserve_many`: one pipelined round trip on
Redis), then sends each message as `protocol.publish_reserved` does: a duplicate is not sent,
a message that cannot be sent gives its reservation back. The outcome of each call is its
`Publication`, or the error that call met; nothing is dropped without saying so.

Order matters: a key twice in one batch is reserved by the first call and the second is its
duplicate, exactly as two `publish` calls in a row. A send that fails ends the batch (the
broker is likely gone for the rest as well): the reservations of the calls not sent are given
back (compare-and-delete) and those calls answer with the same error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import IdempotencyConfig
from .exceptions import IdempotencyError, StoreUnavailable
from .protocol import KeyTarget, OpenStore, Publication, publish_reserved
from .store import KeyStore, Reservation, ReserveRequest, ReserveStatus

logger = logging.getLogger("celery_idempotency")

#: One call's outcome: what `publish` would have returned, or what it would have raised.
BatchOutcome = Publication | BaseException


@dataclass(frozen=True)
class BatchResult:
    """The outcome of each call, in order; ``stopped_by``: the send error that ended the batch
    (the calls from the failed one on answer with it), None when every call was handled."""

    outcomes: list[BatchOutcome]
    stopped_by: Exception | None = None


@dataclass(frozen=True)
class BatchCall:
    """One message of a batch, ready to send: ``target`` None for one sent unprotected (its
    task is not deduplicated: disabled, or a retry of the running task)."""

    target: KeyTarget | None
    task_id: str
    send: Callable[[], Any]
    delay_ms: int = 0  # a countdown/eta: the reservation lasts that much longer
    deduplicate: bool = True  # False: sent even when its key is taken (a canvas member)


def publish_many(calls: Sequence[BatchCall], *, sender: Any, task_name: str,
                 config: IdempotencyConfig, open_store: OpenStore) -> BatchResult:
    """Reserve the keys of ``calls`` in one store call, then send each message in order.

    ``config`` is the task's: every call of one task uses the same store. Raises only what
    stops the batch before anything is sent: the store cannot be opened, or cannot be reached
    (unless ``fail_open``: then every message is sent unprotected, as `publish` does)."""
    keyed = [index for index, call in enumerate(calls) if call.target is not None]
    reservations: dict[int, Reservation | IdempotencyError] = {}
    store: KeyStore | None = None
    if keyed:
        try:
            store = open_store(config)
            answers = store.reserve_many([_request(calls[index], task_name) for index in keyed])
        except StoreUnavailable:
            if not config.fail_open:
                raise
            logger.warning("idempotency store unreachable; publishing %d message(s) of %s "
                           "UNPROTECTED (idempotency_on_store_error='fail_open')",
                           len(keyed), task_name)
            store = None
        else:
            reservations = dict(zip(keyed, answers, strict=True))
    return _send_in_order(calls, reservations, store, sender=sender, task_name=task_name)


def _request(call: BatchCall, task_name: str) -> ReserveRequest:
    target = call.target
    assert target is not None
    config = target.config
    # As publish: the reservation must outlive the wait for a countdown/eta, then the TTL.
    return ReserveRequest(target.ref, task_id=call.task_id, fingerprint=target.fingerprint,
                          task_name=task_name, ttl_ms=config.ttl_ms + call.delay_ms,
                          pending_ms=config.pending_ms + call.delay_ms)


def _send_in_order(calls: Sequence[BatchCall],
                   reservations: dict[int, Reservation | IdempotencyError],
                   store: KeyStore | None, *, sender: Any, task_name: str) -> BatchResult:
    outcomes: list[BatchOutcome] = []
    index_of_task = {call.task_id: index for index, call in enumerate(calls)}
    for index, call in enumerate(calls):
        reservation = reservations.get(index)
        try:
            outcomes.append(_publish_one(call, reservation, store, outcomes, index_of_task,
                                         sender=sender, task_name=task_name))
        except Exception as exc:
            # Not sent (and its own reservation given back): the broker failed. Stop here.
            _give_back(calls, reservations, store, first=index + 1, task_name=task_name)
            outcomes.extend(exc for _ in calls[index:])
            return BatchResult(outcomes, stopped_by=exc)
        except BaseException:
            _give_back(calls, reservations, store, first=index + 1, task_name=task_name)
            raise
    return BatchResult(outcomes)


def _publish_one(call: BatchCall, reservation: Reservation | IdempotencyError | None,
                 store: KeyStore | None, earlier: list[BatchOutcome],
                 index_of_task: dict[str, int], *, sender: Any, task_name: str) -> BatchOutcome:
    if call.target is None or store is None:
        return Publication(store=None, sent=call.send())
    if isinstance(reservation, StoreUnavailable) and call.target.config.fail_open:
        logger.warning("idempotency store unavailable; publishing %s[%s] key=%r UNPROTECTED "
                       "(idempotency_on_store_error='fail_open'): %s", task_name, call.task_id,
                       call.target.ref.key, reservation)
        return Publication(store=None, sent=call.send())
    if isinstance(reservation, IdempotencyError):
        return reservation  # this call's own error (key reused with other arguments, ...)
    assert reservation is not None
    original = _original_in_batch(reservation, earlier, index_of_task)
    if isinstance(original, BaseException) and call.deduplicate:
        # A duplicate of an earlier call of this batch that was not sent: it has no task
        # to point at; the same error, rather than a handle that never completes.
        return original
    return publish_reserved(call.target, store, reservation, sender=sender,
                            task_name=task_name, task_id=call.task_id,
                            deduplicate=call.deduplicate, send=call.send)


def _original_in_batch(reservation: Reservation, earlier: list[BatchOutcome],
                       index_of_task: dict[str, int]) -> BatchOutcome | None:
    """For a duplicate of a call earlier in this batch: that call's outcome."""
    if reservation.status is not ReserveStatus.DUPLICATE or reservation.record is None:
        return None
    index = index_of_task.get(reservation.record.task_id)
    if index is None or index >= len(earlier):
        return None
    return earlier[index]


def _give_back(calls: Sequence[BatchCall],
               reservations: dict[int, Reservation | IdempotencyError],
               store: KeyStore | None, *, first: int, task_name: str) -> None:
    """Undo the reservations of the calls from ``first`` on, which will not be sent."""
    if store is None:
        return
    undo = []
    for index in range(first, len(calls)):
        reservation, target = reservations.get(index), calls[index].target
        if isinstance(reservation, Reservation) and target is not None \
                and reservation.status is ReserveStatus.RESERVED:
            undo.append((target.ref, calls[index].task_id))
    if not undo:
        return
    try:
        store.unreserve_many(undo)  # compare-and-delete: only our own, still pending
    except IdempotencyError as exc:  # the send error is the one to report
        logger.error("publishing %s failed; %d reservation(s) of the messages not sent could "
                     "not be undone (%s); they are published again after "
                     "idempotency_pending_timeout, or release them with the CLI", task_name,
                     len(undo), exc)


__all__ = ["BatchCall", "BatchOutcome", "BatchResult", "publish_many"]
