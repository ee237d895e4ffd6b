"""`IdempotentResult`: a result handle that reads the outcome from the key store.

It works with or without a Celery result backend: an API endpoint can rebuild it later from
the idempotency key alone (`result_for_key`), and a duplicate publish returns one for the
original task id without anything having been published.

With a Celery result backend, the handle of a published message is Celery's `AsyncResult`
(states such as RETRY and REVOKED, ``ignore_result``, ``forget()``, the backend's result
subscription): Celery records the outcome of that very task id, including the outcome of a
``self.replace()`` replacement that the key store never sees. The store answers what the backend
cannot: the outcome of a duplicate's or a looked-up key's task while the backend does not know
it (its result expired, was ignored or forgotten), and everything when there is no backend.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

from celery import states
from celery.backends.base import DisabledBackend
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.serialization import prepare_accept_content

from .celery_compat import task_meta
from .config import resolve
from .exceptions import ResultNotStored, StoreUnavailable
from .keys import RecordRef
from .outcomes import decode_result, rebuild_error
from .records import KeyState, Record, ResultStatus
from .store import KeyStore, store_for_app
from .store.wakeups import SAFETY_POLL, Watch

_CELERY_STATES = {
    KeyState.PENDING: states.PENDING,
    KeyState.STARTED: states.STARTED,
    KeyState.SUCCEEDED: states.SUCCESS,
    KeyState.FAILED: states.FAILURE,
}
_REVOKED_ERROR = f"{TaskRevokedError.__module__}.{TaskRevokedError.__qualname__}"
# A duplicate's handle may see the store's "succeeded, result not cached" a moment before the
# worker has written the result to Celery's backend: wait this long for the backend first.
_BACKEND_GRACE = 5.0
# A waiter without notifications polls from this pause up to ``interval``.
_POLL_FIRST = 0.01


@functools.lru_cache(maxsize=16)
def accept_for(serializer: str) -> tuple[str, ...]:
    """Content types a result may be read back in: the configured serializer, and JSON (so that
    records written before a switch of serializer stay readable). Cached: every publish asks."""
    return tuple(sorted(prepare_accept_content(  # type: ignore[no-untyped-call]
        {"json", serializer})))


class IdempotentResult(AsyncResult):  # type: ignore[misc]
    """Handle for the task that owns an idempotency key.

    ``duplicate`` tells whether this publish was deduplicated (nothing was sent); a handle
    looked up by key (`result_for_key`) published nothing and is not a duplicate. Without a
    result backend ``get()`` polls the key store; the outcome is the key's, whichever message
    ran it (with one, see the module's docstring: Celery's backend first). A cached error is
    raised under the same rules as a worker's replay (`rebuild_error`): ``replayable`` are the
    task's ``idempotency_cache_errors``, whose constructors the user opted into running.
    """

    def __init__(self, id: str, *, store: KeyStore, ref: RecordRef, accept: Sequence[str],
                 duplicate: bool, app: Any = None, task_name: str | None = None,
                 eager: AsyncResult | None = None,
                 replayable: tuple[type[BaseException], ...] = (),
                 published: bool = False) -> None:
        super().__init__(id, app=app)
        self._task_name = task_name  # AsyncResult ignores its own task_name argument
        self.store = store
        self.ref = ref
        self.accept = accept
        self.duplicate = duplicate
        self._eager = eager
        self.replayable = replayable
        #: This very task id was published by the call that made the handle: Celery's result
        #: backend (if any) will hold its outcome.
        self.published = published
        #: Celery's own handle of the published message, when there is one.
        self.sent: AsyncResult | None = None

    def _backend_answers(self) -> bool:
        """Whether Celery's result backend is the source (eager results are read as before)."""
        return self._eager is None and not isinstance(self.backend, DisabledBackend)

    @property
    def idempotency_key(self) -> str:
        return self.ref.key

    @property
    def scope(self) -> str:
        return self.ref.scope

    def record(self) -> Record | None:
        return self.store.get(self.ref)

    def _meta(self, record: Record | None, *, decode: bool) -> dict[str, Any]:
        status = _CELERY_STATES[record.state] if record else states.PENDING
        if record is not None and record.error and record.error.get("type") == _REVOKED_ERROR:
            status = states.REVOKED  # as Celery reports a revoked or expired task
        result: Any = None
        if record is not None and decode:
            if record.state is KeyState.SUCCEEDED:
                result = decode_result(record, accept=self.accept)
            elif record.state is KeyState.FAILED:
                result = self._error_of(record)
        name = (record.task_name if record is not None else None) or self._task_name
        return {"task_id": self.id, "status": status, "result": result, "traceback": None,
                "children": [], "date_done": None, "name": name}

    def _error_of(self, record: Record) -> Exception:
        if record.error and record.error.get("type") == _REVOKED_ERROR:
            # Celery's own exception for a revoked or expired task (the worker's main process
            # records it, from Celery's reason): as a result backend would report it.
            revoked: Exception = TaskRevokedError(str(record.error.get("message") or "revoked"))
            return revoked
        return rebuild_error(record, replayable=self.replayable)

    def _get_task_meta(self) -> dict[str, Any]:
        if self._backend_answers():
            meta: dict[str, Any] = super()._get_task_meta()
            if self.published or meta["status"] != states.PENDING:
                return meta
            # A duplicate or a looked-up key: the backend does not know this task (yet, or any
            # more); the key's record does.
            record = self.record()
            if record is None or (record.state is KeyState.SUCCEEDED
                                  and record.result_status is not ResultStatus.STORED):
                return meta
            return self._meta(record, decode=True)
        record = self.record()
        if self._eager_holds_result(record):
            return dict(task_meta(self._eager))
        return self._meta(record, decode=True)

    def _eager_holds_result(self, record: Record | None) -> bool:
        """In eager mode the first handle also holds the return value itself: use it when the
        store could not keep it (not serializable, too large). Otherwise the key's outcome in
        the store wins, so that every handle of a key agrees."""
        return (self._eager is not None and record is not None
                and record.state is KeyState.SUCCEEDED
                and record.result_status is not ResultStatus.STORED
                and self._eager.successful())

    def get(self, timeout: float | None = None, propagate: bool = True,
            interval: float = 0.5, **options: Any) -> Any:
        """Wait for the outcome: the result, or its error raised.

        With a result backend, a published task's handle is Celery's own ``get`` (subscription,
        ``ignore_result``, parents' errors); a duplicate's takes whichever of the backend and
        the key store knows the outcome first. Without one, the key store's outcome."""
        if not self._backend_answers():
            return self._get_from_store(timeout, propagate, interval)
        if self.published or self.ignored:
            return super().get(timeout=timeout, propagate=propagate, interval=interval,
                               **options)
        with self.store.watch(self.ref) as watch:
            return self._get_from_either(watch, timeout, propagate, interval, **options)

    def _get_from_either(self, watch: Watch, timeout: float | None, propagate: bool,
                         interval: float, **options: Any) -> Any:
        """A duplicate's ``get`` with a backend: whichever of the two knows the outcome first
        (the store's completion wakes ``watch``; the backend is asked every ``interval``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        not_cached_since: float | None = None
        while True:
            meta = super()._get_task_meta()
            if meta["status"] in states.READY_STATES:
                return super().get(timeout=timeout, propagate=propagate, interval=interval,
                                   **options)
            record = self.record()
            if record is not None and record.state is KeyState.FAILED:
                error = self._error_of(record)
                if propagate:
                    raise error
                return error
            if record is not None and record.state is KeyState.SUCCEEDED:
                if record.result_status is ResultStatus.STORED:
                    return decode_result(record, accept=self.accept)
                now = time.monotonic()
                not_cached_since = not_cached_since or now
                if now - not_cached_since > _BACKEND_GRACE:
                    raise ResultNotStored(
                        "the task succeeded but neither the key store nor the result backend "
                        "holds its result", key=record.key, task_id=record.task_id)
            if deadline is not None and time.monotonic() >= deadline:
                raise CeleryTimeoutError(
                    f"task {self.id} (idempotency key {self.ref.key!r}) has no outcome after "
                    f"{timeout} s")
            pause = interval if deadline is None else \
                min(interval, max(0.0, deadline - time.monotonic()))
            watch.wait(pause)

    def _get_from_store(self, timeout: float | None, propagate: bool, interval: float) -> Any:
        """Wait for the key's outcome: the cached result, or its error raised.

        One read first: most duplicates ask for a result that is already there. Otherwise the
        handle subscribes to the record's changes *before* reading again (no wake-up lost in
        between) and sleeps until the store announces an outcome (or a deletion: it reads
        again and keeps waiting). Without notifications (a Cluster, an ACL without pub/sub,
        the subscription down) it polls, with backoff up to ``interval``. While waiting, a
        store that is briefly unreachable (a restart, a failover) is waited out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        settled, value = self._settled(self.record(), timeout, propagate)
        if settled:
            return value
        with self.store.watch(self.ref) as watch:
            pause = _POLL_FIRST
            while True:
                try:
                    record = watch.read(self.record)
                except StoreUnavailable:
                    record = None  # not now: look again after the pause
                else:
                    settled, value = self._settled(record, timeout, propagate)
                    if settled:
                        return value
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise CeleryTimeoutError(
                        f"idempotency key {self.ref.key!r} has no outcome after {timeout} s")
                if watch.live:  # a change wakes us: only a safety poll
                    wait, pause = SAFETY_POLL, _POLL_FIRST
                else:
                    wait, pause = pause, min(pause * 2, interval)
                watch.wait(wait if left is None else min(wait, left))

    def _settled(self, record: Record | None, timeout: float | None,
                 propagate: bool) -> tuple[bool, Any]:
        """``(True, outcome)`` once the key has one (an error is raised if ``propagate``)."""
        if self._eager_holds_result(record):
            return True, self._eager.get(timeout=timeout, propagate=propagate)  # type: ignore
        if record is not None and record.state is KeyState.SUCCEEDED:
            return True, decode_result(record, accept=self.accept)
        if record is not None and record.state is KeyState.FAILED:
            error = self._error_of(record)
            if propagate:
                raise error
            return True, error
        return False, None

    wait = get

    def forget(self) -> None:
        """Forget the task's result in Celery's result backend (like `AsyncResult.forget`).

        The key's record stays (it is what deduplicates); release it with the CLI."""
        if not self._backend_answers():
            raise NotImplementedError(
                "an idempotent result lives as long as its key; release the key with the CLI")
        super().forget()

    def __repr__(self) -> str:
        flag = " duplicate" if self.duplicate else ""
        return f"<IdempotentResult: {self.id} key={self.ref.key!r}{flag}>"


