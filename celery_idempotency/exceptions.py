"""One exception root for everything this library raises.

Every error carries the idempotency ``key`` (and ``task_id`` where it is known) so that a log
line or an API error response can name the request it is about.
"""

from __future__ import annotations


class IdempotencyError(Exception):
    """Root of every error raised by celery-idempotency."""

    def __init__(self, message: str, *, key: str | None = None, task_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.key = key
        self.task_id = task_id

    def __str__(self) -> str:
        details = [f"{name}={value!r}" for name, value in
                   (("key", self.key), ("task_id", self.task_id)) if value is not None]
        return f"{self.message} ({', '.join(details)})" if details else self.message

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments are lost by the default pickling of exceptions; Celery pickles
        # exceptions raised in prefork children, so keep key/task_id across the process boundary.
        return (_rebuild, (type(self), self.message, self.key, self.task_id))


def _rebuild(cls: type[IdempotencyError], message: str, key: str | None,
             task_id: str | None) -> IdempotencyError:
    error = cls.__new__(cls)
    IdempotencyError.__init__(error, message, key=key, task_id=task_id)
    return error


class ConfigurationError(IdempotencyError, ValueError):
    """A setting or task option is missing, unknown or has an invalid value."""


class InvalidIdempotencyKey(IdempotencyError, ValueError):
    """The idempotency key given by the caller is not acceptable (HTTP analogue: 400)."""


class IdempotencyKeyRequired(InvalidIdempotencyKey):
    """The task has ``idempotency_require_key=True`` and no explicit key was given."""


class ArgumentsNotCanonical(IdempotencyError, TypeError):
    """Task arguments cannot be turned into a stable fingerprint (or do not fit the task)."""


class IdempotencyKeyMismatch(IdempotencyError):
    """The key was already used with different arguments (HTTP analogue: 422).

    Reusing a key for another payload is a client bug; it is never silently deduplicated.
    """


class BulkPublishError(IdempotencyError):
    """Some calls of ``apply_many`` met an error (`IdempotentTask.apply_many`).

    The others were published (or found to be duplicates) all the same: ``results`` has one
    entry per call, in call order, the call's handle or the exception it met; ``errors`` maps
    the index of each failed call to its exception. The first error is the ``__cause__``.
    """

    def __init__(self, message: str, results: list[object]) -> None:
        super().__init__(message)
        self.results = results
        self.errors = {index: result for index, result in enumerate(results)
                       if isinstance(result, BaseException)}

    def __reduce__(self) -> tuple[object, ...]:
        # Pickled (raised in a task, stored by a pickle result backend): the errors survive,
        # the handles (bound to this process's app and store) come back as None.
        return (_rebuild_bulk, (self.message, len(self.results), self.errors))


def _rebuild_bulk(message: str, count: int,
                  errors: dict[int, BaseException]) -> BulkPublishError:
    return BulkPublishError(message, [errors.get(index) for index in range(count)])


class StoreUnavailable(IdempotencyError):
    """The key store could not be reached; nothing was published or run unprotected."""


class StoreMisconfigured(IdempotencyError):
    """The store answers, but refuses for good (ACL ``NOPERM``, a policy that evicts records,
    a missing script or command): retrying cannot help; the message names what to change."""


class CorruptRecord(IdempotencyError):
    """A record in the store cannot be decoded (written by something else, or damaged)."""


class OwnershipLost(IdempotencyError):
    """A worker tried to write a key it no longer owns (its lease expired and was taken over)."""


class InvalidStep(IdempotencyError, ValueError):
    """A recovery point (`IdempotentTask.step`) was misused: a name that is not acceptable, or
    a name that already ran in this run of the task (each step needs its own name)."""


class StepValueNotStored(IdempotencyError):
    """A step ran, but its return value cannot be recorded (not serializable with the task's
    ``idempotency_result_serializer``, or over ``idempotency_max_result_bytes``). Nothing was
    recorded: the next attempt runs the step again."""


class LeaseExpired(OwnershipLost):
    """The claim's lease ran out before a step could start (the lease keeper could not renew it
    in time); nobody took the key over yet, but anyone may at any moment."""


class ResultNotStored(IdempotencyError):
    """The task succeeded, but its result could not be cached (not serializable or too large)."""


class ReplayedTaskError(IdempotencyError):
    """A cached task error, replayed as this stand-in rather than as its original class.

    A replay raises the original class only when that is safe and wanted; otherwise this:
    for control-flow exceptions (``Retry``, ``Reject``, ``WorkerLostError``, time limits,
    anything that is not an ``Exception``), for classes not listed in
    ``idempotency_cache_errors`` (their constructors are not run by a replay), for classes not
    imported in this process, and for arguments that do not rebuild the class.

    ``error_type`` is the original class's qualified name (``"shop.errors.Declined"``),
    ``message`` its ``str()`` and ``error_args`` its arguments (JSON values; None when they were
    not JSON or over the size cap).
    """

    def __init__(self, message: str, error_type: str, *, error_args: list[object] | None = None,
                 key: str | None = None, task_id: str | None = None):
        super().__init__(message, key=key, task_id=task_id)
        self.error_type = error_type
        self.error_args = error_args
        # What Celery's JSON result backend stores and calls the class with when it reads the
        # error back: so `except ReplayedTaskError` also works on a plain AsyncResult.
        self.args = (message, error_type)

    def __str__(self) -> str:
        return f"{self.error_type}: {super().__str__()}"

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_replayed, (self.message, self.error_type, self.key, self.task_id,
                                    self.error_args))


def _rebuild_replayed(message: str, error_type: str, key: str | None, task_id: str | None,
                      error_args: list[object] | None = None) -> ReplayedTaskError:
    return ReplayedTaskError(message, error_type, error_args=error_args, key=key,
                             task_id=task_id)
