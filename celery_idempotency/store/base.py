"""The key store interface: one method per state transition, each atomic and owner-checked.

Implementations: `RedisKeyStore` (one Lua script per transition) and `MemoryKeyStore` (one lock).
Both pass the same contract suite (``tests/store``) and a differential property test that
drives them side by side. Times are the store's own clock (Redis ``TIME``), never the
caller's, so that workers with skewed clocks agree on lease expiry.

Invariants every transition keeps (``tests/store/test_state_machine.py``):

* a ``started`` record lives at least as long as its lease (claim and renew lengthen the TTL);
* a ``pending`` record has a deadline (``pending_deadline_ms``) and lives at least until then;
* ``succeeded`` and ``failed`` records live ``ttl_ms``; so no record is left without a way out;
* every write but ``reserve``/``claim`` is owner-checked: a non-owner's write changes nothing;
* recorded steps (`begin_step`/`save_step`) are fields of the record: they live and expire
  with it, survive every transition after which the key can run again (a retryable failure,
  requeue, abandon, take-over, a new reservation) and go with a final outcome (``complete``,
  a ``fail`` that is not retryable) or with the record (``discard``, deletion);
* parked duplicates (`claim` with ``park``) are fields of the record too: they survive every
  transition but deletion (a final outcome hands them back, and leaves them for the copy that
  replays it to remove);
* a claim's fence is above every fence handed out for the key before, also after the record
  was deleted, expired or evicted: ``max(last fence + 1, store clock in µs)``. Across a
  deletion this relies on the store's clock not stepping back by more than the time between
  the two claims.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from ..exceptions import (
    CorruptRecord,
    IdempotencyError,
    IdempotencyKeyMismatch,
    LeaseExpired,
    OwnershipLost,
    StoreUnavailable,
)
from ..keys import RecordRef
from ..records import (
    F_FENCE,
    F_STATE,
    F_TASK_ID,
    F_UPDATED,
    KeyState,
    Record,
    decode_record,
    state_code,
)
from .wakeups import PollingWatch, Watch


class ReserveStatus(str, enum.Enum):
    RESERVED = "reserved"  # new pending record: publish the message
    DUPLICATE = "duplicate"  # do not publish; hand out the original task id
    STALE = "stale"  # started, lease expired: publish; the new message takes over at execution


class ClaimStatus(str, enum.Enum):
    CLAIMED = "claimed"  # run the task
    TAKEN_OVER = "taken_over"  # run the task: the previous owner's lease had expired
    BUSY = "busy"  # a live owner runs it: wait and look again
    SUCCEEDED = "succeeded"  # replay the cached result
    FAILED = "failed"  # re-raise the cached error
    # A copy of a parked message found the outcome, and another copy of the same task id
    # already replayed it (or ran the task): this copy does nothing (`KeyStore.claim`, unpark).
    HANDLED = "handled"


@dataclass(frozen=True)
class Reservation:
    status: ReserveStatus
    record: Record | None = None  # the existing record, for DUPLICATE and STALE
    # RESERVED over a reservation whose message never reached a worker in time
    replaced_task_id: str | None = None


@dataclass(frozen=True)
class ReserveRequest:
    """One `KeyStore.reserve` call of a batch (`KeyStore.reserve_many`): the same arguments."""

    ref: RecordRef
    task_id: str
    fingerprint: str
    task_name: str
    ttl_ms: int
    pending_ms: int = 600_000


#: What `KeyStore.reserve_many` answers for one request: its reservation, or the error `reserve`
#: would have raised for it (`IdempotencyKeyMismatch`, `CorruptRecord`, `StoreUnavailable` for
#: a "not now" reply such as READONLY or OOM, `StoreMisconfigured`).
ReserveOutcome = Reservation | IdempotencyError


@dataclass(frozen=True)
class Claim:
    status: ClaimStatus
    # Fencing token of this claim, for CLAIMED and TAKEN_OVER: strictly greater than every
    # fence handed out for the key before (see the module docstring for the exact promise).
    fence: int = 0
    record: Record | None = None  # the record as found, for BUSY, SUCCEEDED and FAILED
    previous_task_id: str | None = None  # for TAKEN_OVER
    # For BUSY: how long the live owner's lease still runs, by the store's clock (so that the
    # caller knows when to look again without asking the store for the time).
    lease_remaining_ms: int | None = None
    # For BUSY: the message was parked (``park`` given, and the owner is another task id).
    parked: bool = False


@dataclass(frozen=True)
class ParkedDuplicate:
    """A duplicate message parked on a record (`KeyStore.claim` with ``park``), handed back by
    the owner's final write (`KeyStore.complete`, `KeyStore.fail`) to be published again."""

    task_id: str
    data: bytes  # the ``park`` value it was parked with


