"""The memory store and the Redis store, driven side by side through random sequences of every
transition (hypothesis ``RuleBasedStateMachine``): their replies must agree, and both must keep
the state machine's invariants after every step:

* at most one live owner per key: a claim never succeeds while another owner's claim is live;
* a non-owner's write (complete, fail, requeue, renew, discard) is refused and changes nothing;
* the fence of a key never decreases, deletions, expiry and eviction included: every new claim
  fences above every earlier one, and a stored fence is 0 (never claimed) or the last one;
* no record without a way out: ``started`` has a lease and lives at least as long as it,
  ``pending`` has a deadline and lives at least until then, every record has a TTL.

Time is not waited for: lease expiry and pending deadlines are moved into the past by writing
the same field in both stores, TTL expiry and eviction by expiring or deleting the record in
both, so that the run is fast and both stores see exactly the same history. Leases, TTLs and
deadlines are minutes to days long, far longer than a run.

Budget: ``MAX_EXAMPLES`` sequences of up to ``STEPS`` steps (a few seconds in CI). A failure prints
the falsifying steps, an ``@reproduce_failure`` blob and the run's seed (set
``IDEMPOTENCY_STATE_SEED`` to replay it).
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from celery_idempotency import (
    IdempotencyKeyMismatch,
    KeyState,
    KeyStore,
    MemoryKeyStore,
    OwnershipLost,
    RecordRef,
    RedisKeyStore,
)
from celery_idempotency.records import Record
from celery_idempotency.store import Claim, ClaimStatus
from tests.support.records import RESULT
from tests.support.services import RedisServer

# The CI budget; raise it locally (e.g. IDEMPOTENCY_STATE_EXAMPLES=2000) for a longer hunt.
MAX_EXAMPLES = int(os.environ.get("IDEMPOTENCY_STATE_EXAMPLES") or 150)
STEPS = 40
SEED = int(os.environ.get("IDEMPOTENCY_STATE_SEED") or random.randrange(2**32))

PREFIX = "sm:"
MIN = 60_000
DAY = 24 * 60 * MIN
# One key, in a scope that is not its task name (so the record keeps the name too): every
# step acts on the same record, which keeps the sequences dense in interesting transitions.
KEYS = {RecordRef("receipts", "k1"): "tasks.send_receipt"}
TASK_IDS = ("t1", "t2", "t3")
# Owner tokens name their process (host:pid.) as real ones do, so that abandon can match them.
OWNERS = ("h1:1a.o1", "h1:1a.o2", "h1:2b.o3", "h1:2b.o4")
OWNER_PREFIXES = ("h1:1a.", "h1:2b.", "h1:3c.", "")
FINGERPRINTS = ("fp1",) * 7 + ("fp2",)  # mostly the same arguments, sometimes not
TTLS = (5 * MIN, DAY)
LEASES = (10 * MIN, 2 * DAY)  # one longer than every TTL: the record must outlive it
PENDINGS = (20 * MIN,)
DELAYS = (0, 60 * MIN)  # a countdown/eta, added to the TTL and the deadline
ERROR = '{"type":"builtins.ValueError","message":"m","args":["m"]}'
# Reading a TTL and the clock is two calls: allow this much between them.
SLACK_MS = 1_000

keys = st.sampled_from(list(KEYS))
task_ids = st.sampled_from(TASK_IDS)
owners = st.sampled_from(OWNERS)
# Most owner writes come from the record's owner: random owners alone would almost only
# exercise refusals (which the rest still do).
as_holder = st.sampled_from((True, True, True, False))


def _outcome(call: Callable[[], Any]) -> Any:
    """A call's reply, or the type of the library error it raised (for comparing stores)."""
    try:
        return call()
    except (IdempotencyKeyMismatch, OwnershipLost) as exc:
        return type(exc)


