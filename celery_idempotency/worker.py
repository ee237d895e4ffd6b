"""Worker main-process hooks: give up the claim of a task whose pool child died or that was
revoked, so that its key does not stay claimed until the lease runs out.

A custom ``Request`` class (``Task.Request``) is Celery's extension point for what happens in
the main process when a task ends; the task's own code cannot run after its process is gone.
The claim is given up by `protocol.abandon`; this class decides when, and how (requeued or not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery.exceptions import TaskRevokedError
from celery.utils.serialization import get_pickled_exception
from celery.worker.request import Request

from . import celery_compat
from .leases import owner_prefix
from .protocol import KeyTarget, abandon
from .store import KeyStore


class IdempotentRequest(Request):  # type: ignore[misc]
    """Request of an `IdempotentTask` in the worker's main process.

    When the child running a task is gone (killed, OOM, hard time limit), Celery decides in
    `on_failure` / `on_timeout` what happens to the message: requeued (``reject``), re-sent
    (``retry_on_worker_lost``) or acknowledged. The claim follows that decision, taken where
    Celery acts rather than predicted from flags: back to ``pending`` *before* the message is
    requeued or re-sent (so the redelivery finds the key free), or ``failed`` (retryable) when
    the message is gone, so that the next publish runs the task.
    """

    _idem_giving_up: BaseException | None = None  # the child's fate, while Celery handles it
    _idem_handed_back = False  # the message was requeued or re-sent: the claim is pending
    _idem_settled = False  # the claim was handled once (a hard timeout may also fail later)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> Any:
        exc = get_pickled_exception(exc_info.exception)
        exc = getattr(exc, "exc", exc)
        lost = isinstance(exc, (WorkerLostError, TimeLimitExceeded, SystemExit,
                                KeyboardInterrupt))
        if not lost or self._idem_settled or celery_compat.revoked_or_cancelled(self):
            return super().on_failure(exc_info, send_failed_event=send_failed_event,
                                      return_ok=return_ok)
        with self._giving_up(exc):
            return super().on_failure(exc_info, send_failed_event=send_failed_event,
                                      return_ok=return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> Any:
        # A hard time limit kills the child; Celery acks or requeues the message here and
        # does not go through on_failure.
        if soft or self._idem_settled:
            return super().on_timeout(soft, timeout)
        with self._giving_up(TimeLimitExceeded(timeout)):
            return super().on_timeout(soft, timeout)

    @contextlib.contextmanager
    def _giving_up(self, error: BaseException) -> Iterator[None]:
        self._idem_giving_up, self._idem_handed_back = error, False
        try:
            yield
        finally:
            self._idem_giving_up, self._idem_settled = None, True
            if not self._idem_handed_back:  # acknowledged, or rejected for good
                self._abandon(requeued=False, error=error)

    def reject(self, requeue: bool = False) -> Any:
        if requeue and self._idem_giving_up is not None and not self._idem_handed_back:
            self._abandon(requeued=True, error=self._idem_giving_up)
            self._idem_handed_back = True
        return super().reject(requeue=requeue)

    if celery_compat.RETRIES_ON_WORKER_LOST:  # Celery >= 5.7 (task_retry_on_worker_lost)
        def _retry_worker_lost(self, exc: Any, exc_info: Any) -> Any:
            # Celery re-sends the task (same id) from here; the re-send goes through
            # IdempotentTask.apply_async, which publishes it only if the key is pending for
            # this very task id: hand the claim back first.
            if self._idem_giving_up is not None:
                self._abandon(requeued=True, error=self._idem_giving_up)
            retried = super()._retry_worker_lost(exc, exc_info)
            if retried:
                self._idem_handed_back = True
            return retried

    def _announce_revoked(self, reason: str, terminated: bool, signum: Any,
                          expired: bool) -> Any:
        # The one place Celery funnels every revoke through: before start (revoked or expired)
        # and while running (terminate=True). The message is acknowledged: nothing will run
        # it, so the key fails retryable and the next publish runs the task.
        outcome = super()._announce_revoked(reason, terminated, signum, expired)
        # The exception Celery's backend records for it (mark_as_revoked), so that a handle
        # reading the store reports it the same way (REVOKED).
        self._abandon(requeued=False, error=TaskRevokedError(f"task {reason}"))
        return outcome

    def _abandon(self, *, requeued: bool, error: BaseException) -> None:
        task = self.task

        def locate() -> tuple[KeyTarget, KeyStore]:
            target = task.key_target_of_message(self.args, self.kwargs, self.request_dict)
            return target, task.idem_store(target.config)

        abandon(locate, sender=task, task_name=self.name, task_id=self.id,
                owner_prefix=owner_prefix(self.worker_pid) if self.worker_pid else "",
                requeued=requeued, error=error)
