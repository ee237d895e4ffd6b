"""Recovery points: the steps of a task, each recorded under the task's key as it completes.

``self.step("charge", payments.charge, order_id)`` calls ``payments.charge(order_id)`` and
records its return value under the key; when the key already recorded ``"charge"`` (an earlier
attempt got that far, then failed, retried, or lost its worker), the recorded value is
returned and the function is not called. So the next run of the key continues where the last
one stopped.

Per step, under a claim: `KeyStore.begin_step` (one round trip: owner, fence and a live lease
checked, the lease renewed, the recorded value returned), then, if not recorded, the function,
then `KeyStore.save_step` (one round trip, owner- and fence-checked). A recorded step: one
round trip. A step is at-least-once: a worker killed after the function and before its record
runs it again; what was recorded before it is not run again.

Free of Celery (see `celery_idempotency.protocol`, which creates a `Steps` per run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kombu.exceptions import ContentDisallowed, DecodeError, EncodeError
from kombu.serialization import dumps, loads

from . import events
from .config import IdempotencyConfig
from .exceptions import (
    CorruptRecord,
    IdempotencyError,
    InvalidStep,
    LeaseExpired,
    OwnershipLost,
    StepValueNotStored,
    StoreUnavailable,
)
from .keys import RecordRef
from .records import decode_step_value, encode_step_value
from .store import KeyStore

logger = logging.getLogger("celery_idempotency")

#: The longest step name: it is part of a record field's name.
MAX_STEP_NAME = 200
# Pauses between save attempts while the store is unreachable (as protocol._write).
_SAVE_PAUSE_FIRST, _SAVE_PAUSE_MAX = 0.05, 1.0
# Domain separation of step keys from any other SHA-256 of the same text.
_STEP_KEY_DOMAIN = b"celery-idempotency step key v1\0"


def validate_step_name(name: object) -> str:
    """``name`` if it is acceptable as a step name, else `InvalidStep` saying why."""
    if not isinstance(name, str):
        raise InvalidStep(f"a step name must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidStep("a step name must not be empty")
    if len(name) > MAX_STEP_NAME:
        raise InvalidStep(f"step name {name[:40]!r}... is {len(name)} characters long; the "
                          f"limit is {MAX_STEP_NAME}")
    for char in name:
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            raise InvalidStep(f"step name {name[:80]!r} contains the control character "
                              f"U+{code:04X}")
    return name


def step_key(ref: RecordRef, name: str) -> str:
    """A stable idempotency key for what step ``name`` of the key ``ref`` sends downstream
    (Stripe's ``Idempotency-Key`` and the like): the same on every attempt of the key,
    different for every other scope, key and step.

    A UUID (36 characters of ``0-9a-f-``, version 8) made of the first 122 bits of
    SHA-256 over the scope, key and name: it fits every API's idempotency key (Stripe: 255
    characters, Square: 45, APIs that want a UUID) and reveals nothing of the key.
    """
    text = json.dumps([ref.scope, ref.key, validate_step_name(name)], ensure_ascii=False)
    digest = hashlib.sha256(_STEP_KEY_DOMAIN + text.encode("utf-8")).digest()
    number = int.from_bytes(digest[:16], "big")
    number &= ~(0xF000 << 64)  # version 8 (custom), RFC 9562
    number |= 0x8000 << 64
    number &= ~(0xC000 << 48)  # variant RFC 4122
    number |= 0x8000 << 48
    return str(uuid.UUID(int=number))


@dataclass(frozen=True)
class StepClaim:
    """The claim a run holds: steps are recorded only under it."""

    store: KeyStore
    owner: str
    fence: int
    lease_ms: int


class Steps:
    """The steps of one run of a task.

    ``claim`` is None when the run holds no claim (called directly, idempotency disabled, run
    unprotected under fail_open): then a step just calls its function.
    ``on_store_unavailable`` turns a store that cannot be reached at a step, and
    ``on_lease_expired`` a claim whose lease ran out before a step, into the exception that
    ends the run (the protocol's: the message comes back later)."""

    def __init__(self, *, ref: RecordRef | Callable[[], RecordRef] | None,
                 config: IdempotencyConfig | None, task_name: str, task_id: str | None,
                 sender: Any, claim: StepClaim | None = None, accept: Any = None,
                 on_store_unavailable: Callable[[StoreUnavailable, str], BaseException]
                 | None = None,
                 on_lease_expired: Callable[[LeaseExpired, str], BaseException]
                 | None = None) -> None:
        self._ref = ref
        self.config = config
        self.task_name = task_name
        self.task_id = task_id
        self.sender = sender
        self.claim = claim
        self.accept = accept
        self.on_store_unavailable = on_store_unavailable
        self.on_lease_expired = on_lease_expired
        #: Set once a step found that this run no longer holds the key: the run must write
        #: nothing more (the protocol then records no outcome).
        self.ownership_lost: OwnershipLost | None = None
        self._done: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def unclaimed(cls, *, ref: RecordRef | Callable[[], RecordRef] | None, task_name: str,
                  task_id: str | None, sender: Any) -> Steps:
        return cls(ref=ref, config=None, task_name=task_name, task_id=task_id, sender=sender)

    @property
    def ref(self) -> RecordRef:
        """The key's record; resolved on first use when it is given as a function."""
        ref = self._ref
        if ref is None:
            raise IdempotencyError(f"task {self.task_name!r} has no idempotency key here; "
                                   "step_key() needs one", task_id=self.task_id)
        if callable(ref):
            ref = self._ref = ref()
        return ref

    def key(self, name: str) -> str:
        """`step_key` for this run's key."""
        return step_key(self.ref, name)

    def run(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> Any:
        """``fn(*args, **kwargs)``, or the value step ``name`` recorded before."""
        name = validate_step_name(name)
        if not callable(fn):
            raise InvalidStep(f"step {name!r}: {fn!r} is not callable", task_id=self.task_id)
        self._check_new(name)
        claim = self.claim
        if claim is None:
            value = fn(*args, **kwargs)
        else:
            recorded = self._begin(claim, name)
            if recorded is not None:
                value = self._decode(name, recorded)
                logger.info("%s[%s] key=%r: step %r recorded by an earlier attempt; not run "
                            "again", self.task_name, self.task_id, self.ref.key, name)
            else:
                value = fn(*args, **kwargs)  # raises: nothing recorded, runs again next time
                self._save(claim, name, self._encode(name, value))
        with self._lock:
            self._done.add(name)
        return value

    def _check_new(self, name: str) -> None:
        # A name is spent once its step has a value: a second step under it would replay the
        # first one's. One that raised may be called again (a retry loop inside the task).
        with self._lock:
            if name in self._done:
                raise InvalidStep(
                    f"step {name!r} already ran in this run of task {self.task_name!r}; give "
                    "each step its own name (e.g. with the item's id in a loop)",
                    key=self._ref.key if isinstance(self._ref, RecordRef) else None,
                    task_id=self.task_id)

    def _begin(self, claim: StepClaim, name: str) -> bytes | None:
        if self.ownership_lost is not None:
            raise self.ownership_lost
        try:
            return claim.store.begin_step(self.ref, owner=claim.owner, fence=claim.fence,
                                          name=name, lease_ms=claim.lease_ms)
        except LeaseExpired as exc:
            # Still ours, but anyone may take it over now: do not start the step; end the run
            # so that the message comes back at once (the key goes back to pending for it,
            # owner-checked) and continues from the steps recorded so far.
            logger.warning("%s[%s] key=%r: %s", self.task_name, self.task_id, self.ref.key,
                           exc)
            if self.on_lease_expired is None:
                raise
            raise self.on_lease_expired(exc, name) from exc
        except OwnershipLost as exc:
            raise self._lost(exc, name) from None
        except StoreUnavailable as exc:
            raise self._unavailable(exc, name) from exc

    def _save(self, claim: StepClaim, name: str, value: bytes) -> None:
        """Record the step, retried while the store is unreachable (for up to
        ``idempotency_store_write_timeout``, like the outcome's write)."""
        assert self.config is not None
        deadline = time.monotonic() + self.config.store_write_timeout
        pause = _SAVE_PAUSE_FIRST
        while True:
            try:
                claim.store.save_step(self.ref, owner=claim.owner, fence=claim.fence,
                                      name=name, value=value)
                return
            except OwnershipLost as exc:
                raise self._lost(exc, name) from None
            except StoreUnavailable as exc:
                if time.monotonic() + pause > deadline:
                    raise self._unavailable(exc, name) from exc
                if pause == _SAVE_PAUSE_FIRST:
                    logger.warning("%s[%s] key=%r: store unreachable, trying to record step "
                                   "%r for up to %.0f s (%s)", self.task_name, self.task_id,
                                   self.ref.key, name, self.config.store_write_timeout, exc)
                time.sleep(pause)
                pause = min(pause * 2, _SAVE_PAUSE_MAX)

    def _lost(self, exc: OwnershipLost, name: str) -> OwnershipLost:
        self.ownership_lost = exc
        ref = self.ref
        logger.error("%s[%s]: stopped before step %r: %s", self.task_name, self.task_id, name,
                     exc)
        events.announce(events.OWNERSHIP_LOST, self.sender, key=ref.key, scope=ref.scope,
                        task_id=self.task_id, action=f"step {name}")
        return exc

    def _unavailable(self, exc: StoreUnavailable, name: str) -> BaseException:
        if self.on_store_unavailable is None:
            return exc
        return self.on_store_unavailable(exc, name)

    def _encode(self, name: str, value: Any) -> bytes:
        assert self.config is not None
        serializer, max_bytes = self.config.result_serializer, self.config.max_result_bytes
        try:
            content_type, encoding, data = dumps(value, serializer=serializer)  # type: ignore[no-untyped-call]
        except (EncodeError, TypeError, ValueError) as exc:
            raise StepValueNotStored(
                f"step {name!r} ran, but its value cannot be serialized with {serializer!r} "
                f"(idempotency_result_serializer): {exc}; nothing was recorded, so the next "
                "attempt runs it again. Return what the serializer accepts (e.g. the id of what "
                "the step created)", key=self.ref.key, task_id=self.task_id) from exc
        raw = data.encode(encoding) if isinstance(data, str) else bytes(data)
        if len(raw) > max_bytes:
            raise StepValueNotStored(
                f"step {name!r} ran, but its value is {len(raw)} bytes, over "
                f"idempotency_max_result_bytes={max_bytes}; nothing was recorded, so the next "
                "attempt runs it again. Return less (e.g. the id of what the step created)",
                key=self.ref.key, task_id=self.task_id)
        return encode_step_value(raw, content_type, encoding)

    def _decode(self, name: str, recorded: bytes) -> Any:
        assert self.claim is not None
        store_key = getattr(self.claim.store, "store_key", None)
        where = store_key(self.ref) if callable(store_key) else self.ref.key
        key = self.ref.key
        data, content_type, encoding = decode_step_value(recorded, store_key=where, name=name,
                                                         key=key)
        try:
            return loads(data, content_type, encoding, accept=self.accept)  # type: ignore[no-untyped-call]
        except ContentDisallowed as exc:
            raise CorruptRecord(
                f"record {where!r} holds step {name!r} as {content_type}, which the configured "
                "idempotency_result_serializer does not accept", key=key,
                task_id=self.task_id) from exc
        except (DecodeError, ValueError, TypeError) as exc:
            raise CorruptRecord(f"record {where!r} holds an undecodable value of step "
                                f"{name!r}: {exc}", key=key, task_id=self.task_id) from exc
