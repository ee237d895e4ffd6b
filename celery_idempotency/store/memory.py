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
from ..records import (
    F_CONTENT_ENCODING,
    F_CONTENT_TYPE,
    F_CREATED,
    F_ERROR,
    F_FENCE,
    F_FINGERPRINT,
    F_KEY,
    F_LEASE,
    F_OWNER,
    F_PENDING_DEADLINE,
    F_RESULT,
    F_RESULT_STATUS,
    F_RETRYABLE,
    F_SCOPE,
    F_STATE,
    F_TASK_ID,
    F_UPDATED,
    KeyState,
    Record,
    decode_record,
    is_park_field,
    is_step_field,
    park_field,
    result_meta_fields,
    state_code,
    step_field,
    task_name_field,
    without_steps,
)
from .base import (
    Claim,
    ClaimStatus,
    Entry,
    KeyStore,
    ParkedDuplicate,
    Reservation,
    ReserveOutcome,
    ReserveRequest,
    ReserveStatus,
    ResultPayload,
    make_entry,
    mismatch_error,
    ownership_lost_error,
    step_ownership_lost_error,
    unchanged_conditions,
)
from .wakeups import ChangeWatch, Watch

Fields = dict[str, bytes]

# States as stored (one letter, bytes like a Redis hash's values: records.STATE_CODES).
PENDING, STARTED, SUCCEEDED, FAILED = (state_code(state).encode() for state in KeyState)
# What a claim clears: the outcome of the state it leaves, and a pending deadline.
_CLEARED_BY_CLAIM = (F_RESULT, F_CONTENT_TYPE, F_CONTENT_ENCODING, F_RESULT_STATUS, F_ERROR,
                     F_RETRYABLE, F_PENDING_DEADLINE)


def _field(value: object) -> bytes:
    """A value as a record field holds it (Redis stores every value as bytes)."""
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def _fields(values: Mapping[str, object]) -> Fields:
    return {name: _field(value) for name, value in values.items()}