@dataclass(frozen=True)
class Entry:
    """A record as an operator sees it (the CLI): decoded, or why it cannot be, and its TTL.

    Exactly one of ``record`` and ``error`` is set. ``ttl_ms`` is the time the record has left
    to live, ``None`` if it never expires. ``foreign``: with ``error``, the key under the prefix
    is not a record of this library at all (another type, or a hash without a state field),
    rather than a record of ours that cannot be decoded.
    """

    store_key: str
    record: Record | None
    error: CorruptRecord | None
    ttl_ms: int | None
    foreign: bool = False


@dataclass(frozen=True)
class ResultPayload:
    """A serialized result as stored. ``status`` says whether ``data`` holds the result."""

    data: bytes
    content_type: str
    content_encoding: str
    status: str


class KeyStore(abc.ABC):
    """Where idempotency records live. Every write is compare-and-set inside the store."""

    @abc.abstractmethod
    def reserve(self, ref: RecordRef, *, task_id: str, fingerprint: str, task_name: str,
                ttl_ms: int, pending_ms: int = 600_000) -> Reservation:
        """Publish time: create a ``pending`` record, or report the existing one.

        A reservation not claimed within ``pending_ms`` is taken to have lost its message and
        is reserved anew (``replaced_task_id``). The record lives ``max(ttl_ms, pending_ms)``:
        callers add a countdown/eta to both.

        Raises `IdempotencyKeyMismatch` when the key exists with another fingerprint.
        """

    @abc.abstractmethod
    def unreserve(self, ref: RecordRef, *, task_id: str) -> bool:
        """Undo `reserve` after a failed publish: delete only our own ``pending`` record."""

    def reserve_many(self, requests: Sequence[ReserveRequest]) -> list[ReserveOutcome]:
        """`reserve` for each request, in order, answered in one list (same length, same order).

        Each reservation is atomic for its key, as `reserve` is; the batch is not a transaction
        (a request later in the batch sees what an earlier one reserved: the same key twice
        gives ``RESERVED`` then ``DUPLICATE``). What would make `reserve` raise for one request
        (a key reused with other arguments, a corrupt record, an error reply) is that request's
        answer, not the batch's; only when the store cannot be reached at all does this raise
        `StoreUnavailable` (or `StoreMisconfigured`), and then any of the requests may or may
        not have been reserved, as when the reply to one `reserve` is lost.

        This default calls `reserve` once per request; stores override it to answer the whole
        batch in one round trip."""
        outcomes: list[ReserveOutcome] = []
        for request in requests:
            try:
                outcomes.append(self.reserve(
                    request.ref, task_id=request.task_id, fingerprint=request.fingerprint,
                    task_name=request.task_name, ttl_ms=request.ttl_ms,
                    pending_ms=request.pending_ms))
            except StoreUnavailable:
                raise  # the store as a whole, not this request
            except IdempotencyError as exc:
                outcomes.append(exc)
        return outcomes

    def unreserve_many(self, reservations: Sequence[tuple[RecordRef, str]]) -> list[bool]:
        """`unreserve` for each ``(ref, task_id)``: compare-and-delete of our own pending
        records after a batch could not be sent. Stores override it to use one round trip."""
        return [self.unreserve(ref, task_id=task_id) for ref, task_id in reservations]

    @abc.abstractmethod
    def claim(self, ref: RecordRef, *, task_id: str, owner: str, fingerprint: str,
              task_name: str, lease_ms: int, ttl_ms: int, park: bytes | None = None,
              unpark: bool = False) -> Claim:
        """Execution time: take the key (``started``, owner token, lease, new fence) or report
        why not. The record then lives ``max(ttl_ms, lease_ms)``.

        Parking (docs/wakeups.md): with ``park``, a BUSY claim whose owner is another task id
        also records ``park`` as the parked duplicate ``task_id`` (`Claim.parked`), a field of
        the record (it lives and goes with it). A claim that gets past BUSY (it takes the key, or
        finds an outcome) removes the field of ``task_id``. ``unpark`` (a message that parked
        before): finding an outcome and no such field, the claim answers HANDLED and changes
        nothing: another copy of the same task id got there first."""

    @abc.abstractmethod
    def complete(self, ref: RecordRef, *, owner: str, fence: int, result: ResultPayload,
                 ttl_ms: int) -> list[ParkedDuplicate]:
        """``started`` -> ``succeeded`` with the result, for ``owner``'s claim under ``fence``
        (`Claim.fence`). Raises `OwnershipLost`. The succeeded record drops the owner token
        and the creation time; a retried call (the reply was lost) is recognised by the fence,
        which no other claim ever had. Returns the record's parked duplicates (left in the
        record), to publish again (also when the write is retried after a lost reply)."""

    @abc.abstractmethod
    def fail(self, ref: RecordRef, *, owner: str, error: str, retryable: bool,
             ttl_ms: int) -> list[ParkedDuplicate]:
        """``started`` -> ``failed`` with the error (JSON). Raises `OwnershipLost`. Returns the
        parked duplicates, as `complete` does."""

    @abc.abstractmethod
    def requeue(self, ref: RecordRef, *, owner: str, pending_ms: int,
                ttl_ms: int | None = None) -> bool:
        """``started`` -> ``pending``, same task id (a retry, or a claim given up for a
        requeued message), with a pending deadline ``pending_ms`` from now: should the message
        never come, the next publish after it runs the task.

        ``ttl_ms`` resets the record's TTL (a retry's countdown must fit in it); either way the
        record lives at least until the deadline.
        """

    @abc.abstractmethod
    def renew(self, ref: RecordRef, *, owner: str, lease_ms: int) -> bool:
        """Extend the lease of a claim we still own, and the record's TTL to at least the
        lease (never shortened): a task may run longer than ``idempotency_ttl``."""

    @abc.abstractmethod
    def discard(self, ref: RecordRef, *, owner: str) -> bool:
        """Delete the record if ``owner`` still holds it (the task ended without an outcome)."""

    @abc.abstractmethod
    def abandon(self, ref: RecordRef, *, task_id: str, owner_prefix: str, requeued: bool,
                error: str, ttl_ms: int, pending_ms: int) -> bool:
        """Worker main process: give up the claim of a task whose child died or that was
        revoked. Matches ``task_id`` and, for a started record, the owner prefix of the dead
        child (see `owner_prefix`). ``requeued``: back to ``pending`` for the redelivery, with
        a deadline ``pending_ms`` from now; otherwise ``failed`` (retryable) with ``error`` and
        TTL ``ttl_ms``, since no message will run it."""

    @abc.abstractmethod
    def begin_step(self, ref: RecordRef, *, owner: str, fence: int, name: str,
                   lease_ms: int) -> bytes | None:
        """Before step ``name`` runs (`IdempotentTask.step`): check that ``owner`` still holds
        the key under ``fence`` with a live lease, renew the lease to ``lease_ms`` from now (the
        record's TTL to at least that), and return the step's recorded field (None: not
        recorded). One round trip. Raises `OwnershipLost`; `LeaseExpired` (a subclass) when
        the claim is still ``owner``'s but its lease ran out: another worker may take the key
        over at any moment, so no step starts."""

    @abc.abstractmethod
    def save_step(self, ref: RecordRef, *, owner: str, fence: int, name: str,
                  value: bytes) -> None:
        """Record step ``name``'s field ``value`` if ``owner`` still holds the key under
        ``fence``. The lease is not checked: the step did run, and as long as nobody took the
        key over, its value is the truth. Raises `OwnershipLost`."""

    @abc.abstractmethod
    def delete_if_unchanged(self, record: Record) -> bool:
        """Operators: delete the record only if it is still exactly as ``record`` shows it
        (same state, update time and fence), so a key that moved on meanwhile is left alone."""

    @abc.abstractmethod
    def get(self, ref: RecordRef) -> Record | None:
        """Read a record (no write). Raises `CorruptRecord` for an undecodable one."""

    @abc.abstractmethod
    def now_ms(self) -> int:
        """The store's clock, in ms since the epoch."""

    def scan(self) -> Iterator[Record]:
        """Every record, streamed (SCAN, never KEYS). Raises `CorruptRecord` at an undecodable
        one; `entries` reports those and goes on."""
        for entry in self.entries(with_result=True):
            if entry.error is not None:
                raise entry.error
            if entry.record is not None:
                yield entry.record

    @abc.abstractmethod
    def entries(self, *, batch: int = 1000, with_result: bool = True) -> Iterator[Entry]:
        """Every record with its TTL, streamed ``batch`` at a time (SCAN, never KEYS: constant
        memory, one round trip per batch). Undecodable records come as entries with ``error``.

        Without ``with_result`` cached results are not fetched (``record.result`` is None), so
        that listing a store does not move every payload over the network.
        """

    @abc.abstractmethod
    def entry(self, ref: RecordRef) -> Entry | None:
        """One record with its TTL (no write); ``None`` when there is none."""

    @abc.abstractmethod
    def memory_usage(self, store_keys: Sequence[str]) -> list[int | None]:
        """Approximate bytes each record takes in the store (``None``: gone, or unknown)."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise `StoreUnavailable` if the store cannot be reached."""

    def watch(self, ref: RecordRef) -> Watch:
        """Subscribe to the record's changes, before reading it (see `wakeups`): a waiter
        then wakes when an outcome is written or the record deleted instead of polling.
        Without notifications (this default) the watch only sleeps: the waiter polls."""
        return PollingWatch()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def mismatch_error(ref: RecordRef, record: Record | None) -> IdempotencyKeyMismatch:
    return IdempotencyKeyMismatch(
        "idempotency key reused with different task arguments; use a new key for a new request",
        key=ref.key, task_id=record.task_id if record else None)


