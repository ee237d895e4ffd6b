"""The record kept for each idempotency key, and the one place that decodes store replies.

Both stores keep a record as a flat mapping of short field names to bytes (a Redis hash; a dict
in the memory store). Short names matter: there is one record per key, for days, so every byte
of a field name is paid millions of times. For the same reason a state is stored as one letter
(`STATE_CODES`), and a succeeded record keeps only what a replay, the state machine and the CLI
read: no owner token and no creation time (docs/benchmarks.md, memory, has the layout and its
cost). Version 0.1.0 is the first layout: there are no older records to read.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .exceptions import CorruptRecord

# Field names of a record (Redis hash fields). The Lua scripts (store/lua) spell the same names;
# tests/store/test_lua_contract.py checks that they use no other.
F_KEY = "k"  # the key as the client gave it (or as derived)
F_SCOPE = "s"
F_TASK_NAME = "n"  # absent: the same as the scope
F_STATE = "st"  # one letter: STATE_CODES
F_TASK_ID = "t"
F_FINGERPRINT = "fp"  # 16 hex characters (keys.fingerprint)
F_OWNER = "o"  # owner token of the current (or last) claim; a succeeded record drops it
F_LEASE = "l"  # lease expiry, ms since the epoch by the store's clock
F_FENCE = "f"  # fencing counter, bumped by every claim
F_RESULT = "r"
F_CONTENT_TYPE = "ct"  # absent: application/json
F_CONTENT_ENCODING = "ce"  # absent: utf-8
F_RESULT_STATUS = "rs"  # absent: stored
F_ERROR = "e"  # JSON: {"type", "message", "args"}
F_RETRYABLE = "ry"  # "1": a failed key runs again on the next publish
F_PENDING_DEADLINE = "pd"  # pending only: unclaimed by then, the message is taken as lost
F_CREATED = "c"  # a succeeded record drops it (its age counts from F_UPDATED)
F_UPDATED = "u"
# Recovery points (`IdempotentTask.step`): one field per recorded step, named this prefix and the
# step's name, in the record's own hash, so that a step lives and expires with its record and
# shares its hash slot on a Cluster. No record field above starts with it. Step fields are
# dropped when the key's outcome is final (succeeded, or failed and not retryable).
F_STEP_PREFIX = "sp:"
# Parked duplicates (docs/wakeups.md): a duplicate message re-sent because a live owner held the
# key registers itself as a field named this prefix and its task id, valued what it takes to
# publish it again (JSON). The owner's final write hands them back, to publish at once; each
# goes when a copy of its message replays the outcome (or runs the task), or with the record.
F_PARK_PREFIX = "w:"
# Set ("1") when a step is recorded or a duplicate parks, so that a final write, on the hot
# path of every task, reads the whole record only when there is something besides its own
# fields to find (steps to drop, duplicates to hand back). Cleared by the final write that
# leaves neither. A record whose marker is gone by hand keeps its steps until it expires, and
# its parked duplicates wait for their own re-send: nothing runs twice.
F_EXTRAS = "x"
ALL_FIELDS = (F_KEY, F_SCOPE, F_TASK_NAME, F_STATE, F_TASK_ID, F_FINGERPRINT, F_OWNER, F_LEASE,
              F_FENCE, F_RESULT, F_CONTENT_TYPE, F_CONTENT_ENCODING, F_RESULT_STATUS, F_ERROR,
              F_RETRYABLE, F_CREATED, F_UPDATED, F_PENDING_DEADLINE)

# "Absent means default": the values a record leaves out, since nearly every record has them.
JSON_CONTENT_TYPE = "application/json"  # F_CONTENT_TYPE absent
JSON_ENCODING = "utf-8"  # F_CONTENT_ENCODING absent
# F_RESULT_STATUS absent: ResultStatus.STORED (DEFAULT_RESULT_STATUS, below)
# F_TASK_NAME absent: the task name is the scope (`task_name_field`)


class KeyState(str, enum.Enum):
    """Where a key is in its life: reserved, running, or finished with a cached outcome."""

    PENDING = "pending"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


# A record's state as its field holds it: one letter (there is one record per key, for days).
# Upper case, so that no state reads like a field name in the Lua scripts
# (tests/store/test_lua_contract.py); _common.lua names the same letters. The `KeyState`
# values (what users, the CLI and signals see) are never stored.
STATE_CODES: dict[KeyState, str] = {
    KeyState.PENDING: "P",
    KeyState.STARTED: "R",  # running
    KeyState.SUCCEEDED: "D",  # done
    KeyState.FAILED: "F",
}
_STATE_BY_CODE = {code: state for state, code in STATE_CODES.items()}


def state_code(state: KeyState) -> str:
    """``state`` as a record's F_STATE field holds it."""
    return STATE_CODES[state]