class MemoryKeyStore(KeyStore):
    """In-process store with Redis semantics: TTLs, leases and owner checks included."""

    def __init__(self, *, prefix: str = "idem:",
                 clock_us: Callable[[], int] | None = None) -> None:
        """``clock_us``: the store's clock in µs since the epoch (tests step it; default: the
        system clock), the memory store's equivalent of Redis ``TIME``."""
        self.prefix = prefix
        self._clock_us = clock_us or (lambda: time.time_ns() // 1000)
        # Reentrant: `reserve_many` holds it across a batch of `reserve` calls, which take it too.
        self._lock = threading.RLock()
        # Waiters (`watch`) sleep on this; the writes the Lua scripts announce (``wake``)
        # notify. Versions of watched records only: [version, watches].
        self._changed = threading.Condition(self._lock)
        self._watched: dict[str, list[int]] = {}
        self._records: dict[str, Fields] = {}
        self._expires: dict[str, int] = {}

    def now_ms(self) -> int:
        return self._clock_us() // 1000

    def store_key(self, ref: RecordRef) -> str:
        return ref.store_key(self.prefix)

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

    def _wake(self, name: str) -> None:
        """What the scripts' ``wake`` does: the record's waiters look again (under the lock)."""
        watched = self._watched.get(name)
        if watched is not None:
            watched[0] += 1
            self._changed.notify_all()

    def watch(self, ref: RecordRef) -> Watch:
        name = self.store_key(ref)
        with self._lock:
            watched = self._watched.setdefault(name, [0, 0])
            watched[1] += 1

        def release() -> None:
            with self._lock:
                watched[1] -= 1
                if watched[1] == 0:
                    self._watched.pop(name, None)

        return ChangeWatch(self._changed, lambda: watched[0], release)

    def _decode(self, name: str, fields: Fields | None) -> Record | None:
        return decode_record(name, dict(fields)) if fields else None

    def _reply(self, name: str, fields: Fields | None) -> Record | None:
        """The record as a script's reply carries it: without the steps (see `reply`)."""
        return decode_record(name, without_steps(fields)) if fields else None

    @staticmethod
    def _lease_alive(fields: Fields, now: int) -> bool:
        return int(fields.get(F_LEASE, b"0")) > now

    def reserve(self, ref: RecordRef, *, task_id: str, fingerprint: str, task_name: str,
                ttl_ms: int, pending_ms: int = 600_000) -> Reservation:
        name = self.store_key(ref)
        with self._lock:
            now = self.now_ms()
            fields = self._live(name, now)
            fence = b"0"
            steps: Fields = {}
            if fields is not None:
                record = self._reply(name, fields)
                if fields.get(F_FINGERPRINT) != _field(fingerprint):
                    raise mismatch_error(ref, record)
                state = fields[F_STATE]
                if state == PENDING and fields.get(F_TASK_ID) == _field(task_id):
                    return Reservation(ReserveStatus.RESERVED)
                deadline = fields.get(F_PENDING_DEADLINE)
                if state == PENDING and deadline is not None and int(deadline) <= now:
                    replaced = fields[F_TASK_ID].decode("utf-8")
                    fields.update(_fields({F_TASK_ID: task_id,
                                           F_PENDING_DEADLINE: now + int(pending_ms),
                                           F_UPDATED: now}))
                    self._expire_at_least(name, max(int(ttl_ms), int(pending_ms)), now)
                    return Reservation(ReserveStatus.RESERVED, replaced_task_id=replaced)
                if state == STARTED and not self._lease_alive(fields, now):
                    return Reservation(ReserveStatus.STALE, record)
                if not (state == FAILED and fields.get(F_RETRYABLE) == b"1"):
                    return Reservation(ReserveStatus.DUPLICATE, record)
                fence = fields.get(F_FENCE, b"0")
                # The recorded steps stay: the new run continues where the failed one stopped;
                # and the parked duplicates, waiting for the next final outcome.
                steps = {field: value for field, value in fields.items()
                         if is_step_field(field) or is_park_field(field)}
                self._delete(name)
            self._records[name] = _fields({
                **steps,
                F_KEY: ref.key, F_SCOPE: ref.scope, F_STATE: PENDING, F_TASK_ID: task_id,
                F_FINGERPRINT: fingerprint, F_FENCE: fence, F_CREATED: now, F_UPDATED: now,
                F_PENDING_DEADLINE: now + int(pending_ms),
                **task_name_field(task_name, ref.scope)})
            self._expire(name, max(int(ttl_ms), int(pending_ms)), now)
            return Reservation(ReserveStatus.RESERVED)

    def reserve_many(self, requests: Sequence[ReserveRequest]) -> list[ReserveOutcome]:
        # The lock taken once for the whole batch (the memory store's "one round trip"). The
        # contract does not promise that nothing runs in between (a Redis pipeline does not).
        with self._lock:
            return super().reserve_many(requests)

    def _discard_if(self, ref: RecordRef, conditions: Mapping[str, str]) -> bool:
        name = self.store_key(ref)
        with self._lock:
            fields = self._live(name, self.now_ms())
            if fields is None or any(fields.get(field) != _field(value)
                                     for field, value in conditions.items()):
                return False
            self._delete(name)
            self._wake(name)
            return True

    def unreserve(self, ref: RecordRef, *, task_id: str) -> bool:
        return self._discard_if(ref, {F_TASK_ID: task_id, F_STATE: state_code(KeyState.PENDING)})

    def discard(self, ref: RecordRef, *, owner: str) -> bool:
        return self._discard_if(ref, {F_OWNER: owner, F_STATE: state_code(KeyState.STARTED)})

    def abandon(self, ref: RecordRef, *, task_id: str, owner_prefix: str, requeued: bool,
                error: str, ttl_ms: int, pending_ms: int) -> bool:
        name = self.store_key(ref)
        with self._lock:
            now = self.now_ms()
            fields = self._live(name, now)
            if fields is None or fields.get(F_TASK_ID) != _field(task_id):
                return False
            if fields[F_STATE] == STARTED:
                owner = fields.get(F_OWNER, b"")
                if not owner_prefix or not owner.startswith(_field(owner_prefix)):
                    return False
            elif fields[F_STATE] != PENDING:
                return False
            fields.pop(F_LEASE, None)
            fields.pop(F_PENDING_DEADLINE, None)
            if requeued:
                fields.update(_fields({F_STATE: PENDING, F_UPDATED: now,
                                       F_PENDING_DEADLINE: now + int(pending_ms)}))
                self._expire_at_least(name, pending_ms, now)
            else:
                fields.update(_fields({F_STATE: FAILED, F_ERROR: error, F_RETRYABLE: b"1",
                                       F_UPDATED: now}))
                self._expire(name, ttl_ms, now)
            self._wake(name)
            return True

    def delete_if_unchanged(self, record: Record) -> bool:
        return self._discard_if(RecordRef(record.scope, record.key), unchanged_conditions(record))

    def claim(self, ref: RecordRef, *, task_id: str, owner: str, fingerprint: str,
              task_name: str, lease_ms: int, ttl_ms: int, park: bytes | None = None,
              unpark: bool = False) -> Claim:
        name = self.store_key(ref)
        parked_as = park_field(task_id)
        with self._lock:
            now_us = self._clock_us()
            now = now_us // 1000
            fields = self._live(name, now)

            def take(status: ClaimStatus, fields: Fields) -> Claim:
                # Running it now: no copy of this message replays the outcome it will write.
                fields.pop(parked_as, None)
                previous = fields.get(F_TASK_ID, b"").decode("utf-8")
                # Above the last fence, never below the clock in µs: monotonic across deletion.
                fence = max(int(fields.get(F_FENCE, b"0")) + 1, now_us)
                for gone in _CLEARED_BY_CLAIM:
                    fields.pop(gone, None)
                fields.update(_fields({F_STATE: STARTED, F_TASK_ID: task_id, F_OWNER: owner,
                                       F_LEASE: now + int(lease_ms), F_UPDATED: now,
                                       F_FENCE: fence}))
                self._expire(name, max(int(ttl_ms), int(lease_ms)), now)
                return Claim(status, fence=fence, previous_task_id=previous or None)

            if fields is None:
                fields = _fields({F_KEY: ref.key, F_SCOPE: ref.scope, F_FINGERPRINT: fingerprint,
                                  F_CREATED: now, **task_name_field(task_name, ref.scope)})
                self._records[name] = fields
                return take(ClaimStatus.CLAIMED, fields)
            record = self._reply(name, fields)
            if fields.get(F_FINGERPRINT) != _field(fingerprint):
                raise mismatch_error(ref, record)
            state = fields[F_STATE]
            if state == PENDING:
                return take(ClaimStatus.CLAIMED, fields)
            if state == STARTED:
                if fields.get(F_OWNER) == _field(owner):  # our own claim, asked again
                    fields[F_LEASE] = _field(now + int(lease_ms))  # the lease counts from now
                    self._expire(name, max(int(ttl_ms), int(lease_ms)), now)
                    return Claim(ClaimStatus.CLAIMED, fence=int(fields.get(F_FENCE, b"0")),
                                 previous_task_id=fields[F_TASK_ID].decode("utf-8") or None)
                if self._lease_alive(fields, now):
                    # Parked unless the owner is another copy of this very message.
                    parks = park is not None and fields.get(F_TASK_ID) != _field(task_id)
                    if parks:
                        fields[parked_as] = bytes(park or b"")
                    return Claim(ClaimStatus.BUSY, record=record,
                                 lease_remaining_ms=int(fields[F_LEASE]) - now, parked=parks)
                return take(ClaimStatus.TAKEN_OVER, fields)
            if (state == FAILED and fields.get(F_RETRYABLE) == b"1"
                    and fields.get(F_TASK_ID) != _field(task_id)):
                return take(ClaimStatus.CLAIMED, fields)
            # A final outcome: of the copies of a parked message, the one that removes its
            # field replays it.
            if fields.pop(parked_as, None) is None and unpark:
                return Claim(ClaimStatus.HANDLED)
            if state == SUCCEEDED:
                return Claim(ClaimStatus.SUCCEEDED, record=record)
            return Claim(ClaimStatus.FAILED, record=record)

    def _finish(self, ref: RecordRef, owner: str, final: bytes, updates: Fields,
                ttl_ms: int, action: str, *, keep_steps: bool,
                fence: int | None = None) -> list[ParkedDuplicate]:
        """``fence``: complete's (a succeeded record has no owner token: a retried complete
        is recognised by the fence, and the owner token and creation time are dropped).
        Returns the record's parked duplicates."""
        name = self.store_key(ref)
        with self._lock:
            now = self.now_ms()
            fields = self._live(name, now)
            if (fence is not None and fields is not None and fields[F_STATE] == final
                    and fields.get(F_FENCE) == _field(fence)):
                return self._parked(fields)  # our own write, retried
            if fields is not None and fields.get(F_OWNER) == _field(owner):
                if fence is None and fields[F_STATE] == final:
                    return self._parked(fields)  # our own write, retried
                if fields[F_STATE] == STARTED:
                    fields.pop(F_LEASE, None)
                    if fence is not None:
                        fields.pop(F_OWNER, None)
                        fields.pop(F_CREATED, None)
                    fields.update(updates)
                    fields.update(_fields({F_STATE: final, F_UPDATED: now}))
                    if not keep_steps:  # a final outcome: its steps are not needed again
                        for field in [field for field in fields if is_step_field(field)]:
                            del fields[field]
                    self._expire(name, ttl_ms, now)
                    self._wake(name)
                    return self._parked(fields)
            raise ownership_lost_error(ref, owner, self._reply(name, fields), action)

    @staticmethod
    def _parked(fields: Fields) -> list[ParkedDuplicate]:
        """The record's parked duplicates (left in it: see `KeyStore.claim`, unpark)."""
        return [ParkedDuplicate(field[len(park_field("")):], bytes(value))
                for field, value in fields.items() if is_park_field(field)]

    def complete(self, ref: RecordRef, *, owner: str, fence: int, result: ResultPayload,
                 ttl_ms: int) -> list[ParkedDuplicate]:
        updates = _fields({F_RESULT: result.data, **result_meta_fields(
            result.content_type, result.content_encoding, result.status)})
        return self._finish(ref, owner, SUCCEEDED, updates, ttl_ms, "complete",
                            keep_steps=False, fence=fence)

    def fail(self, ref: RecordRef, *, owner: str, error: str, retryable: bool,
             ttl_ms: int) -> list[ParkedDuplicate]:
        updates = _fields({F_ERROR: error, F_RETRYABLE: b"1" if retryable else b"0"})
        return self._finish(ref, owner, FAILED, updates, ttl_ms, "fail", keep_steps=retryable)

    def requeue(self, ref: RecordRef, *, owner: str, pending_ms: int,
                ttl_ms: int | None = None) -> bool:
        name = self.store_key(ref)
        with self._lock:
            now = self.now_ms()
            fields = self._live(name, now)
            if fields is None or fields.get(F_OWNER) != _field(owner):
                return False
            if fields[F_STATE] == PENDING:
                return True  # our own write, retried
            if fields[F_STATE] != STARTED:
                return False
            fields.pop(F_LEASE, None)
            fields.update(_fields({F_STATE: PENDING, F_UPDATED: now,
                                   F_PENDING_DEADLINE: now + int(pending_ms)}))
            if ttl_ms is not None:
                self._expire(name, max(int(ttl_ms), int(pending_ms)), now)
            else:
                self._expire_at_least(name, pending_ms, now)
            return True

    def renew(self, ref: RecordRef, *, owner: str, lease_ms: int) -> bool:
        name = self.store_key(ref)
        with self._lock:
            now = self.now_ms()
            fields = self._live(name, now)
            if (fields is None or fields.get(F_OWNER) != _field(owner)
                    or fields[F_STATE] != STARTED):
                return False
            fields[F_LEASE] = _field(now + int(lease_ms))
            self._expire_at_least(name, lease_ms, now)
            return True

    def _step_holder(self, name: str, owner: str, fence: int,
                     now: int) -> tuple[Fields | None, bool]:
        """The live record and whether ``owner`` holds it under ``fence`` (started)."""
        fields = self._live(name, now)
        held = (fields is not None and fields.get(F_OWNER) == _field(owner)
                and fields.get(F_STATE) == STARTED and fields.get(F_FENCE) == _field(fence))
        return fields, held

    def begin_step(self, ref: RecordRef, *, owner: str, fence: int, name: str,
                   lease_ms: int) -> bytes | None:
        key = self.store_key(ref)
        with self._lock:
            now = self.now_ms()
            fields, held = self._step_holder(key, owner, fence, now)
            if fields is None or not held or not self._lease_alive(fields, now):
                raise step_ownership_lost_error(ref, owner, fence, self._reply(key, fields),
                                                name)
            fields[F_LEASE] = _field(now + int(lease_ms))
            self._expire_at_least(key, lease_ms, now)
            return fields.get(step_field(name))

    def save_step(self, ref: RecordRef, *, owner: str, fence: int, name: str,
                  value: bytes) -> None:
        key = self.store_key(ref)
        with self._lock:
            fields, held = self._step_holder(key, owner, fence, self.now_ms())
            if fields is None or not held:
                raise step_ownership_lost_error(ref, owner, fence, self._reply(key, fields),
                                                name, saving=True)
            fields[step_field(name)] = bytes(value)

    def get(self, ref: RecordRef) -> Record | None:
        name = self.store_key(ref)
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
            if not with_result:  # as Redis lists them: the record's own fields but the result
                fields = without_steps(fields)
                fields.pop(F_RESULT, None)
            entry = make_entry(name, fields, ttl)
            if entry is not None:
                yield entry

    def entry(self, ref: RecordRef) -> Entry | None:
        name = self.store_key(ref)
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
            self._records[self.store_key(ref)] = dict(fields)
