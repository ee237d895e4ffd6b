"""HTTP helpers for API handlers: read an ``Idempotency-Key`` header and map outcomes to the
status codes of the IETF httpapi "The Idempotency-Key HTTP Header Field" draft.

The draft defines the header as a Structured Field string (RFC 8941): ``"8e03978e-..."``, in
double quotes, printable ASCII, with ``\\"`` and ``\\\\`` as the only escapes. Many clients send a
bare token instead (``Idempotency-Key: 8e03978e-...``); both are accepted. The key must then
also be a valid idempotency key (non-empty, at most 255 characters).
"""

from __future__ import annotations

from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeoutError

from .exceptions import (
    IdempotencyError,
    IdempotencyKeyMismatch,
    IdempotencyKeyRequired,
    InvalidIdempotencyKey,
)
from .keys import validate_key
from .records import KeyState

HEADER = "Idempotency-Key"

#: Draft status codes: missing/invalid key, same key with another payload, still in flight.
BAD_REQUEST = 400
UNPROCESSABLE = 422
CONFLICT = 409
ACCEPTED = 202

_TOKEN_EXTRA = set("!#$%&'*+-.^_`|~:/=")


def _sf_string(value: str) -> str:
    out: list[str] = []
    chars = iter(value[1:-1])
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped not in ('"', "\\"):
                raise InvalidIdempotencyKey(
                    f"{HEADER} header has an invalid escape in its quoted string", key=value)
            out.append(escaped)
        elif char == '"':
            raise InvalidIdempotencyKey(
                f"{HEADER} header has an unescaped quote inside its quoted string", key=value)
        elif not " " <= char <= "~":
            raise InvalidIdempotencyKey(
                f"{HEADER} header must be printable ASCII", key=repr(value)[:80])
        else:
            out.append(char)
    return "".join(out)


def parse_idempotency_key(value: str | None, *, required: bool = True) -> str | None:
    """The key from an ``Idempotency-Key`` header value.

    Raises `IdempotencyKeyRequired` when it is missing and ``required``, and
    `InvalidIdempotencyKey` when it is empty, too long or malformed (both map to 400).
    """
    if value is None:
        if required:
            raise IdempotencyKeyRequired(f"the {HEADER} header is required")
        return None
    value = value.strip(" \t")
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        key = _sf_string(value)
    elif '"' in value:
        raise InvalidIdempotencyKey(f"{HEADER} header has an unbalanced quote", key=value[:80])
    elif value and all(c.isascii() and (c.isalnum() or c in _TOKEN_EXTRA) for c in value):
        key = value
    else:
        raise InvalidIdempotencyKey(
            f"{HEADER} header must be a quoted string or a token", key=repr(value)[:80])
    return validate_key(key, what=f"{HEADER} header")


def status_for_error(error: IdempotencyError) -> int:
    """Status code for an error raised while accepting a request (400, 422)."""
    if isinstance(error, IdempotencyKeyMismatch):
        return UNPROCESSABLE
    if isinstance(error, InvalidIdempotencyKey):  # includes IdempotencyKeyRequired
        return BAD_REQUEST
    raise ValueError(f"{type(error).__name__} has no idempotency status code") from error


def status_for_submission(result: Any, *, wait: float = 0.0) -> int:
    """202 for a new submission, and for a retry whose first request has an outcome (the
    same response again); 409 for a retry while the first request is still in flight.
    ``wait`` > 0 first waits up to that many seconds for the outcome (the draft lets the
    server choose to wait instead of answering 409)."""
    if not getattr(result, "duplicate", False):
        return ACCEPTED
    if wait > 0:
        try:
            result.get(timeout=wait, propagate=False)
        except CeleryTimeoutError:
            return CONFLICT
    record = result.record()
    if record is not None and record.state in (KeyState.SUCCEEDED, KeyState.FAILED):
        return ACCEPTED
    return CONFLICT
