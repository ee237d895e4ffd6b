"""The members of a group, reserved together: one `KeyStore.reserve_many` per store.

A plain group sends its members one by one, each member's ``apply_async`` reserving its own
key (one store round trip each). `celery_idempotency.canvas.IdempotentGroup` lets Celery go
through its members as usual, but while it does, the ``apply_async`` of each idempotent member
only prepares its call (validated and keyed, exactly as it would be) and hands it to the
group's `Collector` (`collect`) instead of reserving and sending it. Once Celery is through,
`Collector.publish` reserves every collected key in one round trip per store, then sends the
members in order, each as its own ``apply_async`` would have after its own ``reserve``
(`protocol.publish_reserved`). Free of Celery.

What the members see is what they see in a plain group:

- the reservations are made in member order, so a key twice in the group is ``RESERVED`` then
  ``DUPLICATE``; a group member is a canvas member, sent even when its key is taken (it
  short-circuits at execution), so every member is sent and the group's results all fire;
- the first member whose publish fails raises its error (the one its ``apply_async`` raises:
  the store unreachable, a key reused with other arguments, the broker failing); the members
  before it were sent, the ones after it are not, as in a plain group that stops at that
  member. Their reservations, made ahead, are given back (compare-and-delete: only our own,
  still pending records). Under ``fail_open`` a store that cannot be used sends the member
  unprotected, as ``apply_async`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from .batch import BatchCall
from .exceptions import IdempotencyError, StoreUnavailable
from .protocol import publish_reserved
from .store import KeyStore, Reservation, ReserveRequest, ReserveStatus

logger = logging.getLogger("celery_idempotency")


@dataclass(frozen=True)
class Member:
    """One collected member: its task (``sender``: ``name`` and ``idem_store(config)``) and its
    prepared call (``call.target`` is set: its key is known)."""

    sender: Any
    call: BatchCall


class Collector:
    """The idempotent members of one group, collected while Celery goes through them.

    ``task_ids``: the frozen ids of the members that are calls of an idempotent task; only
    those are collected (a task sent from inside a member, e.g. the first task of a chain, has
    an id of its own and goes the usual way)."""

    def __init__(self, task_ids: set[str]) -> None:
        self.expected = set(task_ids)
        self.members: list[Member] = []

    def take(self, sender: Any, call: BatchCall) -> bool:
        if call.target is None or call.task_id not in self.expected:
            return False
        self.expected.discard(call.task_id)  # once: a second publish of the id goes its way
        self.members.append(Member(sender, call))
        return True

    def publish(self) -> dict[str, Any]:
        """Reserve the collected members' keys, then send them in order (see the module
        docstring); raises the first member's error, as a plain group would. Returns what
        each member's send returned (Celery's result handle), by task id."""
        members, self.members = self.members, []
        return _publish_members(members) if members else {}


_collecting: ContextVar[Collector | None] = ContextVar("celery_idempotency_group",
                                                       default=None)


@contextmanager
def collecting(collector: Collector) -> Iterator[Collector]:
    """While Celery goes through a group's members: their publishes go to ``collector``."""
    token = _collecting.set(collector)
    try:
        yield collector
    finally:
        _collecting.reset(token)


def collect(sender: Any, call: BatchCall) -> bool:
    """For ``IdempotentTask.apply_async``: True when ``call`` is a member of the group being
    published here, taken to be reserved and sent with the others (nothing sent yet)."""
    collector = _collecting.get()
    return collector is not None and collector.take(sender, call)


# -- publishing the collected members ------------------------------------------------------------

#: A member's reservation, or the error its ``reserve`` (or opening its store) met.
_Answer = Reservation | BaseException


def _publish_members(members: Sequence[Member]) -> dict[str, Any]:
    stores: list[KeyStore | None] = [None] * len(members)
    answers: list[_Answer | None] = [None] * len(members)
    by_store: dict[int, tuple[KeyStore, list[int]]] = {}
    for index, member in enumerate(members):
        target = member.call.target
        assert target is not None
        try:
            store = member.sender.idem_store(target.config)
        except Exception as exc:  # as apply_async: raised (or fail_open) at this member
            answers[index] = exc
            continue
        stores[index] = store
        by_store.setdefault(id(store), (store, []))[1].append(index)
    for store, indexes in by_store.values():
        try:
            replies: list[_Answer] = list(store.reserve_many(
                [_request(members[index]) for index in indexes]))
        except Exception as exc:  # the store as a whole: each of its members meets it
            replies = [exc] * len(indexes)
        for index, reply in zip(indexes, replies, strict=True):
            answers[index] = reply
    sent: dict[str, Any] = {}
    for index, member in enumerate(members):
        try:
            sent[member.call.task_id] = _publish_one(member, stores[index], answers[index])
        except BaseException:
            _give_back(members[index + 1:], stores[index + 1:], answers[index + 1:])
            raise
    return sent


def _request(member: Member) -> ReserveRequest:
    call, target = member.call, member.call.target
    assert target is not None
    config = target.config
    # As publish: the reservation must outlive the wait for a countdown/eta, then the TTL.
    return ReserveRequest(target.ref, task_id=call.task_id, fingerprint=target.fingerprint,
                          task_name=member.sender.name, ttl_ms=config.ttl_ms + call.delay_ms,
                          pending_ms=config.pending_ms + call.delay_ms)


def _publish_one(member: Member, store: KeyStore | None, answer: _Answer | None) -> Any:
    call, target, task_name = member.call, member.call.target, member.sender.name
    assert target is not None
    if isinstance(answer, StoreUnavailable) and target.config.fail_open:
        logger.warning("idempotency store unreachable; publishing %s[%s] key=%r "
                       "UNPROTECTED (idempotency_on_store_error='fail_open'): %s",
                       task_name, call.task_id, target.ref.key, answer)
        return call.send()
    if isinstance(answer, BaseException):
        raise answer  # this member's own error, as its apply_async raises it
    assert isinstance(answer, Reservation) and store is not None
    return publish_reserved(target, store, answer, sender=member.sender, task_name=task_name,
                            task_id=call.task_id, deduplicate=call.deduplicate,
                            send=call.send).sent


def _give_back(members: Sequence[Member], stores: Sequence[KeyStore | None],
               answers: Sequence[_Answer | None]) -> None:
    """Undo the reservations of members that will not be sent (after one failed)."""
    undo: dict[int, tuple[KeyStore, list[tuple[Any, str]]]] = {}
    for member, store, answer in zip(members, stores, answers, strict=True):
        target = member.call.target
        if store is not None and target is not None and isinstance(answer, Reservation) \
                and answer.status is ReserveStatus.RESERVED:
            undo.setdefault(id(store), (store, []))[1].append((target.ref, member.call.task_id))
    for store, reservations in undo.values():
        try:
            store.unreserve_many(reservations)  # compare-and-delete: only our own, pending
        except IdempotencyError as exc:  # the member's error is the one to raise
            logger.error("publishing a group failed; %d reservation(s) of the members not "
                         "sent could not be undone (%s); they are published again after "
                         "idempotency_pending_timeout, or release them with the CLI",
                         len(reservations), exc)


__all__ = ["Collector", "Member", "collect", "collecting"]
