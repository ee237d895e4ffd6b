"""Encoding task outcomes for the store: results through kombu's serializer registry, errors as
plain JSON. Nothing read back from the store can execute code unless the user explicitly chose
pickle for results; errors are rebuilt only under the rules of `rebuild_error`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from billiard.exceptions import (
    CoroStop,
    RestartFreqExceeded,
    SoftTimeLimitExceeded,
    Terminated,
    TimeLimitExceeded,
    WorkerLostError,
)
from celery.exceptions import TaskPredicate
from kombu.exceptions import ContentDisallowed, DecodeError, EncodeError
from kombu.serialization import dumps, loads

from .config import IdempotencyConfig
from .exceptions import CorruptRecord, ReplayedTaskError, ResultNotStored
from .records import Record, ResultStatus
from .store.base import ResultPayload

logger = logging.getLogger("celery_idempotency")

_EMPTY = b""
DEFAULT_MAX_BYTES: int = IdempotencyConfig.max_result_bytes


def encode_result(value: Any, *, serializer: str, max_bytes: int, key: str,
                  task_id: str) -> ResultPayload:
    """Serialize a result. If it cannot be stored, the success is still recorded (and logged)."""
    try:
        content_type, encoding, data = dumps(value, serializer=serializer)  # type: ignore[no-untyped-call]
    except (EncodeError, TypeError, ValueError) as exc:
        logger.warning("task %s succeeded but its result cannot be serialized with %r (%s); "
                       "the key %r is recorded as succeeded without a cached result",
                       task_id, serializer, exc, key)
        return ResultPayload(_EMPTY, "application/json", "utf-8",
                             ResultStatus.UNSERIALIZABLE.value)
    raw = data.encode(encoding) if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        logger.warning("task %s succeeded but its result is %d bytes, over "
                       "idempotency_max_result_bytes=%d; the key %r is recorded as succeeded "
                       "without a cached result", task_id, len(raw), max_bytes, key)
        return ResultPayload(_EMPTY, "application/json", "utf-8", ResultStatus.TOO_LARGE.value)
    return ResultPayload(raw, content_type, encoding, ResultStatus.STORED.value)


def decode_result(record: Record, *, accept: Sequence[str]) -> Any:
    """The cached result of a succeeded record. Raises `ResultNotStored` when there is none."""
    if record.result_status is not ResultStatus.STORED:
        raise ResultNotStored(
            f"the task succeeded but its result was not cached ({record.result_status.value})",
            key=record.key, task_id=record.task_id)
    try:
        return loads(  # type: ignore[no-untyped-call]
            record.result or b"", record.content_type, record.content_encoding, accept=accept)
    except ContentDisallowed as exc:
        raise CorruptRecord(
            f"record {record.store_key!r} holds a {record.content_type} result, which the "
            f"configured idempotency_result_serializer does not accept", key=record.key,
            task_id=record.task_id) from exc
    except (DecodeError, ValueError, TypeError) as exc:
        raise CorruptRecord(f"record {record.store_key!r} holds an undecodable result: {exc}",
                            key=record.key, task_id=record.task_id) from exc


# -- errors ----------------------------------------------------------------------------------
#
# A cached error is replayed by raising it again: in a worker (a duplicate message of a key that
# failed for good) and in every `IdempotentResult.get()`. What is raised must never steer Celery
# (a rebuilt WorkerLostError or Reject makes the worker requeue the message, again on every
# replay) and must not run code the user did not choose to run on a replay (constructors).

#: Exceptions that tell Celery's worker what to do with the message or the pool child rather
#: than report a failure. A replay never raises them; they come back as `ReplayedTaskError`.
#: Every class that is not an ``Exception`` (SystemExit and Celery's WorkerShutdown and
#: WorkerTerminate, KeyboardInterrupt, GeneratorExit, asyncio's CancelledError, GreenletExit)
#: is treated the same way. ``MemoryError`` is here because the worker re-raises it in its main
#: process.
CONTROL_FLOW_ERRORS: tuple[type[BaseException], ...] = (
    TaskPredicate,  # Retry, Ignore, Reject
    WorkerLostError, Terminated, TimeLimitExceeded, SoftTimeLimitExceeded,
    RestartFreqExceeded, CoroStop, MemoryError,
)

#: Packages whose exception classes are rebuilt without being listed: their constructors run
#: no user code (``ValueError``, Celery's ``TaskRevokedError``, this library's errors), so
#: ``except KeyError`` or ``except TaskRevokedError`` around ``.get()`` works as with Celery.
TRUSTED_PACKAGES = frozenset({"builtins", "celery", "billiard", "kombu", "celery_idempotency"})

_MAX_TYPE_CHARS = 1000  # a class name longer than this is not a name anybody looks up


def is_control_flow(cls: type[BaseException]) -> bool:
    """True for the exceptions a replay must never raise (see `CONTROL_FLOW_ERRORS`)."""
    return not issubclass(cls, Exception) or issubclass(cls, CONTROL_FLOW_ERRORS)


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    try:
        name = f"{cls.__module__}.{cls.__qualname__}"
    except Exception:  # a class with a broken __module__/__qualname__ descriptor
        name = "builtins.Exception"
    return name[:_MAX_TYPE_CHARS]


def _message(exc: BaseException, type_name: str) -> str:
    """``str(exc)``, which is user code and may raise; then ``repr``, then a placeholder."""
    why = "str() and repr() failed"
    for render in (str, repr):
        try:
            text = render(exc)
        except Exception as failure:
            why = f"{render.__name__}() raised {type(failure).__name__}"
            continue
        if isinstance(text, str):
            return text
    return f"<unprintable {type_name}: {why}>"


def _json_args(exc: BaseException) -> list[Any] | None:
    """The exception's arguments as JSON values, or None when they are not JSON (or reading
    them raises: ``args`` may be a user property, deep or circular)."""
    try:
        return list(json.loads(json.dumps(list(exc.args))))
    except Exception:
        return None


def encode_error(exc: BaseException, *, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The error as stored in a record: JSON ``{"type", "message", "args"}``. Never raises: a
    failing ``__str__`` or arguments that are not JSON must not cost the task its outcome.

    Errors share the results' cap (``idempotency_max_result_bytes``): over it, the arguments
    are dropped first (``"args_dropped": true``), then the message is cut (``"truncated":
    true``, and a note at its end says how long it was). The type name is always kept.
    """
    type_name = _type_name(exc)
    message = _message(exc, type_name)
    args = _json_args(exc)
    document: dict[str, Any] = {"type": type_name, "message": message, "args": args}
    text = json.dumps(document)  # ASCII (ensure_ascii): its length is its size in bytes
    if len(text) <= max_bytes:
        return text
    if args is not None:
        document.update(args=None, args_dropped=True)
        text = json.dumps(document)
        if len(text) <= max_bytes:
            return text
    note = (f" [truncated by celery-idempotency: the message had {len(message)} characters, "
            f"over idempotency_max_result_bytes={max_bytes}]")
    document["truncated"] = True
    document["message"] = note
    cut = max(0, min(len(message), max_bytes - len(json.dumps(document))))
    while True:
        document["message"] = message[:cut] + note
        text = json.dumps(document)
        excess = len(text) - max_bytes
        if excess <= 0 or cut == 0:
            return text
        cut = max(0, cut - excess)  # each character costs at least one byte


