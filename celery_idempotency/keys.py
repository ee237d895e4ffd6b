"""Idempotency keys: validation, derivation from a task's bound arguments, and fingerprints.

A fingerprint is computed once at publish and again (for messages that did not come through
``apply_async``) at execution, after the arguments went through the task serializer. The
canonical form therefore only admits values that survive a JSON round trip unchanged in meaning:
tuples become lists, datetimes and UUIDs become tagged strings, and anything else is refused
with an error that names the argument, instead of producing a key that silently differs.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import hashlib
import inspect
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .exceptions import ArgumentsNotCanonical, ConfigurationError, InvalidIdempotencyKey

MAX_KEY_LENGTH = 255
# Nesting allowed in arguments that make a key or fingerprint: far beyond real payloads, well
# within Python's recursion limit (also in the serializer that encodes the message).
MAX_ARGUMENT_DEPTH = 100
_DIGEST_CHARS = 32  # 128 bits of SHA-256 (derived keys): collision-free for any realistic count
# A fingerprint only tells apart two payloads sent under the same key (a client bug), so 64
# bits do: a miss needs two different payloads under one key *and* a 1-in-2^64 collision. It
# is stored in every record: 16 bytes saved per record (docs/benchmarks.md, memory).
_FINGERPRINT_CHARS = 16
# A record's name: 126 bits of SHA-256 as 21 base64url characters. With the default prefix the
# name is 28 bytes (``idem:{<21>}``), which Redis allocates in jemalloc's 32-byte class; 32 hex
# characters made it 39 bytes, allocated 48.
_RECORD_DIGEST_CHARS = 21

KeyFunc = Callable[[Sequence[Any], Mapping[str, Any]], str]
# C0 controls, DEL and C1 controls: one regex search instead of a Python loop over the key.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class RecordRef:
    """Identifies one record: the key as given, under its scope."""

    scope: str
    key: str

    def store_key(self, prefix: str) -> str:
        """Bounded, Cluster-safe name: the whole digest is the hash tag, so one slot per record.

        The user's key never appears in the name, so it can be neither a glob pattern nor an
        unbounded key name; the record keeps the original key in a field instead.
        """
        return f"{prefix}{{{record_digest(self.scope, self.key)}}}"


def record_digest(scope: str, key: str) -> str:
    """The hash tag of a record's name: 126 bits of SHA-256 of scope and key, base64url
    (``A-Z a-z 0-9 - _``: no glob character, no brace)."""
    raw = hashlib.sha256(f"{scope}\x00{key}".encode()).digest()
    return base64.urlsafe_b64encode(raw).decode("ascii")[:_RECORD_DIGEST_CHARS]


def validate_key(key: object, *, what: str = "idempotency key") -> str:
    """Return ``key`` if it is acceptable, else raise `InvalidIdempotencyKey` saying why."""
    if not isinstance(key, str):
        raise InvalidIdempotencyKey(
            f"{what} must be a string, not {type(key).__name__}", key=repr(key)[:80])
    if not key:
        raise InvalidIdempotencyKey(f"{what} must not be empty", key=key)
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey(
            f"{what} is {len(key)} characters long; the limit is {MAX_KEY_LENGTH}",
            key=key[:40] + "...")
    control = _CONTROL.search(key)
    if control is not None:
        raise InvalidIdempotencyKey(
            f"{what} contains the control character U+{ord(control.group()):04X}",
            key=repr(key)[:80])
    return key


def _canonical(value: Any, path: str, depth: int = 0,
               containing: set[int] | None = None) -> Any:
    kind = type(value)  # the usual types first, by identity (isinstance chains add up)
    if kind is str or kind is int or kind is bool:
        return value
    if kind is dict or kind is list or kind is tuple:
        return _canonical_container(value, path, depth,
                                    set() if containing is None else containing)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ArgumentsNotCanonical(
                f"argument {path} is {value!r}, which has no canonical JSON form")
        return value
    if isinstance(value, (list, tuple, Mapping)):
        return _canonical_container(value, path, depth,
                                    set() if containing is None else containing)
    # Tagged so that e.g. the string "2024-01-01" and a date of that day differ.
    if isinstance(value, datetime.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, datetime.date):
        return {"$date": value.isoformat()}
    if isinstance(value, datetime.time):
        return {"$time": value.isoformat()}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, bytes):
        # kombu's JSON (and msgpack, pickle) round-trip bytes; Celery passes them (e.g. to a
        # callback), so they must have a key of their own.
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    raise ArgumentsNotCanonical(
        f"argument {path} of type {type(value).__qualname__} cannot be canonicalised for an "
        "idempotency key; pass idempotency_key=..., or set idempotency_key_fields or "
        "idempotency_key_func on the task")


def _canonical_container(value: Any, path: str, depth: int, containing: set[int]) -> Any:
    # Checked here rather than left to RecursionError: a structure that contains itself, or
    # one nested deeper than any JSON serializer takes, gets an error naming where it is.
    if id(value) in containing:
        raise ArgumentsNotCanonical(
            f"argument {path} contains itself (a recursive structure has no JSON form)")
    if depth > MAX_ARGUMENT_DEPTH:  # depth 0: the whole set of arguments
        raise ArgumentsNotCanonical(
            f"argument {path[:80]}... is nested more than {MAX_ARGUMENT_DEPTH} levels deep; pass "
            "idempotency_key=..., or set idempotency_key_fields or idempotency_key_func")
    containing.add(id(value))
    try:
        if not isinstance(value, Mapping):
            return [_canonical(item, f"{path}[{index}]", depth + 1, containing)
                    for index, item in enumerate(value)]
        out: dict[str, Any] = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise ArgumentsNotCanonical(
                    f"argument {path} has a non-string key {name!r}; JSON would change it")
            out[name] = _canonical(item, f"{path}[{name!r}]", depth + 1, containing)
        return out
    finally:
        containing.discard(id(value))


def canonical_json(value: Any, path: str = "arguments") -> str:
    return json.dumps(_canonical(value, path), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_DIGEST_CHARS]


def signature_of(func: Callable[..., Any]) -> inspect.Signature | None:
    """The signature to bind calls to; None for callables without one (some builtins)."""
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):
        return None


def bind_arguments(func: Callable[..., Any] | inspect.Signature | None, args: Sequence[Any],
                   kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Bind a call to ``func``'s parameters, defaults applied: f(1), f(x=1) bind the same."""
    signature = func if isinstance(func, inspect.Signature) or func is None \
        else signature_of(func)
    if signature is None:  # no signature to bind to: use the call as given
        return {"args": list(args), "kwargs": dict(kwargs)}
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ArgumentsNotCanonical(f"arguments do not fit the task's signature: {exc}") from exc
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            arguments[name] = list(arguments.get(name, ()))
    return arguments


