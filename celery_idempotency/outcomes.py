"""Encoding task outcomes for the store: results through kombu's serializer registry, errors as
plain JSON. Nothing read back from the store can execute code unless the user explicitly chose
pickle for results; errors are rebuilt only from classes that are already imported.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from kombu.exceptions import ContentDisallowed, DecodeError, EncodeError
from kombu.serialization import dumps, loads

from .exceptions import CorruptRecord, ReplayedTaskError, ResultNotStored
from .records import Record, ResultStatus
from .store.base import ResultPayload

logger = logging.getLogger("celery_idempotency")

_EMPTY = b""


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


def encode_error(exc: BaseException) -> str:
    cls = type(exc)
    try:
        args = json.loads(json.dumps(list(exc.args)))
    except (TypeError, ValueError):
        args = None
    return json.dumps({"type": f"{cls.__module__}.{cls.__qualname__}", "message": str(exc),
                       "args": args})


def rebuild_error(record: Record) -> BaseException:
    """The cached error as an exception to raise. The original class when it is already
    imported and can be rebuilt from its arguments; otherwise a `ReplayedTaskError` naming it.
    Never imports a module named by the store (that would run code chosen by whoever wrote it).
    """
    error = record.error or {}
    type_name = str(error.get("type", "Exception"))
    message = str(error.get("message", ""))
    module_name, _, qualname = type_name.rpartition(".")
    target: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    args = error.get("args")
    if isinstance(target, type) and issubclass(target, Exception) and isinstance(args, list):
        try:
            rebuilt = target(*args)
        except Exception:  # any constructor failure means: use the stand-in
            rebuilt = None
        if rebuilt is not None:
            return rebuilt
    return ReplayedTaskError(message, error_type=type_name, key=record.key,
                             task_id=record.task_id)
