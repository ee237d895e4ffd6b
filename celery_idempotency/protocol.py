"""The idempotency protocol, step by step, over a `KeyStore` and free of Celery.

One task, from publish to replay:

- **Publish** (`publish`): reserve the key (`_reserve`); a duplicate is not sent
  (`_skip_duplicate`); a message that cannot be sent gives its reservation back
  (`_send_or_unreserve`).
- **Execute** (`Execution.execute`): claim the key (`_claim`), then dispatch on the claim's
  status (`_handle_for_status`): run the task (`_run_claimed`), replay its cached result
  (`_replay_result`) or error (`_replay_error`), look again later while another worker holds
  it (`_busy`), or, when the store cannot be used, run unprotected or come back later
  (`_store_problem`).
- **Record** (`_get_function_response`): the task's result or error becomes the key's outcome,
  written with retries while the store is unreachable (`_write`). A task that ends without an
  outcome of its own (retry, ignore, reject, worker shutdown) gives its claim up
  (`_end_without_outcome`).
- **Abandon** (`abandon`): the worker's main process gives up the claim of a task whose
  process died or that was revoked.
- **Steps** (`Execution.steps`, `celery_idempotency.steps`): recovery points inside the task,
  recorded under the claim; a run that finds it lost the claim at a step writes nothing more
  (`_get_function_response`), one that cannot reach the store at a step comes back later
  (`_step_store_problem`).

`celery_idempotency.task.IdempotentTask` and `celery_idempotency.worker.IdempotentRequest`
translate Celery's hooks and exceptions to these steps (`Execution`'s hook methods); this module
imports nothing from Celery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import events
from .config import IdempotencyConfig
from .exceptions import (
    CorruptRecord,
    IdempotencyError,
    LeaseExpired,
    OwnershipLost,
    ResultNotStored,
    StoreMisconfigured,
    StoreUnavailable,
)
from .keys import RecordRef
from .leases import lease_keeper, new_owner_token
from .outcomes import decode_result, encode_error, encode_result, rebuild_error
from .steps import StepClaim, Steps
from .store import Claim, ClaimStatus, KeyStore, ParkedDuplicate, Reservation, ReserveStatus

logger = logging.getLogger("celery_idempotency")

#: Header counting how often a message came back because the store could not be used.
STORE_ATTEMPT_HEADER = "idempotency_store_attempt"
#: Header counting how often a message came back because a live owner held its key.
BUSY_ATTEMPT_HEADER = "idempotency_busy_attempt"
#: Header of a message that parked on its key's record (`KeyStore.claim` with ``park``): set on
#: its busy re-sends, and on the copy the owner publishes at once when its outcome is final.
#: Every copy claims with ``unpark``, so that exactly one of them replays the outcome.
PARKED_HEADER = "idempotency_parked"
# A message blocked by a live owner waits in the worker this long (at most) on its first look
# for the owner's outcome, woken by it: a short owner's duplicate replays at once, and the
# worker slot is held briefly. After that it is re-sent with backoff (`Execution._busy`).
_BUSY_WAIT = 0.5
# Pauses between outcome-write attempts while the store is unreachable: short, so that the
# write lands soon after the store is back, before a duplicate could take the expired lease
# over (the lease keeper renews it as soon as the store answers).
_WRITE_PAUSE_FIRST, _WRITE_PAUSE_MAX = 0.05, 1.0

OpenStore = Callable[[IdempotencyConfig], KeyStore]


@dataclass(frozen=True)
class KeyTarget:
    """The key a message addresses: where its record lives, the payload it stands for, and the
    settings it is handled under (the task's, with the message's own ``scope``/``ttl``)."""

    ref: RecordRef
    fingerprint: str
    config: IdempotencyConfig


# -- publish ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publication:
    """What `publish` did with one message."""

    #: The store holding the reservation; None when published unprotected (fail_open).
    store: KeyStore | None
    #: What ``send`` returned; None when nothing was sent.
    sent: Any = None
    #: Set when nothing was sent: the task that holds the key.
    original_task_id: str | None = None
    #: The key was already reserved by another task (sent anyway when not deduplicated).
    duplicate: bool = False


def publish(target: KeyTarget, *, sender: Any, task_name: str, task_id: str,
            open_store: OpenStore, delay_ms: int, deduplicate: bool,
            send: Callable[[], Any]) -> Publication:
    """Reserve the key for ``task_id``, then send the message unless it is a duplicate.

    ``delay_ms`` (a countdown/eta) lengthens the reservation; ``deduplicate`` is False for a
    message that must be sent even when its key is taken (its duplicate short-circuits at
    execution instead).

    Celery's handle of the sent message (``Publication.sent``) is never held in a local of
    this frame or of the frames that call it. A store or broker call below them that met an
    error leaves a reference cycle behind (redis-py keeps a connection error in a local of
    the frame that raised it), and each frame object in a cycle keeps its callers' frames
    alive, with their locals, until the cycle collector runs. A handle kept that way is
    collected late, and Celery < 5.7 then unsubscribes from the task's result even when a
    group is waiting on it: a plain ``group`` of idempotent tasks, sent unprotected under
    ``fail_open``, never returned from ``.get()``."""
    reserved = _reserve(target, task_name=task_name, task_id=task_id, open_store=open_store,
                        delay_ms=delay_ms)
    if reserved is None:
        return Publication(store=None, sent=send())
    store, reservation = reserved
    return publish_reserved(target, store, reservation, sender=sender, task_name=task_name,
                            task_id=task_id, deduplicate=deduplicate, send=send)


def publish_reserved(target: KeyTarget, store: KeyStore, reservation: Reservation, *,
                     sender: Any, task_name: str, task_id: str, deduplicate: bool,
                     send: Callable[[], Any]) -> Publication:
    """`publish` once the key is reserved (`reservation`, in ``store``): skip a duplicate,
    else send, giving the reservation back if sending fails. Also the second half of a batch
    (`celery_idempotency.batch`), whose reservations are made together."""
    if reservation.replaced_task_id:
        logger.warning("%s key=%r: task %s was reserved but never reached a worker within "
                       "idempotency_pending_timeout; its message is taken as lost and %s "
                       "is published instead", task_name, target.ref.key,
                       reservation.replaced_task_id, task_id)
    if reservation.status is ReserveStatus.DUPLICATE and deduplicate:
        return _skip_duplicate(target, store, reservation, sender=sender, task_name=task_name,
                               task_id=task_id)
    events.announce(events.KEY_RESERVED, sender, key=target.ref.key, scope=target.ref.scope,
                    task_id=task_id, duplicate=reservation.status is ReserveStatus.DUPLICATE)
    # The handle is never a local here: see `publish`.
    return Publication(store=store, duplicate=reservation.status is ReserveStatus.DUPLICATE,
                       sent=_send_or_unreserve(target, store, reservation, task_name=task_name,
                                               task_id=task_id, send=send))


def _reserve(target: KeyTarget, *, task_name: str, task_id: str, open_store: OpenStore,
             delay_ms: int) -> tuple[KeyStore, Reservation] | None:
    """The store and its reservation, or None to publish unprotected (fail_open)."""
    config = target.config
    try:
        # Opening may fail like any call (a Cluster connects at once); an evicting store
        # is refused here (StoreMisconfigured, never bypassed by fail_open).
        store = open_store(config)
        # The reservation must outlive the wait for a countdown/eta, and then the TTL.
        reservation = store.reserve(
            target.ref, task_id=task_id, fingerprint=target.fingerprint, task_name=task_name,
            ttl_ms=config.ttl_ms + delay_ms, pending_ms=config.pending_ms + delay_ms)
    except StoreUnavailable:
        if not config.fail_open:
            raise
        logger.warning("idempotency store unreachable; publishing %s[%s] key=%r "
                       "UNPROTECTED (idempotency_on_store_error='fail_open')",
                       task_name, task_id, target.ref.key)
        return None
    return store, reservation


def _skip_duplicate(target: KeyTarget, store: KeyStore, reservation: Reservation, *,
                    sender: Any, task_name: str, task_id: str) -> Publication:
    record = reservation.record
    assert record is not None
    logger.info("duplicate publish of %s key=%r: not sent, original task %s (%s)",
                task_name, target.ref.key, record.task_id, record.state.value)
    events.announce(events.DUPLICATE_PUBLISHED, sender, key=target.ref.key,
                    scope=target.ref.scope, task_id=task_id, original_task_id=record.task_id)
    return Publication(store=store, original_task_id=record.task_id, duplicate=True)


def _send_or_unreserve(target: KeyTarget, store: KeyStore, reservation: Reservation, *,
                       task_name: str, task_id: str, send: Callable[[], Any]) -> Any:
    try:
        return send()
    except BaseException:
        if reservation.status is ReserveStatus.RESERVED:
            # Compare-and-delete: only our own, still pending reservation goes.
            try:
                store.unreserve(target.ref, task_id=task_id)
            except IdempotencyError as exc:  # the publish error is the one to raise
                logger.error("publish of %s[%s] failed and its reservation of key %r could "
                             "not be undone (%s); release it with the CLI", task_name,
                             task_id, target.ref.key, exc)
        raise


# -- execute ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoOutcome:
    """How a task that ended without an outcome of its own leaves its key.

    ``reason`` is what `events.CLAIM_RELEASED` (and `signals.claim_released`) reports:
    ``retry`` (pending for the re-sent message), ``ignore`` (the key is discarded: deleted),
    ``reject`` (pending for a requeued message, else failed, retryable)."""

    reason: str
    requeue: bool = False
    delay_ms: int = 0  # retry: how far ahead the re-sent message is due

    @classmethod
    def retry(cls, delay_ms: int) -> NoOutcome:
        return cls("retry", delay_ms=delay_ms)

    @classmethod
    def discard(cls) -> NoOutcome:
        return cls("ignore")

    @classmethod
    def reject(cls, *, requeue: bool) -> NoOutcome:
        return cls("reject", requeue=requeue)


class Execution:
    """One delivery of a message of an idempotent task, handled under the protocol.

    The hook methods at the end are where the task framework plugs in (Celery's, in
    `celery_idempotency.task`)."""

    def __init__(self, target: KeyTarget, *, sender: Any, task_name: str, task_id: str,
                 lease_ms: int, store_attempt: int = 0, busy_attempt: int = 0,
                 parked: bool = False) -> None:
        self.target = target
        self.ref = target.ref
        self.config = target.config
        self.sender = sender  # the sender of this library's events and signals (the task)
        self.task_name = task_name
        self.task_id = task_id
        self.lease_ms = lease_ms
        self.store_attempt = store_attempt  # how often the store could not be used so far
        self.busy_attempt = busy_attempt  # how often a live owner held the key so far
        self.parked = parked  # this message (a copy of it) parked on the record before
        self._steps: Steps | None = None
        # (store, owner, fence) once claimed: the claimed run's steps are made from it.
        self._claim_held: tuple[KeyStore, str, int] | None = None

    @property
    def steps(self) -> Steps:
        """The steps of this run: recorded once the key is claimed (`_run_claimed`); until
        then (run unprotected under fail_open) a step just calls its function. Made on first
        use: most tasks take no step."""
        if self._steps is None:
            if self._claim_held is None:
                self._steps = Steps.unclaimed(ref=self.ref, task_name=self.task_name,
                                              task_id=self.task_id, sender=self.sender)
            else:
                store, owner, fence = self._claim_held
                self._steps = Steps(ref=self.ref, config=self.config, task_name=self.task_name,
                                    task_id=self.task_id, sender=self.sender,
                                    claim=StepClaim(store, owner, fence, self.lease_ms),
                                    accept=self.accept_for(self.config.result_serializer),
                                    on_store_unavailable=self._step_store_problem,
                                    on_lease_expired=self._step_lease_expired)
        return self._steps

    @steps.setter
    def steps(self, steps: Steps) -> None:
        self._steps = steps

    def execute(self) -> Any:
        """Claim the key, then run the task, replay its outcome, or come back later."""
        owner = new_owner_token()
        try:
            # In the try: a store refused as evicting (StoreMisconfigured) or unreachable at
            # open (a Cluster connects at once) is handled like a refused claim, not lost.
            store, claim = self._claim(owner)
        except CorruptRecord as exc:
            # This key's record is damaged: it cannot be claimed until an operator deletes it,
            # and running the task unprotected could run it twice. Not run; the task fails
            # with the error naming the key (the caller's result shows it).
            logger.error("%s[%s] key=%r not run: %s", self.task_name, self.task_id,
                         self.ref.key, exc)
            raise
        except (StoreUnavailable, StoreMisconfigured) as exc:
            return self._store_problem(exc)
        return self._handle_for_status(store, claim, owner)

    def _claim(self, owner: str) -> tuple[KeyStore, Claim]:
        store = self.open_store(self.config)
        # A message back from a busy look parks if still busy (its first look waits first).
        return store, self._claim_again(store, owner, park=self.busy_attempt > 0)

    def _handle_for_status(self, store: KeyStore, claim: Claim, owner: str) -> Any:
        if claim.status is ClaimStatus.BUSY:
            claim = self._await_owner(store, claim, owner)
        if claim.status is ClaimStatus.BUSY:
            raise self._busy(store, claim)
        if claim.status is ClaimStatus.HANDLED:
            logger.info("%s[%s] key=%r: another copy of this message already replayed the "
                        "outcome; this one ends without it", self.task_name, self.task_id,
                        self.ref.key)
            raise self.end_as_handled()
        if claim.status is ClaimStatus.SUCCEEDED:
            return self._replay_result(claim)
        if claim.status is ClaimStatus.FAILED:
            raise self._replay_error(claim)
        return self._run_claimed(store, claim, owner)  # claimed, or taken over

    def _store_problem(self, exc: StoreUnavailable | StoreMisconfigured) -> Any:
        misconfigured = isinstance(exc, StoreMisconfigured)
        if self.config.fail_open and not misconfigured:
            logger.warning("idempotency store unreachable; running %s[%s] key=%r "
                           "UNPROTECTED (idempotency_on_store_error='fail_open')",
                           self.task_name, self.task_id, self.ref.key)
            return self.run_task()
        # Not run, and not lost: the message comes back with backoff until the claim
        # lands. A store that refuses for good (ACL, credentials) is an operator's to fix,
        # loudly; fail_open does not bypass it.
        attempt = self.store_attempt
        delay = min(0.5 * 2 ** attempt, self.config.store_retry_max_delay)
        log = logger.error if misconfigured else logger.warning
        log("idempotency store %s; %s[%s] key=%r not run, tried again in %.1f s: %s",
            "misconfigured" if misconfigured else "unreachable", self.task_name, self.task_id,
            self.ref.key, delay, exc)
        raise self.republish_later(delay, {STORE_ATTEMPT_HEADER: attempt + 1}) from None

    def _busy(self, store: KeyStore, claim: Claim) -> BaseException:
        assert claim.record is not None
        if claim.lease_remaining_ms is not None:  # the store's own clock, in its reply
            remaining = claim.lease_remaining_ms / 1000
        else:
            try:
                remaining = ((claim.record.lease_expires_ms or 0) - store.now_ms()) / 1000
            except IdempotencyError:  # only a hint: never lose the message over it
                remaining = self.config.busy_retry_delay
        # Backoff: busy_retry_delay, doubled at each look, so a long owner costs a few re-sends
        # (not one per second); never past the lease left, so a dead owner is taken over as
        # soon as its lease runs out (a live one renews it: the next look comes that soon).
        backoff = self.config.busy_retry_delay * 2 ** min(self.busy_attempt, 30)
        delay = max(0.05, min(backoff, remaining))
        events.announce(events.CLAIM_BUSY, self.sender, key=self.ref.key, scope=self.ref.scope,
                        task_id=self.task_id, owner_task_id=claim.record.task_id, delay=delay)
        parked = self.parked or claim.parked
        logger.info("%s[%s] key=%r is running as task %s; looking again in %.2f s%s",
                    self.task_name, self.task_id, self.ref.key, claim.record.task_id, delay,
                    " (parked)" if parked else "")
        headers: dict[str, Any] = {BUSY_ATTEMPT_HEADER: self.busy_attempt + 1}
        if parked:  # once parked, every copy claims with unpark (the field may still be there)
            headers[PARKED_HEADER] = 1
        return self.republish_later(delay, headers)

    def _await_owner(self, store: KeyStore, claim: Claim, owner: str) -> Claim:
        """On a message's first busy look, wait up to `_BUSY_WAIT` in the worker for the
        owner's outcome, woken by the store (`KeyStore.watch`), and claim again: a short
        owner's duplicate then replays (or runs) at once instead of a re-send later. Only
        with notifications (no polling loop), and only a shortcut: any store error ends it."""
        budget = min(_BUSY_WAIT, self.config.busy_retry_delay,
                     (claim.lease_remaining_ms or 0) / 1000)
        if self.busy_attempt > 0 or budget <= 0:
            return claim
        deadline = time.monotonic() + budget
        holder = claim.record.task_id if claim.record is not None else "?"
        try:
            with store.watch(self.ref) as watch:
                if watch.live:
                    logger.info("%s[%s] key=%r is held by task %s; waiting up to %.2f s for "
                                "its outcome", self.task_name, self.task_id, self.ref.key,
                                holder, budget)
                while watch.live:
                    # Claimed again after subscribing: an outcome written meanwhile is seen.
                    # The look after the wait, followed by a re-send if still busy, parks.
                    left = deadline - time.monotonic()
                    again = self._claim_again(store, owner, park=left <= 0)
                    if again.status is not ClaimStatus.BUSY or left <= 0:
                        return again
                    claim = again
                    watch.wait(left)
        except IdempotencyError:
            pass
        return claim

    def _claim_again(self, store: KeyStore, owner: str, *, park: bool = False) -> Claim:
        park_data = self._park_data(park)
        return store.claim(self.ref, task_id=self.task_id, owner=owner,
                           fingerprint=self.target.fingerprint, task_name=self.task_name,
                           lease_ms=self.lease_ms, ttl_ms=self.config.ttl_ms,
                           park=park_data, unpark=self.parked)

    def _park_data(self, park: bool) -> bytes | None:
        """What the owner needs to publish this message again, or None (not parking)."""
        if not park:
            return None
        try:
            return self.park_data()
        except Exception as exc:  # only a shortcut: the re-send with backoff still comes
            logger.info("%s[%s] key=%r: not parked (%s); it comes back by its countdown",
                        self.task_name, self.task_id, self.ref.key, exc)
            return None

    def _announce_replay(self, claim: Claim, state: str, outcome: str) -> None:
        assert claim.record is not None
        logger.info("%s[%s] key=%r already %s as task %s: replaying its %s",
                    self.task_name, self.task_id, self.ref.key, state, claim.record.task_id,
                    outcome)
        events.announce(events.OUTCOME_REPLAYED, self.sender, key=self.ref.key,
                        scope=self.ref.scope, task_id=self.task_id, state=state)

    def _replay_result(self, claim: Claim) -> Any:
        assert claim.record is not None
        self._announce_replay(claim, "succeeded", "result")
        try:
            return decode_result(claim.record, accept=self.accept_for(
                self.config.result_serializer))
        except ResultNotStored:
            logger.warning("%s[%s] key=%r succeeded before without a cached result; "
                           "returning None", self.task_name, self.task_id, self.ref.key)
            return None

    def _replay_error(self, claim: Claim) -> BaseException:
        assert claim.record is not None
        self._announce_replay(claim, "failed", "error")
        return rebuild_error(claim.record, replayable=self.config.cache_errors)

    def _run_claimed(self, store: KeyStore, claim: Claim, owner: str) -> Any:
        ref = self.ref
        if claim.status is ClaimStatus.TAKEN_OVER:
            logger.warning("%s[%s] key=%r: the lease of task %s expired; taken over "
                           "(fence %d)", self.task_name, self.task_id, ref.key,
                           claim.previous_task_id, claim.fence)
            events.announce(events.LEASE_TAKEN_OVER, self.sender, key=ref.key,
                            scope=ref.scope, task_id=self.task_id, fence=claim.fence,
                            previous_task_id=claim.previous_task_id)
        events.announce(events.KEY_CLAIMED, self.sender, key=ref.key, scope=ref.scope,
                        task_id=self.task_id, fence=claim.fence,
                        took_over=claim.status is ClaimStatus.TAKEN_OVER)
        self.claimed(claim.fence)
        self._steps, self._claim_held = None, (store, owner, claim.fence)
        held = lease_keeper.hold(store, ref, owner, self.lease_ms, fence=claim.fence)
        try:
            return self._get_function_response(store, owner, claim.fence)
        finally:
            lease_keeper.release(held)

    def _get_function_response(self, store: KeyStore, owner: str, fence: int) -> Any:
        """Run the task under the claim and record its outcome."""
        ref, config = self.ref, self.config
        try:
            result = self.run_task()
        except BaseException as exc:
            if not self._lost_at_a_step():
                self._end_with(exc, store, owner)
            raise
        if self._lost_at_a_step():
            return result
        payload = encode_result(self.storable(result), serializer=config.result_serializer,
                                max_bytes=config.max_result_bytes, key=ref.key,
                                task_id=self.task_id)
        parked: list[ParkedDuplicate] = []
        self._write("record success", lambda: parked.extend(
            store.complete(ref, owner=owner, fence=fence, result=payload,
                           ttl_ms=config.ttl_ms)),
            config.store_write_timeout)
        self._wake_parked(parked)
        return result

    def _lost_at_a_step(self) -> bool:
        """Whether a step found that another worker took the key over. Then this run writes
        nothing (no outcome, no release): the key is the new owner's, and whatever this run
        ends with (`OwnershipLost`, unless the task caught it) is only its own task id's."""
        steps = self._steps  # None: no step was taken, none found the claim lost
        lost = steps.ownership_lost if steps is not None else None
        if lost is not None:
            logger.warning("%s[%s] key=%r: lost the claim at a step; no outcome recorded, the "
                           "key is left to its new owner", self.task_name, self.task_id,
                           self.ref.key)
        return lost is not None

    def _step_store_problem(self, exc: StoreUnavailable, step: str) -> BaseException:
        """A step cannot reach the store: it neither runs unprotected (fail_open or not: the
        steps before it were recorded, it may have been too) nor is the message lost. The
        message comes back later, with the claim's backoff; the exception returned ends this
        run like a retry (the key goes back to pending for it, once the store answers)."""
        attempt = self.store_attempt
        delay = min(0.5 * 2 ** attempt, self.config.store_retry_max_delay)
        logger.warning("idempotency store unreachable at step %r of %s[%s] key=%r; tried "
                       "again in %.1f s: %s", step, self.task_name, self.task_id, self.ref.key,
                       delay, exc)
        return self.republish_later(delay, {STORE_ATTEMPT_HEADER: attempt + 1})

    def _step_lease_expired(self, exc: LeaseExpired, step: str) -> BaseException:
        """The claim's lease ran out before a step (the lease keeper could not renew it in
        time) and nobody took the key over yet. The step does not start: the message comes
        back at once, and the run ends like a retry (the key goes back to pending for it), so
        that the next run continues from the steps recorded so far. Should another worker take
        the key over first, the release is refused and the message waits for its outcome."""
        return self.republish_later(0.0, {})

    def _end_with(self, exc: BaseException, store: KeyStore, owner: str) -> None:
        """Record the task's error, or give the claim up when the error is not an outcome."""
        ref, config = self.ref, self.config
        no_outcome = self.no_outcome(exc)
        if no_outcome is not None:
            self._end_without_outcome(no_outcome, exc, store, owner)
        elif isinstance(exc, Exception):
            error = encode_error(exc, max_bytes=config.max_result_bytes)
            cacheable = isinstance(exc, config.cache_errors)
            parked: list[ParkedDuplicate] = []
            self._write("record failure", lambda: parked.extend(store.fail(
                ref, owner=owner, error=error, retryable=not cacheable, ttl_ms=config.ttl_ms)),
                config.store_write_timeout)
            self._wake_parked(parked)
        else:
            # Worker shutting down mid-task (SystemExit, KeyboardInterrupt): give the claim
            # back so that the redelivered message runs at once instead of waiting out the
            # lease. Shutting down: do not hold the worker up; the lease frees the key
            # regardless.
            self._give_up(store, owner, exc, requeue=True, reason="shutdown", timeout=1.0)

    def _wake_parked(self, parked: list[ParkedDuplicate]) -> None:
        """Publish the parked duplicates again at once, so that they find the outcome now
        rather than at their countdown. Best effort: the countdown copy still comes."""
        if not parked:
            return
        try:
            self.wake_parked(parked)
        except Exception as exc:
            logger.error("%s[%s] key=%r: could not wake %d parked duplicate(s) (%s); they come "
                         "back by their countdown", self.task_name, self.task_id, self.ref.key,
                         len(parked), exc, exc_info=True)
            return
        logger.info("%s[%s] key=%r: woke %d parked duplicate(s): %s", self.task_name,
                    self.task_id, self.ref.key, len(parked),
                    ", ".join(duplicate.task_id for duplicate in parked))

    def _end_without_outcome(self, no_outcome: NoOutcome, exc: BaseException,
                             store: KeyStore, owner: str) -> None:
        ref, config = self.ref, self.config
        if no_outcome.reason == "retry":
            # The retry was published: pending for it, with a deadline past its countdown.
            extra_ms = no_outcome.delay_ms
            self._write("release for retry",
                        lambda: store.requeue(ref, owner=owner, ttl_ms=config.ttl_ms + extra_ms,
                                              pending_ms=config.pending_ms + extra_ms),
                        config.store_write_timeout)
            self._released(no_outcome.reason)
        elif no_outcome.reason == "ignore":
            # The task chose to leave no outcome (e.g. it replaced itself): free the key.
            self._write("discard", lambda: store.discard(ref, owner=owner),
                        config.store_write_timeout)
            self._released(no_outcome.reason)
        else:
            # Rejected: if the message is gone, the key fails (retryable) and the next publish
            # runs the task; handles already given out see the error instead of waiting.
            self._give_up(store, owner, exc, requeue=no_outcome.requeue,
                          reason=no_outcome.reason, timeout=config.store_write_timeout)

    def _write(self, what: str, action: Callable[[], Any], timeout: float) -> None:
        """An owner-checked outcome write, never forced over a new owner.

        While the store is unreachable it is retried for up to ``timeout`` seconds
        (``idempotency_store_write_timeout``): the message is acknowledged once the task
        returns, so this write is the only thing that will ever record the outcome. The
        task's own outcome goes to the framework either way."""
        ref = self.ref
        deadline = time.monotonic() + timeout
        pause = _WRITE_PAUSE_FIRST
        while True:
            try:
                action()
                return
            except OwnershipLost as exc:
                logger.error("%s[%s]: did not %s: %s", self.task_name, self.task_id, what, exc)
                events.announce(events.OWNERSHIP_LOST, self.sender, key=ref.key,
                                scope=ref.scope, task_id=self.task_id, action=what)
                return
            except (StoreMisconfigured, CorruptRecord) as exc:
                # Retrying cannot help: say so at once instead of for store_write_timeout.
                logger.error("%s[%s] key=%r: could not %s: %s; the claim stays until its lease "
                             "expires", self.task_name, self.task_id, ref.key, what, exc)
                return
            except StoreUnavailable as exc:
                if time.monotonic() + pause > deadline:
                    logger.error("%s[%s] key=%r: could not %s, store unreachable for %.0f s "
                                 "(%s); the claim stays until its lease expires",
                                 self.task_name, self.task_id, ref.key, what, timeout, exc)
                    return
                if pause == _WRITE_PAUSE_FIRST:
                    logger.warning("%s[%s] key=%r: store unreachable, trying to %s for up to "
                                   "%.0f s (%s)", self.task_name, self.task_id, ref.key, what,
                                   timeout, exc)
                time.sleep(pause)
                pause = min(pause * 2, _WRITE_PAUSE_MAX)

    def _give_up(self, store: KeyStore, owner: str, exc: BaseException, *, requeue: bool,
                 reason: str, timeout: float) -> None:
        """The task ends without an outcome of its own. If its message goes back to the
        broker (`message_requeues`), the key is ``pending`` with a deadline for the
        redelivery; if the message is gone, it is ``failed`` (retryable), so that the next
        publish runs the task."""
        ref, config = self.ref, self.config
        if requeue and self.message_requeues():
            self._write("release", lambda: store.requeue(
                ref, owner=owner, pending_ms=config.pending_ms), timeout)
            self._released(reason)
            return
        error = encode_error(exc, max_bytes=config.max_result_bytes)
        self._write("record failure", lambda: store.fail(
            ref, owner=owner, error=error, retryable=True, ttl_ms=config.ttl_ms), timeout)
        self._released(reason)

    def _released(self, reason: str) -> None:
        events.announce(events.CLAIM_RELEASED, self.sender, key=self.ref.key,
                        scope=self.ref.scope, task_id=self.task_id, reason=reason)

    # -- hooks: what the task framework provides ---------------------------------------------

    def open_store(self, config: IdempotencyConfig) -> KeyStore:
        raise NotImplementedError

    def run_task(self) -> Any:
        """Run the task body; its return value is the task's result."""
        raise NotImplementedError

    def claimed(self, fence: int) -> None:
        """The key is held under ``fence``; the task is about to run."""

    def no_outcome(self, exc: BaseException) -> NoOutcome | None:
        """How ``exc`` (raised by the task) ends it without an outcome, or None: an error."""
        return None

    def storable(self, result: Any) -> Any:
        """The task's result as it is cached."""
        return result

    def accept_for(self, serializer: str) -> Any:
        """The content types a replayed result may be decoded from."""
        raise NotImplementedError

    def message_requeues(self) -> bool:
        """Whether a message given back goes back to the broker (else it is already gone)."""
        raise NotImplementedError

    def republish_later(self, delay: float, extra_headers: Mapping[str, Any]) -> BaseException:
        """Send this message again in ``delay`` seconds; the exception that ends this run."""
        raise NotImplementedError

    def park_data(self) -> bytes | None:
        """What it takes to publish this message again, given the owner's arguments (the same
        fingerprint): its task name and options (callbacks, group, chord, headers...). None:
        this framework does not park (the message comes back by its countdown only)."""
        return None

    def wake_parked(self, parked: list[ParkedDuplicate]) -> None:
        """Publish each parked duplicate again now (from its `park_data`, with this run's
        arguments), marked with `PARKED_HEADER`."""
        raise NotImplementedError

    def end_as_handled(self) -> BaseException:
        """The exception that ends a copy whose outcome another copy already replayed: no
        result, no callbacks."""
        raise NotImplementedError