class Binder:
    """`bind_arguments` for one signature, prepared once (per task): a call that fits a
    signature of plain parameters (no ``*args``, ``**kwargs``, positional- or keyword-only)
    is bound without `inspect.Signature.bind`, which costs more than the rest of a key's
    derivation. Anything else, and every call that does not fit (to raise its error), goes
    through `bind_arguments`: the result is the same dict, in parameter order."""

    __slots__ = ("_defaults", "_names", "signature")

    def __init__(self, signature: inspect.Signature | None) -> None:
        self.signature = signature
        self._names: tuple[str, ...] | None = None
        self._defaults: dict[str, Any] = {}
        if signature is None:
            return
        parameters = signature.parameters.values()
        if all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters):
            self._names = tuple(signature.parameters)
            self._defaults = {p.name: p.default for p in parameters
                              if p.default is not inspect.Parameter.empty}

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        names = self._names
        if names is None or len(args) > len(names):
            return bind_arguments(self.signature, args, kwargs)
        arguments = dict(zip(names, args, strict=False))  # len(args) <= len(names)
        if kwargs or len(arguments) < len(names):
            defaults = self._defaults
            used = 0
            for name in names[len(args):]:
                if name in kwargs:
                    arguments[name] = kwargs[name]
                    used += 1
                elif name in defaults:
                    arguments[name] = defaults[name]
                else:  # missing: Signature.bind says so
                    return bind_arguments(self.signature, args, kwargs)
            if used != len(kwargs):  # unknown or given twice: Signature.bind says so
                return bind_arguments(self.signature, args, kwargs)
        return arguments


def arguments_digest(arguments: Mapping[str, Any]) -> str:
    """128-bit digest of the canonical bound arguments: the key derived from all arguments
    (`derive_key`), and the fingerprint's source."""
    return digest(canonical_json(dict(arguments)))


def fingerprint_of(arguments_digest: str) -> str:
    """The fingerprint that `arguments_digest` gives (its first 64 bits)."""
    return arguments_digest[:_FINGERPRINT_CHARS]


def fingerprint(arguments: Mapping[str, Any]) -> str:
    """64-bit digest of the canonical bound arguments: the same key must come with the same
    payload."""
    return fingerprint_of(arguments_digest(arguments))


def derive_key(arguments: Mapping[str, Any], *, fields: Sequence[str] | None,
               func: KeyFunc | None, args: Sequence[Any], kwargs: Mapping[str, Any],
               full_digest: str | None = None) -> str:
    """Derive a key when the caller gave none: from a callable, a field subset, or everything.
    ``full_digest``: `arguments_digest` of ``arguments``, when already computed."""
    if func is not None:
        return validate_key(func(args, kwargs), what="key returned by idempotency_key_func")
    if fields:
        missing = [name for name in fields if name not in arguments]
        if missing:
            raise ConfigurationError(
                f"idempotency_key_fields names {missing!r}, which the task does not take "
                f"(its parameters: {sorted(arguments)!r})")
        selected = {name: arguments[name] for name in fields}
        return "fields:" + digest(canonical_json(selected))
    # All arguments: the whole 128-bit digest (the fingerprint is only its first 64 bits: a
    # key is an identity, where a collision would replay another payload's outcome).
    return "args:" + (full_digest if full_digest is not None else arguments_digest(arguments))
