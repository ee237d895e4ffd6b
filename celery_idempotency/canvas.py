"""`IdempotentGroup` and `IdempotentChord`: a group whose idempotent members reserve their keys
in one store round trip, instead of one each.

Opt-in: ``IdempotentGroup(...)`` is used like ``celery.group(...)`` (it is one), and
``IdempotentChord(header, body)`` like ``celery.chord``, its header sent as an
`IdempotentGroup`. Celery goes through the members itself, as for a plain group (freezing,
chord size, the group's result); the idempotent members' publishes are collected on the way
and sent together after it (`celery_idempotency.group_batch`), every other member is sent by
Celery as it goes. The group's result and what each member does are those of a plain group.

Only where the group is applied in this process: a group sent inside a message (a chain's
step, a task's ``replace``) is rebuilt by the worker as a plain ``celery.group``.
"""

from __future__ import annotations

from typing import Any

from celery import chord, group

from . import celery_compat
from .group_batch import Collector, collecting
from .task import IdempotentTask


def _is_idempotent_call(signature: Any) -> bool:
    """A member that is one call of an `IdempotentTask` (not a chain, group or chord)."""
    if signature.get("subtask_type"):
        return False
    try:
        return isinstance(signature.type, IdempotentTask)
    except Exception:  # not registered: Celery's own publish of it says so
        return False


class IdempotentGroup(group):  # type: ignore[misc]
    """``celery.group`` whose `IdempotentTask` members are reserved in one store round trip
    (per store) when it is applied, then sent in order; the same result and behaviour as
    ``celery.group`` otherwise."""

    def _apply_tasks(self, tasks: Any, producer: Any = None, app: Any = None, p: Any = None,
                     **options: Any) -> list[Any]:
        app = app or self.app
        with app.producer_or_acquire(producer) as shared_producer:
            # Frozen here rather than as Celery goes: their ids say which members to collect.
            members = list(tasks)
            collector = Collector({result.id for signature, result, _ in members
                                   if _is_idempotent_call(signature)})
            try:
                with collecting(collector):
                    results = celery_compat.apply_group_tasks(
                        self, members, shared_producer, app, p, **options)
            except Exception:
                # A member could not be published (a bad key, ...): as in a plain group, the
                # members before it are sent, then its error is raised. (Interrupted: those
                # members are neither reserved nor sent.)
                collector.publish()
                raise
            sent = collector.publish()
        for _, result, _ in members:
            # Celery's handle of the message, kept alive with the group's frozen result: when
            # collected, it stops the result backend's subscription to the task's id (Redis
            # backend, Celery < 5.7), which the group's result needs. A plain group's member
            # drops it before the group subscribes; ours are sent after.
            if result.id in sent:
                result.sent = sent[result.id]
        return results


class IdempotentChord(chord):  # type: ignore[misc]
    """``celery.chord`` whose header is sent as an `IdempotentGroup` (``chord`` turns any
    header into a plain group: ``chord(IdempotentGroup(...), body)`` alone would not batch)."""

    def run(self, header: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(header, IdempotentGroup):
            header = IdempotentGroup(header.tasks, app=header.app, **header.options)
        return super().run(header, body, *args, **kwargs)


__all__ = ["IdempotentChord", "IdempotentGroup"]