def ownership_lost_error(ref: RecordRef, owner: str, record: Record | None,
                         action: str) -> OwnershipLost:
    if record is None:
        now = "the record is gone (expired or released)"
    else:
        now = f"it is {record.state.value}, owned by task {record.task_id}"
    return OwnershipLost(f"cannot {action}: this worker (owner {owner}) lost the claim; {now}",
                         key=ref.key, task_id=record.task_id if record else None)


def step_ownership_lost_error(ref: RecordRef, owner: str, fence: int, record: Record | None,
                              step: str, *, saving: bool = False) -> OwnershipLost:
    """`OwnershipLost` for a step refused by `KeyStore.begin_step` or (``saving``)
    `KeyStore.save_step`."""
    action = f"{'record' if saving else 'run'} step {step!r}"
    if (record is not None and record.owner == owner and record.fence == fence
            and record.state is KeyState.STARTED):
        return LeaseExpired(
            f"cannot {action}: the lease of this worker (owner {owner}) expired before the "
            "step (the lease keeper could not renew it in time); another worker may take the "
            "key over at any moment", key=ref.key, task_id=record.task_id)
    return ownership_lost_error(ref, owner, record, action)


def unchanged_conditions(record: Record) -> dict[str, str]:
    """Field values that identify this exact version of a record (for compare-and-delete)."""
    return {F_STATE: state_code(record.state), F_UPDATED: str(record.updated_ms),
            F_FENCE: str(record.fence), F_TASK_ID: record.task_id}


def make_entry(store_key: str, fields: Mapping[str, bytes], ttl_ms: int | None) -> Entry | None:
    """Decode raw fields into an `Entry` (``None`` for a record that is gone)."""
    try:
        record = decode_record(store_key, fields)
    except CorruptRecord as exc:
        return Entry(store_key, None, exc, ttl_ms, foreign=F_STATE not in fields)
    return None if record is None else Entry(store_key, record, None, ttl_ms)


def foreign_entry(store_key: str, ttl_ms: int | None, what: str) -> Entry:
    """A key under the prefix that is not one of our records (``what`` it is instead)."""
    return Entry(store_key, None, CorruptRecord(
        f"{store_key!r} is not a record of celery-idempotency ({what}); something else writes "
        "under the key prefix", key=store_key), ttl_ms, foreign=True)