class ResultStatus(str, enum.Enum):
    """Whether a succeeded key also holds its result."""

    STORED = "stored"
    UNSERIALIZABLE = "unserializable"
    TOO_LARGE = "too_large"


DEFAULT_RESULT_STATUS = ResultStatus.STORED.value


@dataclass(frozen=True)
class Record:
    """A decoded record. ``store_key`` is the store's name for it (for errors and the CLI)."""

    store_key: str
    key: str
    scope: str
    task_name: str
    state: KeyState
    task_id: str
    fingerprint: str
    owner: str | None
    lease_expires_ms: int | None
    fence: int
    result: bytes | None
    content_type: str
    content_encoding: str
    result_status: ResultStatus
    error: Mapping[str, Any] | None
    retryable: bool
    #: None once succeeded: a succeeded record does not keep its creation time (bytes per
    #: record); `since_ms` is then its completion time.
    created_ms: int | None
    updated_ms: int
    pending_deadline_ms: int | None = None
    #: Names of the recorded steps, sorted (values are not decoded here: see `steps`).
    steps: tuple[str, ...] = ()

    @property
    def since_ms(self) -> int:
        """What a record's age counts from: its creation, or for a record that no longer keeps
        it (succeeded) its last update, i.e. its completion."""
        return self.created_ms if self.created_ms is not None else self.updated_ms

    def lease_expired(self, now_ms: int) -> bool:
        return self.state is KeyState.STARTED and (self.lease_expires_ms or 0) <= now_ms


def result_meta_fields(content_type: str, content_encoding: str,
                       result_status: str) -> dict[str, str]:
    """A result's content type, encoding and status as record fields: only those that differ
    from their default (absent means default)."""
    fields = {}
    if content_type != JSON_CONTENT_TYPE:
        fields[F_CONTENT_TYPE] = content_type
    if content_encoding != JSON_ENCODING:
        fields[F_CONTENT_ENCODING] = content_encoding
    if result_status != DEFAULT_RESULT_STATUS:
        fields[F_RESULT_STATUS] = result_status
    return fields


def step_field(name: str) -> str:
    """The record field holding the value of step ``name``."""
    return F_STEP_PREFIX + name


def is_step_field(field: str) -> bool:
    return field.startswith(F_STEP_PREFIX)


def park_field(task_id: str) -> str:
    """The record field of the parked duplicate ``task_id``."""
    return F_PARK_PREFIX + task_id


def is_park_field(field: str) -> bool:
    return field.startswith(F_PARK_PREFIX)


def without_steps(fields: Mapping[str, bytes]) -> dict[str, bytes]:
    """The record's own fields (what a store's reply carries: never the steps' values, nor the
    parked duplicates)."""
    return {name: value for name, value in fields.items()
            if not (is_step_field(name) or is_park_field(name) or name == F_EXTRAS)}


def encode_step_value(data: bytes, content_type: str, content_encoding: str) -> bytes:
    """A step's serialized value as its field holds it: ``<content type> NUL <encoding> NUL
    <data>``, the content type and encoding empty when they are the default (JSON, UTF-8)."""
    return b"\0".join((
        b"" if content_type == JSON_CONTENT_TYPE else content_type.encode("utf-8"),
        b"" if content_encoding == JSON_ENCODING else content_encoding.encode("utf-8"),
        data))


def decode_step_value(raw: bytes, *, store_key: str, name: str,
                      key: str | None = None) -> tuple[bytes, str, str]:
    """``(data, content type, encoding)`` of a step's field. Raises `CorruptRecord` naming the
    record and the step (its ``key``: ``key`` if given, else the record's store key)."""
    parts = raw.split(b"\0", 2)
    try:
        if len(parts) != 3:
            raise ValueError("no content type")
        content_type = parts[0].decode("utf-8") or JSON_CONTENT_TYPE
        content_encoding = parts[1].decode("utf-8") or JSON_ENCODING
    except ValueError as exc:  # UnicodeDecodeError is one
        raise CorruptRecord(f"record {store_key!r} holds an undecodable value of step "
                            f"{name!r} ({exc})", key=key or store_key) from exc
    return parts[2], content_type, content_encoding


