"""`MemoryKeyStore`: the same state machine in one process, under one lock.

For tests, eager mode, the demo, and a solo/threads worker whose publisher runs in the same
process: it deduplicates among one process's publishes and executions only. Records are
kept in the same field layout as in Redis so that `decode_record` serves both; each method
mirrors its Lua script in ``store/lua`` line by line: same fields, same TTLs, same replies. The
contract suite and a differential property test (``tests/store/test_state_machine.py``, both
stores driven through the same random histories) hold them equal.
A prefork worker's children would each have their own copy: such a worker is refused at start
(see pool_check.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from ..keys import RecordRef
from ..records import F_RESULT, Record, decode_record
from .base import (
    Claim,
    ClaimStatus,
    Entry,
    KeyStore,
    Reservation,
    ReserveStatus,
    ResultPayload,
    make_entry,
    mismatch_error,
    ownership_lost_error,
    unchanged_conditions,
)

Fields = dict[str, bytes]


def _b(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


class MemoryKeyStore(KeyStore):
    """In-process store with Redis semantics: TTLs, leases and owner checks included."""

    def __init__(self, *, prefix: str = "idem:",
                 clock_us: Callable[[], int] | None = None) -> None:
        """``clock_us``: the store's clock in µs since the epoch (tests step it; default: the
        system clock), the memory store's equivalent of Redis ``TIME``."""
        self.prefix = prefix
        self._clock_us = clock_us or (lambda: time.time_ns() // 1000)
        self._lock = threading.Lock()
        self._records: dict[str, Fields] = {}
        self._expires: dict[str, int] = {}

    def now_ms(self) -> int:
        return self._clock_us() // 1000

    def name_of(self, ref: RecordRef) -> str:
        return ref.store_name(self.prefix)

    def _live(self, name: str, now: int) -> Fields | None:
        """The record, or None when absent or past its TTL (dropped lazily, like Redis)."""
        if name in self._expires and self._expires[name] <= now:
            del self._expires[name]
            self._records.pop(name, None)
        return self._records.get(name)

    def _expire(self, name: str, ttl_ms: int, now: int) -> None:
        self._expires[name] = now + int(ttl_ms)

    def _expire_at_least(self, name: str, ttl_ms: int, now: int) -> None:
        """Lengthen the TTL to at least ``ttl_ms``, never shorten it (``expire_at_least``)."""
        expires = self._expires.get(name)
        if expires is None or expires - now < int(ttl_ms):
            self._expire(name, ttl_ms, now)

    def _delete(self, name: str) -> None:
        self._records.pop(name, None)
        self._expires.pop(name, None)

    def _decode(self, name: str, fields: Fields | None) -> Record | None:
        return decode_record(name, dict(fields)) if fields else None

    @staticmethod
    def _lease_alive(fields: Fields, now: int) -> bool:
        return int(fields.get("l", b"0")) > now

    def reserve(self, ref: RecordRef, *, task_id: str, fingerprint: str, task_name: str,
                ttl_ms: int, pending_ms: int = 600_000) -> Reservation:
        name = self.name_of(ref)
        with self._lock:
            now = self.now_ms()
            fields = self._live(name, now)
            fence = b"0"
            if fields is not None:
                record = self._decode(name, fields)
                if fields.get("fp") != _b(fingerprint):
                    raise mismatch_error(ref, record)
                state = fields["st"]
                if state == b"pending" and fields.get("t") == _b(task_id):
                    return Reservation(ReserveStatus.RESERVED)
                if state == b"pending" and "pd" in fields and int(fields["pd"]) <= now:
                    replaced = fields["t"].decode("utf-8")
                    fields.update({"t": _b(task_id), "pd": _b(now + int(pending_ms)),
                                   "u": _b(now)})
                    self._expire_at_least(name, max(int(ttl_ms), int(pending_ms)), now)
                    return Reservation(ReserveStatus.RESERVED, replaced_task_id=replaced)
                if state == b"started" and not self._lease_alive(fields, now):
                    return Reservation(ReserveStatus.STALE, record)
                if not (state == b"failed" and fields.get("ry") == b"1"):
                    return Reservation(ReserveStatus.DUPLICATE, record)
                fence = fields.get("f", b"0")
                self._delete(name)
            fields = {"k": _b(ref.key), "s": _b(ref.scope), "st": b"pending", "t": _b(task_id),
                      "fp": _b(fingerprint), "f": fence, "c": _b(now), "u": _b(now),
                      "pd": _b(now + int(pending_ms))}
            if task_name != ref.scope:  # kept only when it is not the scope (the default)
                fields["n"] = _b(task_name)
            self._records[name] = fields
            self._expire(name, max(int(ttl_ms), int(pending_ms)), now)
            return Reservation(ReserveStatus.RESERVED)

    def _discard_if(self, ref: RecordRef, conditions: Mapping[str, str]) -> bool:
        name = self.name_of(ref)
        with self._lock:
            fields = self._live(name, self.now_ms())
            if fields is None or any(fields.get(f) != _b(v) for f, v in conditions.items()):
                return False
            self._delete(name)
            return True

    def unreserve(self, ref: RecordRef, *, task_id: str) -> bool:
        return self._discard_if(ref, {"t": task_id, "st": "pending"})

    def discard(self, ref: RecordRef, *, owner: str) -> bool:
        return self._discard_if(ref, {"o": owner, "st": "started"})

    def abandon(self, ref: RecordRef, *, task_id: str, owner_prefix: str, requeued: bool,
                error: str, ttl_ms: int, pending_ms: int) -> bool:
        name = self.name_of(ref)
        with self._lock:
            now = self.now_ms()
            fields = self._live(name, now)
            if fields is None or fields.get("t") != _b(task_id):
                return False
            if fields["st"] == b"started":
                owner = fields.get("o", b"")
                if not owner_prefix or not owner.startswith(_b(owner_prefix)):
                    return False
            elif fields["st"] != b"pending":
                return False
            fields.pop("l", None)
            fields.pop("pd", None)
            if requeued:
                fields.update({"st": b"pending", "u": _b(now), "pd": _b(now + int(pending_ms))})
                self._expire_at_least(name, pending_ms, now)
            else:
                fields.update({"st": b"failed", "e": _b(error), "ry": b"1", "u": _b(now)})
                self._expire(name, ttl_ms, now)
            return True

    def delete_if_unchanged(self, record: Record) -> bool:
        return self._discard_if(RecordRef(record.scope, record.key), unchanged_conditions(record))

    def claim(self, ref: RecordRef, *, task_id: str, owner: str, fingerprint: str,
              task_name: str, lease_ms: int, ttl_ms: int) -> Claim:
        name = self.name_of(ref)
        with self._lock:
            now_us = self._clock_us()
            now = now_us // 1000
            fields = self._live(name, now)

            def take(status: ClaimStatus, fields: Fields) -> Claim:
                previous = fields.get("t", b"").decode("utf-8")
                # Above the last fence, never below the clock in µs: monotonic across deletion.
                fence = max(int(fields.get("f", b"0")) + 1, now_us)
                for gone in ("r", "ct", "ce", "rs", "e", "ry", "pd"):
                    fields.pop(gone, None)
                fields.update({"st": b"started", "t": _b(task_id), "o": _b(owner),
                               "l": _b(now + int(lease_ms)), "u": _b(now), "f": _b(fence)})
                self._expire(name, max(int(ttl_ms), int(lease_ms)), now)
                return Claim(status, fence=fence, previous_task_id=previous or None)

            if fields is None:
                fields = {"k": _b(ref.key), "s": _b(ref.scope), "fp": _b(fingerprint),
                          "c": _b(now)}
                if task_name != ref.scope:
                    fields["n"] = _b(task_name)
                self._records[name] = fields
                return take(ClaimStatus.CLAIMED, fields)
            record = self._decode(name, fields)
            if fields.get("fp") != _b(fingerprint):
                raise mismatch_error(ref, record)
            state = fields["st"]
            if state == b"pending":
                return take(ClaimStatus.CLAIMED, fields)
            if state == b"started":
                if fields.get("o") == _b(owner):  # our own claim, asked again: lease from now
                    fields["l"] = _b(now + int(lease_ms))
                    self._expire(name, max(int(ttl_ms), int(lease_ms)), now)
                    return Claim(ClaimStatus.CLAIMED, fence=int(fields.get("f", b"0")),
                                 previous_task_id=fields["t"].decode("utf-8") or None)
                if self._lease_alive(fields, now):
                    return Claim(ClaimStatus.BUSY, record=record)
                return take(ClaimStatus.TAKEN_OVER, fields)
            if state == b"succeeded":
                return Claim(ClaimStatus.SUCCEEDED, record=record)
            if fields.get("ry") == b"1" and fields.get("t") != _b(task_id):
                return take(ClaimStatus.CLAIMED, fields)
            return Claim(ClaimStatus.FAILED, record=record)

    def _finish(self, ref: RecordRef, owner: str, final: bytes, updates: Fields,
                ttl_ms: int, action: str) -> None:
        name = self.name_of(ref)
        with self._lock:
            now = self.now_ms()
            fields = self._live(name, now)
            if fields is not None and fields.get("o") == _b(owner):
                if fields["st"] == final:
                    return  # our own write, retried
                if fields["st"] == b"started":
                    fields.pop("l", None)
                    fields.update(updates)
                    fields.update({"st": final, "u": _b(now)})
                    self._expire(name, ttl_ms, now)
                    return
            raise ownership_lost_error(ref, owner, self._decode(name, fields), action)

    def complete(self, ref: RecordRef, *, owner: str, result: ResultPayload, ttl_ms: int) -> None:
        updates: Fields = {"r": result.data}
        if result.content_type != "application/json":
            updates["ct"] = _b(result.content_type)
        if result.content_encoding != "utf-8":
            updates["ce"] = _b(result.content_encoding)
        if result.status != "stored":
            updates["rs"] = _b(result.status)
        self._finish(ref, owner, b"succeeded", updates, ttl_ms, "complete")

    def fail(self, ref: RecordRef, *, owner: str, error: str, retryable: bool,
             ttl_ms: int) -> None:
        updates = {"e": _b(error), "ry": b"1" if retryable else b"0"}
        self._finish(ref, owner, b"failed", updates, ttl_ms, "fail")

    def release(self, ref: RecordRef, *, owner: str, pending_ms: int,
                ttl_ms: int | None = None) -> bool:
        name = self.name_of(ref)
        with self._lock:
            now = self.now_ms()
            fields = self._live(name, now)
            if fields is None or fields.get("o") != _b(owner):
                return False
            if fields["st"] == b"pending":
                return True
            if fields["st"] != b"started":
                return False
            fields.pop("l", None)
            fields.update({"st": b"pending", "u": _b(now), "pd": _b(now + int(pending_ms))})
            if ttl_ms is not None:
                self._expire(name, max(int(ttl_ms), int(pending_ms)), now)
            else:
                self._expire_at_least(name, pending_ms, now)
            return True

    def renew(self, ref: RecordRef, *, owner: str, lease_ms: int) -> bool:
        name = self.name_of(ref)
        with self._lock:
            now = self.now_ms()
            fields = self._live(name, now)
            if fields is None or fields.get("o") != _b(owner) or fields["st"] != b"started":
                return False
            fields["l"] = _b(now + int(lease_ms))
            self._expire_at_least(name, lease_ms, now)
            return True

    def get(self, ref: RecordRef) -> Record | None:
        name = self.name_of(ref)
        with self._lock:
            return self._decode(name, self._live(name, self.now_ms()))

    def _ttl(self, name: str, now: int) -> int | None:
        expires = self._expires.get(name)
        return None if expires is None else max(expires - now, 0)

    def entries(self, *, batch: int = 1000, with_result: bool = True) -> Iterator[Entry]:
        with self._lock:
            now = self.now_ms()
            snapshot = [(name, dict(fields), self._ttl(name, now)) for name in list(self._records)
                        if (fields := self._live(name, now)) is not None]
        for name, fields, ttl in snapshot:
            if not with_result:
                fields.pop(F_RESULT, None)
            entry = make_entry(name, fields, ttl)
            if entry is not None:
                yield entry

    def entry(self, ref: RecordRef) -> Entry | None:
        name = self.name_of(ref)
        with self._lock:
            now = self.now_ms()
            fields = self._live(name, now)
            if fields is None:
                return None
            return make_entry(name, dict(fields), self._ttl(name, now))

    def memory_usage(self, store_keys: Sequence[str]) -> list[int | None]:
        """The bytes of the record's name, field names and values (no allocator overhead)."""
        with self._lock:
            now = self.now_ms()
            sizes: list[int | None] = []
            for name in store_keys:
                fields = self._live(name, now)
                sizes.append(None if fields is None else len(name.encode()) + sum(
                    len(field) + len(value) for field, value in fields.items()))
            return sizes

    def ping(self) -> None:
        return None

    def put_raw(self, ref: RecordRef, fields: dict[str, bytes]) -> None:
        """Write raw fields (tests: simulate a record written by something else)."""
        with self._lock:
            self._records[self.name_of(ref)] = dict(fields)