def _resolve_class(type_name: str) -> type | None:
    """The class named ``module.Qual.Name`` if its module is already imported.

    Looked up in the modules' and classes' own ``__dict__`` (no ``getattr``: a module's
    ``__getattr__`` may import more, a metaclass property may run code), the longest imported
    module prefix first, so that nested classes (``Model.DoesNotExist``) are found; accepted
    only if the class found really has that module and qualified name (not an alias).
    """
    parts = type_name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name, qualname = ".".join(parts[:split]), ".".join(parts[split:])
        target: Any = sys.modules.get(module_name)
        if target is None:
            continue
        for part in parts[split:]:
            try:
                target = vars(target).get(part)
            except TypeError:  # an object without a __dict__
                target = None
            if target is None:
                break
        if (isinstance(target, type) and getattr(target, "__module__", None) == module_name
                and getattr(target, "__qualname__", None) == qualname):
            return target
    return None


def rebuild_error(record: Record, *,
                  replayable: tuple[type[BaseException], ...] = ()) -> Exception:
    """The cached error of ``record`` as an exception to raise.

    The original class is rebuilt, with its stored arguments, only when the class is already
    imported (a module named by the store is never imported), is not a control-flow exception
    (`is_control_flow`), and either comes from `TRUSTED_PACKAGES` or is ``replayable``: listed
    in the task's ``idempotency_cache_errors`` or a subclass of one listed, i.e. the user opted
    into running its constructor on a replay. Anything else, or a constructor that fails,
    becomes a `ReplayedTaskError` carrying the original type name, message and arguments.
    """
    error = record.error or {}
    type_name = str(error.get("type", "builtins.Exception"))[:_MAX_TYPE_CHARS]
    message = error.get("message")
    message = message if isinstance(message, str) else ""
    args = error.get("args")
    args = args if isinstance(args, list) else None
    cls = _resolve_class(type_name)
    if (cls is not None and args is not None and issubclass(cls, BaseException)
            and not is_control_flow(cls)
            and (cls.__module__.partition(".")[0] in TRUSTED_PACKAGES
                 or issubclass(cls, replayable))):
        try:
            rebuilt = cls(*args)
        except Exception:  # the stored arguments do not fit: use the stand-in
            rebuilt = None
        if isinstance(rebuilt, Exception) and not is_control_flow(type(rebuilt)):
            return rebuilt
    return ReplayedTaskError(message, error_type=type_name, error_args=args, key=record.key,
                             task_id=record.task_id)