def lookup(app: Any, store: KeyStore, ref: RecordRef, *, serializer: str,
           task_name: str | None,
           replayable: tuple[type[BaseException], ...] = ()) -> IdempotentResult | None:
    """The handle of the task that owns ``ref`` now, or ``None`` when the key is unknown or
    expired. A lookup publishes nothing: the handle is not a duplicate."""
    record = store.get(ref)
    if record is None:
        return None
    return IdempotentResult(record.task_id, store=store, ref=ref, accept=accept_for(serializer),
                            duplicate=False, app=app, task_name=task_name or record.task_name,
                            replayable=replayable)


def result_for_key(app: Any, key: str, *, scope: str) -> IdempotentResult | None:
    """Rebuild the handle for ``key`` under ``scope`` (a task name by default), from the store
    named by ``app.conf.idempotency_store_url``. ``None`` when the key is unknown or expired."""
    config = resolve(app.conf, {}, task_name=scope,
                     namespace=getattr(app, "namespace", None))
    store = store_for_app(app, config.store_url, prefix=config.key_prefix,
                          timeout=config.store_timeout)
    # The default scope is a task name: that task's idempotency_cache_errors then say which
    # error classes a replay may rebuild (else the app setting's).
    task = app.tasks.get(scope)
    replayable = task.idem_config().cache_errors if hasattr(task, "idem_config") \
        else config.cache_errors
    return lookup(app, store, RecordRef(scope, key), serializer=config.result_serializer,
                  task_name=None, replayable=replayable)