class StoreMachine(RuleBasedStateMachine):
    redis_url = ""  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.memory = MemoryKeyStore(prefix=PREFIX)
        redis_store = RedisKeyStore.from_url(self.redis_url, prefix=PREFIX)
        redis_store.client.flushdb()
        self.redis = redis_store
        self.stores: dict[str, KeyStore] = {"memory": self.memory, "redis": self.redis}
        # The highest fence each store handed out per key (never reset: deletions included).
        self.last_fence: dict[str, dict[RecordRef, int]] = {
            name: dict.fromkeys(KEYS, 0) for name in self.stores}
        # The owner whose claim is live, per key (leases only end when a rule ends them).
        self.live_owner: dict[RecordRef, str | None] = dict.fromkeys(KEYS)
        # The fence of each owner's last claim per store (what a worker passes to complete),
        # and who claimed each key last (a succeeded record no longer names its owner).
        self.claim_fence: dict[str, dict[tuple[RecordRef, str], int]] = {
            name: {} for name in self.stores}
        self.last_claimer: dict[RecordRef, str | None] = dict.fromkeys(KEYS)

    def teardown(self) -> None:
        self.redis.close()

    # -- helpers ---------------------------------------------------------------------------

    def both(self, call: Callable[[KeyStore], Any]) -> dict[str, Any]:
        return {name: _outcome(lambda store=store: call(store))
                for name, store in self.stores.items()}

    def agree(self, replies: dict[str, Any], what: str) -> Any:
        normal = {name: self.normal(name, reply) for name, reply in replies.items()}
        assert normal["memory"] == normal["redis"], f"{what}: the stores disagree: {normal}"
        return replies["memory"]

    def normal(self, name: str, reply: Any) -> Any:
        """A reply without what legitimately differs between stores: clock values (compared
        as "still in the future or not") and fences (checked per store)."""
        if isinstance(reply, Record):
            return self.view(name, reply)
        if isinstance(reply, Claim) and reply.lease_remaining_ms is not None:
            assert reply.lease_remaining_ms > 0, f"{name}: busy with a lease that ran out"
            reply = dataclasses.replace(reply, lease_remaining_ms=1)  # time left: yes
        if hasattr(reply, "__dataclass_fields__"):
            return {field: self.normal(name, getattr(reply, field))
                    for field in reply.__dataclass_fields__ if field != "fence"}
        return reply

    def view(self, name: str, record: Record | None) -> dict[str, Any] | None:
        if record is None:
            return None
        now = self.stores[name].now_ms()
        return {
            "state": record.state, "key": record.key, "scope": record.scope,
            "task_name": record.task_name, "task_id": record.task_id,
            "fingerprint": record.fingerprint, "owner": record.owner, "result": record.result,
            "content_type": record.content_type, "result_status": record.result_status,
            "error": record.error, "retryable": record.retryable,
            "claimed_ever": record.fence > 0,
            "lease_alive": None if record.lease_expires_ms is None
            else record.lease_expires_ms > now,
            "deadline_ahead": None if record.pending_deadline_ms is None
            else record.pending_deadline_ms > now,
        }

    def snapshot(self, ref: RecordRef) -> dict[str, Record | None]:
        return {name: store.get(ref) for name, store in self.stores.items()}

    def record(self, ref: RecordRef) -> Record | None:
        return self.memory.get(ref)

    def holds(self, record: Record | None, owner: str) -> bool:
        return record is not None and record.state is KeyState.STARTED and record.owner == owner

    def assert_unchanged(self, ref: RecordRef, before: dict[str, Record | None],
                         what: str) -> None:
        after = self.snapshot(ref)
        assert after == before, f"{what} by a non-owner changed the record: {before} -> {after}"

    def ended(self, ref: RecordRef) -> None:
        self.live_owner[ref] = None

    def writer(self, ref: RecordRef, owner: str, holder: bool) -> str:
        """``owner``, or with ``holder`` the owner named in the record (live or not), or for a
        record that names none (succeeded) the last claimer."""
        record = self.record(ref)
        if not holder or record is None:
            return owner
        return record.owner or self.last_claimer[ref] or owner

    # -- publish ---------------------------------------------------------------------------

    @rule(ref=keys, task_id=task_ids, fp=st.sampled_from(FINGERPRINTS),
          ttl=st.sampled_from(TTLS), pending=st.sampled_from(PENDINGS),
          delay=st.sampled_from(DELAYS))
    def reserve(self, ref: RecordRef, task_id: str, fp: str, ttl: int, pending: int,
                delay: int) -> None:
        reply = self.agree(self.both(lambda s: s.reserve(
            ref, task_id=task_id, fingerprint=fp, task_name=KEYS[ref], ttl_ms=ttl + delay,
            pending_ms=pending + delay)), "reserve")
        if reply is IdempotencyKeyMismatch:
            return
        self.same_ttl(ref, "reserve")

    @rule(ref=keys, task_id=task_ids, holder=as_holder)
    def unreserve(self, ref: RecordRef, task_id: str, holder: bool) -> None:
        record = self.record(ref)
        if holder and record is not None:  # the publisher of the record's task
            task_id = record.task_id
        self.agree(self.both(lambda s: s.unreserve(ref, task_id=task_id)), "unreserve")

    # -- execute ---------------------------------------------------------------------------

    @rule(ref=keys, task_id=task_ids, owner=owners, fp=st.sampled_from(FINGERPRINTS),
          lease=st.sampled_from(LEASES), ttl=st.sampled_from(TTLS))
    def claim(self, ref: RecordRef, task_id: str, owner: str, fp: str, lease: int,
              ttl: int) -> None:
        before = self.snapshot(ref)
        replies = self.both(lambda s: s.claim(ref, task_id=task_id, owner=owner, fingerprint=fp,
                                              task_name=KEYS[ref], lease_ms=lease, ttl_ms=ttl))
        reply = self.agree(replies, "claim")
        if reply is IdempotencyKeyMismatch or reply.status not in (ClaimStatus.CLAIMED,
                                                                  ClaimStatus.TAKEN_OVER):
            return
        self.last_claimer[ref] = owner
        for name, claim in replies.items():
            self.claim_fence[name][(ref, owner)] = claim.fence
            held = before[name]
            if self.holds(held, owner):  # its own claim, asked again: the same fence
                assert held is not None and claim.fence == held.fence, (name, claim, held)
                continue
            assert claim.fence > self.last_fence[name][ref], \
                f"{name}: fence went from {self.last_fence[name][ref]} to {claim.fence}"
            self.last_fence[name][ref] = claim.fence
        live = self.live_owner[ref]
        assert live is None or live == owner, f"{owner} claimed {ref} while {live} holds it"
        self.live_owner[ref] = owner
        self.same_ttl(ref, "claim")

    @rule(ref=keys, owner=owners, holder=as_holder)
    def complete(self, ref: RecordRef, owner: str, holder: bool) -> None:
        owner = self.writer(ref, owner, holder)
        # Each store's own fence of the owner's last claim (0: it never claimed).
        fences = {id(store): self.claim_fence[name].get((ref, owner), 0)
                  for name, store in self.stores.items()}
        self.finish(ref, owner, KeyState.SUCCEEDED, lambda s: s.complete(
            ref, owner=owner, fence=fences[id(s)], result=RESULT, ttl_ms=DAY))

    @rule(ref=keys, owner=owners, holder=as_holder, retryable=st.booleans())
    def fail(self, ref: RecordRef, owner: str, holder: bool, retryable: bool) -> None:
        owner = self.writer(ref, owner, holder)
        self.finish(ref, owner, KeyState.FAILED, lambda s: s.fail(
            ref, owner=owner, error=ERROR, retryable=retryable, ttl_ms=DAY))

    def finish(self, ref: RecordRef, owner: str, final: KeyState,
               call: Callable[[KeyStore], Any]) -> None:
        before = self.snapshot(ref)
        record = before["memory"]
        if final is KeyState.SUCCEEDED:  # no owner kept: the fence of the owner's claim
            repeated = (record is not None and record.state is final
                        and record.fence == self.claim_fence["memory"].get((ref, owner)))
        else:
            repeated = record is not None and record.owner == owner and record.state is final
        reply = self.agree(self.both(call), final.value)
        if self.holds(record, owner):
            assert reply == []  # no parked duplicates
            self.ended(ref)
        elif repeated:
            assert reply == []  # the owner's own write, retried
        else:
            assert reply is OwnershipLost
            self.assert_unchanged(ref, before, final.value)

    @rule(ref=keys, owner=owners, holder=as_holder, ttl=st.none() | st.sampled_from(TTLS),
          pending=st.sampled_from(PENDINGS), delay=st.sampled_from(DELAYS))
    def requeue(self, ref: RecordRef, owner: str, holder: bool, ttl: int | None, pending: int,
                delay: int) -> None:
        owner = self.writer(ref, owner, holder)
        before = self.snapshot(ref)
        record = before["memory"]
        reply = self.agree(self.both(lambda s: s.requeue(
            ref, owner=owner, ttl_ms=None if ttl is None else ttl + delay,
            pending_ms=pending + delay)), "requeue")
        if self.holds(record, owner):
            assert reply is True
            self.ended(ref)
            self.same_ttl(ref, "requeue")
        elif record is not None and record.owner == owner and record.state is KeyState.PENDING:
            assert reply is True  # the owner's own requeue, retried
        else:
            assert reply is False
            self.assert_unchanged(ref, before, "requeue")

    @rule(ref=keys, owner=owners, holder=as_holder, lease=st.sampled_from(LEASES))
    def renew(self, ref: RecordRef, owner: str, holder: bool, lease: int) -> None:
        owner = self.writer(ref, owner, holder)
        before = self.snapshot(ref)
        reply = self.agree(self.both(lambda s: s.renew(ref, owner=owner, lease_ms=lease)),
                           "renew")
        assert reply is self.holds(before["memory"], owner)
        if reply:
            self.same_ttl(ref, "renew")
        else:
            self.assert_unchanged(ref, before, "renew")

    @rule(ref=keys, owner=owners, holder=as_holder)
    def discard(self, ref: RecordRef, owner: str, holder: bool) -> None:
        owner = self.writer(ref, owner, holder)
        before = self.snapshot(ref)
        reply = self.agree(self.both(lambda s: s.discard(ref, owner=owner)), "discard")
        assert reply is self.holds(before["memory"], owner)
        if reply:
            self.ended(ref)
        else:
            self.assert_unchanged(ref, before, "discard")

    @rule(ref=keys, task_id=task_ids, prefix=st.sampled_from(OWNER_PREFIXES),
          holder=as_holder, requeued=st.booleans())
    def abandon(self, ref: RecordRef, task_id: str, prefix: str, holder: bool,
                requeued: bool) -> None:
        record = self.record(ref)
        if holder and record is not None:  # the worker that ran the record's task
            task_id = record.task_id
        before = self.snapshot(ref)
        reply = self.agree(self.both(lambda s: s.abandon(
            ref, task_id=task_id, owner_prefix=prefix, requeued=requeued, error=ERROR,
            ttl_ms=DAY, pending_ms=PENDINGS[0])), "abandon")
        if reply:
            self.ended(ref)
            self.same_ttl(ref, "abandon")
        else:
            self.assert_unchanged(ref, before, "abandon")

    # -- operators, time and memory pressure -----------------------------------------------

    @rule(ref=keys, how=st.sampled_from(("operator", "evicted", "expired")))
    def record_goes(self, ref: RecordRef, how: str) -> None:
        """The record is deleted: by an operator (CLI ``release``/``purge``: compare-and-delete
        of the record as just read), by eviction or a failover that lost it, or by its TTL."""
        if how == "operator":
            seen = self.snapshot(ref)
            reply = self.agree({name: None if seen[name] is None
                                else store.delete_if_unchanged(seen[name])  # type: ignore
                                for name, store in self.stores.items()}, "delete_if_unchanged")
            if reply:
                self.ended(ref)
            return
        name = self.memory.store_key(ref)
        if how == "evicted":
            self.memory._delete(name)
            self.redis.client.delete(self.redis.store_key(ref))
        else:
            with self.memory._lock:
                if name in self.memory._records:
                    self.memory._expires[name] = self.memory.now_ms()
            self.redis.client.pexpire(self.redis.store_key(ref), 1)
            time.sleep(0.002)
        self.ended(ref)

    @rule(ref=keys)
    def clock_passes_a_deadline(self, ref: RecordRef) -> None:
        """The lease of a started record, or the deadline of a pending one, is over."""
        if self.set_field_if(ref, KeyState.STARTED, "l"):
            self.ended(ref)
        else:
            self.set_field_if(ref, KeyState.PENDING, "pd")

    def set_field_if(self, ref: RecordRef, state: KeyState, field: str) -> bool:
        """Move a clock field to the distant past (epoch + 1 ms) in both stores."""
        record = self.record(ref)
        if record is None or record.state is not state:
            return False
        with self.memory._lock:
            self.memory._records[self.memory.store_key(ref)][field] = b"1"
        self.redis.client.hset(self.redis.store_key(ref), field, "1")
        return True

    def same_ttl(self, ref: RecordRef, what: str) -> None:
        ttls = {name: (entry.ttl_ms if entry else None)
                for name, store in self.stores.items() for entry in [store.entry(ref)]}
        memory, redis = ttls["memory"], ttls["redis"]
        assert (memory is None) == (redis is None), f"{what}: TTLs differ: {ttls}"
        if memory is not None and redis is not None:
            assert abs(memory - redis) <= SLACK_MS, f"{what}: TTLs differ: {ttls}"

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def stores_hold_the_same_records(self) -> None:
        for ref in KEYS:
            views = {name: self.view(name, record)
                     for name, record in self.snapshot(ref).items()}
            assert views["memory"] == views["redis"], f"{ref}: records differ: {views}"

    @invariant()
    def every_record_has_a_way_out(self) -> None:
        for name, store in self.stores.items():
            for ref in KEYS:
                now = store.now_ms()  # before the TTL is read: expiry is never overestimated
                entry = store.entry(ref)
                if entry is None:
                    continue
                record = entry.record
                assert record is not None, entry.error
                assert entry.ttl_ms is not None, f"{name} {ref}: a record without a TTL"
                expires_at = now + entry.ttl_ms
                if record.state is KeyState.STARTED:
                    assert record.owner and record.lease_expires_ms is not None, record
                    assert record.pending_deadline_ms is None, record
                    assert expires_at + SLACK_MS >= record.lease_expires_ms, \
                        f"{name} {ref}: the record expires before its lease: {entry}"
                elif record.state is KeyState.PENDING:
                    assert record.pending_deadline_ms is not None, \
                        f"{name} {ref}: pending without a deadline: {record}"
                    assert record.lease_expires_ms is None, record
                    assert expires_at + SLACK_MS >= record.pending_deadline_ms, \
                        f"{name} {ref}: the record expires before its deadline: {entry}"
                else:
                    assert record.lease_expires_ms is None, record
                    assert record.pending_deadline_ms is None, record

    @invariant()
    def stored_fence_is_the_last_one_or_none(self) -> None:
        for name, store in self.stores.items():
            for ref in KEYS:
                record = store.get(ref)
                if record is not None:
                    assert record.fence in (0, self.last_fence[name][ref]), \
                        f"{name} {ref}: stored fence {record.fence}, last handed out " \
                        f"{self.last_fence[name][ref]}"

    @invariant()
    def at_most_one_live_owner(self) -> None:
        for ref in KEYS:
            record = self.record(ref)
            live = self.live_owner[ref]
            if live is not None:
                assert self.holds(record, live), f"{ref}: {live} should hold {record}"


@pytest.fixture(scope="module")
def state_machine_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


def test_memory_and_redis_stores_agree_and_keep_the_invariants(
        state_machine_redis: RedisServer) -> None:
    StoreMachine.redis_url = state_machine_redis.url(0)
    budget = settings(max_examples=MAX_EXAMPLES, stateful_step_count=STEPS, deadline=None,
                      print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    try:
        run_state_machine_as_test(seed(SEED)(StoreMachine), settings=budget)
    except BaseException:
        print(f"state machine run with @seed({SEED}); replay it with "
              f"IDEMPOTENCY_STATE_SEED={SEED}")
        raise
