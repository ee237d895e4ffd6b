"""Worker main-process hooks: give up the claim of a task whose pool child died or that was
revoked, so that its key does not stay claimed until the lease runs out.

A custom ``Request`` class (``Task.Request``) is Celery's extension point for what happens in
the main process when a task ends; the task's own code cannot run after its process is gone.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.exceptions import WorkerLostError
from celery.exceptions import Terminated
from celery.utils.serialization import get_pickled_exception
from celery.worker.request import Request

from . import signals
from .exceptions import IdempotencyError
from .leases import owner_prefix
from .outcomes import encode_error

logger = logging.getLogger("celery_idempotency")


class IdempotentRequest(Request):  # type: ignore[misc]
    """Request of an `IdempotentTask` in the worker's main process."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> Any:
        outcome = super().on_failure(exc_info, send_failed_event=send_failed_event,
                                     return_ok=return_ok)
        exc = get_pickled_exception(exc_info.exception)
        exc = getattr(exc, "exc", exc)
        if isinstance(exc, (WorkerLostError, SystemExit, KeyboardInterrupt)) \
                and not (self._already_revoked or self._already_cancelled):
            task = self.task
            requeued = bool(task.acks_late and (task.reject_on_worker_lost
                                                or task.retry_on_worker_lost))
            self._abandon(requeued=requeued, error=exc)
        return outcome

    def _announce_revoked(self, reason: str, terminated: bool, signum: Any,
                          expired: bool) -> Any:
        # The one place Celery funnels every revoke through: before start (revoked or expired)
        # and while running (terminate=True). The message is acknowledged: nothing will run
        # it, so the key fails retryable and the next publish runs the task.
        outcome = super()._announce_revoked(reason, terminated, signum, expired)
        self._abandon(requeued=False, error=Terminated(f"task {reason}"))
        return outcome

    def _abandon(self, *, requeued: bool, error: BaseException) -> None:
        task = self.task
        try:
            context = task.key_context_of_message(self.args, self.kwargs, self.request_dict)
            store = task.idem_store(context.config)
            prefix = owner_prefix(self.worker_pid) if self.worker_pid else ""
            changed = store.abandon(context.ref, task_id=self.id, owner_prefix=prefix,
                                    requeued=requeued, error=encode_error(error),
                                    ttl_ms=context.config.ttl_ms)
        except IdempotencyError as exc:
            logger.error("%s[%s]: could not give up its claim after %r: %s; it stays until "
                         "its lease expires", self.name, self.id, error, exc)
            return
        if changed:
            signals.claim_released.send(sender=task, key=context.ref.key,
                                        scope=context.ref.scope, task_id=self.id,
                                        reason="requeued" if requeued else "abandoned")
            logger.warning("%s[%s] key=%r: %s; claim given up (%s)", self.name, self.id,
                           context.ref.key, error or type(error).__name__,
                           "pending for the redelivery" if requeued
                           else "failed, the next publish runs it")
