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


class StoreUnavailable(IdempotencyError):
    """The key store could not be reached; nothing was published or run unprotected."""


class CorruptRecord(IdempotencyError):
    """A record in the store cannot be decoded (written by something else, or damaged)."""


class OwnershipLost(IdempotencyError):
    """A worker tried to write a key it no longer owns (its lease expired and was taken over)."""


class ResultNotStored(IdempotencyError):
    """The task succeeded, but its result could not be cached (not serializable or too large)."""


class ReplayedTaskError(IdempotencyError):
    """Stand-in for a cached task error whose original exception class cannot be rebuilt."""

    def __init__(self, message: str, *, error_type: str, key: str | None = None,
                 task_id: str | None = None):
        super().__init__(message, key=key, task_id=task_id)
        self.error_type = error_type

    def __str__(self) -> str:
        return f"{self.error_type}: {super().__str__()}"

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_replayed, (self.message, self.error_type, self.key, self.task_id))


def _rebuild_replayed(message: str, error_type: str, key: str | None,
                      task_id: str | None) -> ReplayedTaskError:
    return ReplayedTaskError(message, error_type=error_type, key=key, task_id=task_id)
