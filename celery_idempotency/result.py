"""`IdempotentResult`: a result handle that reads the outcome from the key store.

It works with or without a Celery result backend: an API endpoint can rebuild it later from
the idempotency key alone (`result_for_key`), and a duplicate publish returns one for the
original task id without anything having been published.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

from celery import states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.serialization import prepare_accept_content

from .config import resolve
from .keys import RecordRef
from .outcomes import decode_result, rebuild_error
from .records import KeyState, Record, ResultStatus
from .store import KeyStore, store_for_app

_CELERY_STATES = {
    KeyState.PENDING: states.PENDING,
    KeyState.STARTED: states.STARTED,
    KeyState.SUCCEEDED: states.SUCCESS,
    KeyState.FAILED: states.FAILURE,
}


@functools.lru_cache(maxsize=16)
def accept_for(serializer: str) -> tuple[str, ...]:
    """Content types a result may be read back in: the configured serializer, and JSON (so that
    records written before a switch of serializer stay readable). Cached: every publish asks."""
    return tuple(sorted(prepare_accept_content(  # type: ignore[no-untyped-call]
        {"json", serializer})))


class IdempotentResult(AsyncResult):  # type: ignore[misc]
    """Handle for the task that owns an idempotency key.

    ``duplicate`` tells whether this publish was deduplicated (nothing was sent); a handle
    looked up by key (`result_for_key`) published nothing and is not a duplicate. ``get()``
    polls the key store; the outcome is the key's, whichever message ran it.
    """

    def __init__(self, id: str, *, store: KeyStore, ref: RecordRef, accept: Sequence[str],
                 duplicate: bool, app: Any = None, task_name: str | None = None,
                 eager: AsyncResult | None = None) -> None:
        super().__init__(id, app=app)
        self._task_name = task_name  # AsyncResult ignores its own task_name argument
        self.store = store
        self.ref = ref
        self.accept = accept
        self.duplicate = duplicate
        self._eager = eager

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
        result: Any = None
        if record is not None and decode:
            if record.state is KeyState.SUCCEEDED:
                result = decode_result(record, accept=self.accept)
            elif record.state is KeyState.FAILED:
                result = rebuild_error(record)
        name = (record.task_name if record is not None else None) or self._task_name
        return {"task_id": self.id, "status": status, "result": result, "traceback": None,
                "children": [], "date_done": None, "name": name}

    def _get_task_meta(self) -> dict[str, Any]:
        record = self.record()
        if self._eager_holds_result(record):
            return dict(self._eager._get_task_meta())  # type: ignore[union-attr]
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
            interval: float = 0.5, **_ignored: Any) -> Any:
        """Wait for the key's outcome: the cached result, or its error raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.01  # start fast: most duplicates ask for a result that is already there
        while True:
            record = self.record()
            if self._eager_holds_result(record):
                return self._eager.get(timeout=timeout, propagate=propagate)  # type: ignore
            if record is not None and record.state is KeyState.SUCCEEDED:
                return decode_result(record, accept=self.accept)
            if record is not None and record.state is KeyState.FAILED:
                error = rebuild_error(record)
                if propagate:
                    raise error
                return error
            if deadline is not None and time.monotonic() >= deadline:
                raise CeleryTimeoutError(
                    f"idempotency key {self.ref.key!r} has no outcome after {timeout} s")
            sleep = pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(sleep)
            pause = min(pause * 2, interval)

    wait = get

    def forget(self) -> None:
        raise NotImplementedError(
            "an idempotent result lives as long as its key; release the key with the CLI")

    def __repr__(self) -> str:
        flag = " duplicate" if self.duplicate else ""
        return f"<IdempotentResult: {self.id} key={self.ref.key!r}{flag}>"


def lookup(app: Any, store: KeyStore, ref: RecordRef, *, serializer: str,
           task_name: str | None) -> IdempotentResult | None:
    """The handle of the task that owns ``ref`` now, or ``None`` when the key is unknown or
    expired. A lookup publishes nothing: the handle is not a duplicate."""
    record = store.get(ref)
    if record is None:
        return None
    return IdempotentResult(record.task_id, store=store, ref=ref, accept=accept_for(serializer),
                            duplicate=False, app=app, task_name=task_name or record.task_name)


def result_for_key(app: Any, key: str, *, scope: str) -> IdempotentResult | None:
    """Rebuild the handle for ``key`` under ``scope`` (a task name by default), from the store
    named by ``app.conf.idempotency_store_url``. ``None`` when the key is unknown or expired."""
    config = resolve(app.conf, {}, task_name=scope)
    store = store_for_app(app, config.store_url, prefix=config.key_prefix,
                          timeout=config.store_timeout)
    return lookup(app, store, RecordRef(scope, key), serializer=config.result_serializer,
                  task_name=None)