def task_name_field(task_name: str, scope: str) -> dict[str, str]:
    """The task name as a record field: none when it is the scope (the default scope)."""
    return {} if task_name == scope else {F_TASK_NAME: task_name}


def _text(fields: Mapping[str, bytes], name: str, store_key: str,
          default: str | None = None) -> str:
    raw = fields.get(name)
    if raw is None:
        if default is not None:
            return default
        raise CorruptRecord(f"record {store_key!r} has no field {name!r}", key=store_key)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptRecord(f"record {store_key!r} field {name!r} is not UTF-8",
                            key=store_key) from exc


def _int(fields: Mapping[str, bytes], name: str, store_key: str, default: int | None = None) -> int:
    raw = fields.get(name)
    if raw is None and default is not None:
        return default
    text = _text(fields, name, store_key)
    try:
        return int(text)
    except ValueError as exc:
        raise CorruptRecord(f"record {store_key!r} field {name!r} is not an integer: {text!r}",
                            key=store_key) from exc


def decode_record(store_key: str, fields: Mapping[str, bytes]) -> Record | None:
    """Decode a record; ``None`` when there is none. Raises `CorruptRecord` naming the key."""
    if not fields:
        return None
    state_text = _text(fields, F_STATE, store_key)
    state = _STATE_BY_CODE.get(state_text)
    if state is None:
        raise CorruptRecord(f"record {store_key!r} has an unknown state {state_text!r}",
                            key=store_key)
    status_text = _text(fields, F_RESULT_STATUS, store_key, DEFAULT_RESULT_STATUS)
    try:
        result_status = ResultStatus(status_text)
    except ValueError as exc:
        raise CorruptRecord(f"record {store_key!r} has an unknown result status {status_text!r}",
                            key=store_key) from exc
    error: Mapping[str, Any] | None = None
    if F_ERROR in fields:
        try:
            error = json.loads(fields[F_ERROR])
        except (ValueError, RecursionError) as exc:  # RecursionError: hand-made, deeply nested
            raise CorruptRecord(f"record {store_key!r} has an undecodable error",
                                key=store_key) from exc
        if not isinstance(error, dict):
            raise CorruptRecord(f"record {store_key!r} has an undecodable error", key=store_key)
    owner = fields.get(F_OWNER)
    lease = fields.get(F_LEASE)
    return Record(
        store_key=store_key,
        key=_text(fields, F_KEY, store_key),
        scope=_text(fields, F_SCOPE, store_key),
        # Absent when it is the scope (the default scope is the task name).
        task_name=_text(fields, F_TASK_NAME, store_key, _text(fields, F_SCOPE, store_key)),
        state=state,
        task_id=_text(fields, F_TASK_ID, store_key),
        fingerprint=_text(fields, F_FINGERPRINT, store_key),
        owner=owner.decode("utf-8", "replace") if owner is not None else None,
        lease_expires_ms=_int(fields, F_LEASE, store_key) if lease is not None else None,
        fence=_int(fields, F_FENCE, store_key, 0),
        result=fields.get(F_RESULT),
        content_type=_text(fields, F_CONTENT_TYPE, store_key, JSON_CONTENT_TYPE),
        content_encoding=_text(fields, F_CONTENT_ENCODING, store_key, JSON_ENCODING),
        result_status=result_status,
        error=error,
        retryable=fields.get(F_RETRYABLE) == b"1",
        created_ms=_int(fields, F_CREATED, store_key) if F_CREATED in fields else None,
        updated_ms=_int(fields, F_UPDATED, store_key, 0),
        pending_deadline_ms=(_int(fields, F_PENDING_DEADLINE, store_key)
                             if F_PENDING_DEADLINE in fields else None),
        steps=tuple(sorted(name[len(F_STEP_PREFIX):] for name in fields
                           if is_step_field(name))),
    )


def fields_from_flat(flat: Sequence[Any]) -> dict[str, bytes]:
    """Turn an HGETALL-style flat reply ``[name, value, ...]`` into a mapping."""
    fields: dict[str, bytes] = {}
    for index in range(0, len(flat) - 1, 2):
        name, value = flat[index], flat[index + 1]
        name_text = name.decode("utf-8") if isinstance(name, bytes) else str(name)
        fields[name_text] = value if isinstance(value, bytes) else str(value).encode("utf-8")
    return fields
