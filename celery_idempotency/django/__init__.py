"""Django: an idempotent task that publishes when the database transaction commits.

Celery's Django fix-up makes ``celery.contrib.django.task.DjangoTask`` the app's task class,
which adds ``delay_on_commit`` / ``apply_async_on_commit`` (``transaction.on_commit``).
``base=IdempotentTask`` would replace it; `IdempotentDjangoTask` is both, so a Django project
keeps those methods with idempotency keys:

- At the call, inside the transaction, everything that can be checked is checked, so that an
  error rolls the transaction back with the rest of the request: the key (explicit, from
  ``with idempotency_key(...)``, or derived), the arguments, the options, and the key already
  used with other arguments (`IdempotencyKeyMismatch`, read from the store). An unreachable
  store raises `StoreUnavailable` here (``fail_closed``).
- When the transaction commits, the key is reserved and the message published, exactly as
  ``apply_async`` does. When it rolls back, nothing happens: no reservation, no message.
- The call returns a `PendingPublish`: the resolved key at once, the result handle once the
  transaction has committed (Celery's own methods return None).
- A publish that fails at commit (store or broker down, a concurrent request that took the key
  with other arguments) is logged at ERROR with the task and the key, kept on
  ``PendingPublish.error``, and raised as Django raises any ``on_commit`` callback's error:
  from the code that committed, or, with ``robust=True``, only logged by Django. The
  transaction is committed by then; publishing again with the same key (a client retry with
  the same ``Idempotency-Key``) sends it once.

Needs Django (``pip install 'celery-idempotency[django]'``); the rest of the package does not.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    # Django ships no type hints (django-stubs is a separate project, not needed here).
    from django.db import transaction  # type: ignore[import-untyped,unused-ignore]
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without Django
    raise ImportError(
        "celery_idempotency.django needs Django: pip install 'celery-idempotency[django]'"
    ) from exc

from celery.contrib.django.task import DjangoTask  # Celery >= 5.4

from ..celery_compat import dump_pydantic_arguments
from ..config import KEY_HEADER, PREFIX, reject_unknown_names
from ..exceptions import IdempotencyKeyMismatch, StoreUnavailable
from ..protocol import KeyTarget
from ..signals import current_idempotency_key
from ..store.base import mismatch_error
from ..task import IdempotentTask, _message_options

__all__ = ["IdempotentDjangoTask", "PendingPublish"]

logger = logging.getLogger("celery_idempotency")


class PendingPublish:
    """What ``apply_async_on_commit`` / ``delay_on_commit`` return.

    ``key`` and ``scope`` are known at the call (None for a task that is not deduplicated).
    ``result`` is the handle ``apply_async`` returned (an `IdempotentResult`; ``.duplicate``
    when the key was already taken) once the transaction has committed, and stays None if it
    rolled back. ``error`` is the exception of a publish that failed at commit."""

    __slots__ = ("error", "key", "result", "scope", "task_name")

    def __init__(self, task_name: str, key: str | None, scope: str | None) -> None:
        self.task_name = task_name
        self.key = key
        self.scope = scope
        # An IdempotentResult; Celery's AsyncResult when published unprotected (fail_open).
        self.result: Any = None
        self.error: BaseException | None = None

    @property
    def published(self) -> bool:
        """The commit happened and ``apply_async`` returned (sent, or a duplicate)."""
        return self.result is not None

    def __repr__(self) -> str:
        state = ("failed" if self.error is not None
                 else "published" if self.published else "waiting for commit")
        return f"<PendingPublish {self.task_name} key={self.key!r} {state}>"


class IdempotentDjangoTask(IdempotentTask, DjangoTask):  # type: ignore[misc]  # DjangoTask: Any
    """`IdempotentTask` with Django's ``delay_on_commit`` / ``apply_async_on_commit``.

    ``@shared_task(base=IdempotentDjangoTask)``, or for every task of the app
    ``Celery(..., task_cls="celery_idempotency.django:IdempotentDjangoTask")`` (Celery's fix-up
    then leaves the task class alone)."""

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> PendingPublish:
        """``delay`` when the transaction commits (the key of an enclosing
        ``with idempotency_key(...)`` is taken now, at the call)."""
        return self.apply_async_on_commit(args, kwargs)

    def apply_async_on_commit(self, args: Any = None, kwargs: Any = None, *,
                              using: str | None = None, robust: bool = False,
                              **options: Any) -> PendingPublish:
        """``apply_async(args, kwargs, **options)`` when the transaction on database ``using``
        commits; nothing if it rolls back. ``robust`` is ``transaction.on_commit``'s: a publish
        that fails at commit is then only logged instead of raised."""
        target = self._check_before_commit(args, kwargs, options)
        if target is not None:
            # Published under the key checked now: a ``with idempotency_key(...)`` block
            # around the call may be over by the time the transaction commits.
            options[KEY_HEADER] = target.ref.key
        pending = PendingPublish(self.name, target.ref.key if target else None,
                                 target.ref.scope if target else None)

        def publish_on_commit() -> None:
            try:
                pending.result = self.apply_async(args, kwargs, **options)
            except Exception as exc:
                pending.error = exc
                logger.error("%s key=%r scope=%r: the transaction committed but the task was "
                             "NOT published (%s: %s); %s", self.name, pending.key,
                             pending.scope, type(exc).__name__, exc, _what_now(exc),
                             exc_info=True)
                raise

        # Django's own log line for a robust callback names the callback: make it the task.
        publish_on_commit.__qualname__ = f"{self.name}.apply_async_on_commit"
        transaction.on_commit(publish_on_commit, using=using, robust=robust)
        return pending

    def _check_before_commit(self, args: Any, kwargs: Any,
                             options: dict[str, Any]) -> KeyTarget | None:
        """What ``apply_async`` would refuse at commit, raised now, inside the transaction.

        None when the task is not deduplicated. The store is only read: the key is reserved
        at commit (a reservation here could not be taken back on rollback if the process
        died in between)."""
        idem_options = {name: value for name, value in options.items()
                        if name.startswith(PREFIX) and name != KEY_HEADER}
        reject_unknown_names(list(idem_options), "apply_async_on_commit option(s)")
        config = self.idem_config()
        config.with_message_options(idem_options)  # validates scope and ttl
        if not config.enabled:
            return None
        headers = dict(options.get("headers") or {})
        key = options.get(KEY_HEADER)
        if key is None:  # as apply_async resolves it
            key = headers.get(KEY_HEADER) or current_idempotency_key()
        args, kwargs = dump_pydantic_arguments(self, args, kwargs, dict(options))
        target = self.key_target(
            args, kwargs, key=key,
            message_options={**_message_options(headers), **_message_options(idem_options)})
        try:
            record = self.idem_store(target.config).get(target.ref)
        except StoreUnavailable:
            if not target.config.fail_open:
                raise
            logger.warning("idempotency store unreachable; %s key=%r is not checked before "
                           "the commit (idempotency_on_store_error='fail_open')",
                           self.name, target.ref.key)
            return target
        # The same comparison the store's reserve makes at commit: any live record counts.
        if record is not None and record.fingerprint != target.fingerprint:
            raise mismatch_error(target.ref, record)
        return target


def _what_now(exc: Exception) -> str:
    """The on-call engineer's next step after a publish that failed at commit."""
    if isinstance(exc, IdempotencyKeyMismatch):
        return ("another publish took the key with other arguments before this transaction "
                "committed: this request needs a new key")
    return ("publish it again with the same key (a client retry with the same Idempotency-Key "
            "does); a reservation left behind is taken over after idempotency_pending_timeout, "
            "or release it with the CLI")