# -- abandon (the worker's main process) ------------------------------------------------------


def abandon(locate: Callable[[], tuple[KeyTarget, KeyStore]], *, sender: Any, task_name: str,
            task_id: str, owner_prefix: str, requeued: bool, error: BaseException) -> None:
    """Give up the claim of a task that will not write its outcome (its process died, or it
    was revoked): ``pending`` for the redelivery if ``requeued``, else ``failed``
    (retryable). Never raises: the lease frees the key if the store cannot be used."""
    try:
        target, store = locate()
        changed = store.abandon(target.ref, task_id=task_id, owner_prefix=owner_prefix,
                                requeued=requeued, error=encode_error(error),
                                ttl_ms=target.config.ttl_ms,
                                pending_ms=target.config.pending_ms)
    except Exception as exc:
        # Never let the store break the framework's handling of the message (it runs around
        # this call, in the worker's main process): an unavailable, misconfigured or corrupt
        # store only means the lease has to run out instead.
        logger.error("%s[%s]: could not give up its claim after %r: %s; it stays until "
                     "its lease expires", task_name, task_id, error, exc,
                     exc_info=not isinstance(exc, IdempotencyError))
        return
    if changed:
        events.announce(events.CLAIM_RELEASED, sender, key=target.ref.key,
                        scope=target.ref.scope, task_id=task_id,
                        reason="requeued" if requeued else "abandoned")
        logger.warning("%s[%s] key=%r: %s; claim given up (%s)", task_name, task_id,
                       target.ref.key, error or type(error).__name__,
                       "pending for the redelivery" if requeued
                       else "failed, the next publish runs it")
