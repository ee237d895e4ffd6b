"""Recovery points in the store: `KeyStore.begin_step` and `KeyStore.save_step`, on every
store of the contract suite (memory, Redis, Sentinel, Cluster).

Steps are fields of the record's own hash: they are owner- and fence-checked like every write,
live and expire with the record (on a Cluster, in its hash slot), survive every way a key can
run again (retryable failure, retry, requeue, abandon, take-over, a new reservation) and are
dropped once the outcome is final (success, or an error that is cached)."""

from __future__ import annotations

import importlib.resources
import json
import re
import time
from typing import Any

import pytest

from celery_idempotency import (
    CorruptRecord,
    IdempotencyConfig,
    KeyState,
    KeyStore,
    LeaseExpired,
    OwnershipLost,
    RecordRef,
    RedisKeyStore,
)
from celery_idempotency.records import F_STEP_PREFIX, encode_step_value, step_field
from celery_idempotency.steps import StepClaim, Steps
from celery_idempotency.store import ClaimStatus, ReserveStatus
from tests.support.records import DAY_MS, PENDING_MS, REF, RESULT

LEASE_MS = 60_000
VALUE = encode_step_value(b'{"id": "ch_1"}', "application/json", "utf-8")


def reserve(store: KeyStore, task_id: str = "t1", ref: RecordRef = REF,
            ttl_ms: int = DAY_MS) -> Any:
    return store.reserve(ref, task_id=task_id, fingerprint="fp1", task_name="tasks.charge",
                         ttl_ms=ttl_ms, pending_ms=PENDING_MS)


def claim(store: KeyStore, task_id: str = "t1", owner: str = "o1", lease_ms: int = LEASE_MS,
          ttl_ms: int = DAY_MS, ref: RecordRef = REF) -> int:
    """Claim the key; the claim's fence."""
    result = store.claim(ref, task_id=task_id, owner=owner, fingerprint="fp1",
                         task_name="tasks.charge", lease_ms=lease_ms, ttl_ms=ttl_ms)
    assert result.status in (ClaimStatus.CLAIMED, ClaimStatus.TAKEN_OVER), result
    return result.fence


def begin(store: KeyStore, owner: str, fence: int, name: str = "charge",
          lease_ms: int = LEASE_MS, ref: RecordRef = REF) -> bytes | None:
    return store.begin_step(ref, owner=owner, fence=fence, name=name, lease_ms=lease_ms)


def save(store: KeyStore, owner: str, fence: int, name: str = "charge",
         value: bytes = VALUE, ref: RecordRef = REF) -> None:
    store.save_step(ref, owner=owner, fence=fence, name=name, value=value)


def recorded_step(store: KeyStore, name: str = "charge") -> tuple[str, ...]:
    record = store.get(REF)
    assert record is not None
    return tuple(step for step in record.steps if step == name)


def claimed_with_step(store: KeyStore, owner: str = "o1") -> int:
    reserve(store)
    fence = claim(store, owner=owner)
    assert begin(store, owner, fence) is None
    save(store, owner, fence)
    return fence


def wait_past(ms: int) -> None:
    """Let ``ms`` of the store's clock pass (a lease or TTL running out): waiting longer than
    needed only makes the test slower, never wrong."""
    time.sleep(ms / 1000 + 0.05)


# -- begin and save ----------------------------------------------------------------------------

def test_a_step_round_trips_its_value_byte_for_byte(store: KeyStore) -> None:
    reserve(store)
    fence = claim(store)
    assert begin(store, "o1", fence) is None  # not recorded yet
    value = bytes(range(256)) * 4  # every byte value, NUL included
    save(store, "o1", fence, value=value)
    assert begin(store, "o1", fence) == value
    record = store.get(REF)
    assert record is not None and record.steps == ("charge",)
    assert (record.state, record.owner, record.fence) == (KeyState.STARTED, "o1", fence)


def test_saving_a_step_again_replaces_its_value(store: KeyStore) -> None:
    fence = claimed_with_step(store)
    save(store, "o1", fence, value=b"second")
    assert begin(store, "o1", fence) == b"second"


def test_begin_renews_the_lease_and_the_records_ttl(store: KeyStore) -> None:
    reserve(store)
    fence = claim(store, lease_ms=LEASE_MS, ttl_ms=LEASE_MS)
    before = store.get(REF)
    assert before is not None and before.lease_expires_ms is not None
    begin(store, "o1", fence, lease_ms=10 * LEASE_MS)
    after = store.entry(REF)
    assert after is not None and after.record is not None
    assert after.record.lease_expires_ms is not None
    assert after.record.lease_expires_ms >= before.lease_expires_ms + 9 * LEASE_MS
    assert after.ttl_ms is not None and after.ttl_ms > 9 * LEASE_MS  # outlives the lease


def test_a_taken_over_owner_can_neither_begin_nor_save(store: KeyStore) -> None:
    reserve(store)
    old_fence = claim(store, owner="old", lease_ms=50)
    wait_past(50)
    new_fence = claim(store, task_id="t2", owner="new")
    assert new_fence > old_fence
    with pytest.raises(OwnershipLost) as info:
        begin(store, "old", old_fence)
    assert not isinstance(info.value, LeaseExpired)  # taken over: not merely expired
    assert info.value.key == REF.key and info.value.task_id == "t2"
    assert "owned by task t2" in str(info.value)
    with pytest.raises(OwnershipLost):
        save(store, "old", old_fence, value=b"stale")
    record = store.get(REF)
    assert record is not None and record.steps == () and record.owner == "new"
    assert begin(store, "new", new_fence) is None  # the stale value never landed


def test_a_wrong_fence_is_refused_even_for_the_owner_token(store: KeyStore) -> None:
    reserve(store)
    fence = claim(store)
    for wrong in (fence - 1, fence + 1, 0):
        with pytest.raises(OwnershipLost):
            begin(store, "o1", wrong)
        with pytest.raises(OwnershipLost):
            save(store, "o1", wrong)
    assert store.get(REF).steps == ()  # type: ignore[union-attr]


def test_an_expired_lease_refuses_the_next_step_but_keeps_a_finished_ones_value(
        store: KeyStore) -> None:
    """Nobody took over yet, but anyone may at any moment: no new step starts. A step that did
    run while the lease ran out is still recorded (its value is the truth)."""
    reserve(store)
    fence = claim(store, lease_ms=50)
    wait_past(50)
    with pytest.raises(LeaseExpired, match=r"lease of this worker .* expired"):
        begin(store, "o1", fence)
    save(store, "o1", fence)
    assert recorded_step(store) == ("charge",)


def test_begin_and_save_refuse_a_key_that_is_not_started(store: KeyStore) -> None:
    with pytest.raises(OwnershipLost, match="record is gone"):
        begin(store, "o1", 1)
    with pytest.raises(OwnershipLost, match="record is gone"):
        save(store, "o1", 1)
    assert store.get(REF) is None  # save never creates a record
    reserve(store)
    with pytest.raises(OwnershipLost, match="pending"):
        begin(store, "o1", 0)
    fence = claim(store)
    store.complete(REF, owner="o1", fence=fence, result=RESULT, ttl_ms=DAY_MS)
    with pytest.raises(OwnershipLost, match="succeeded"):
        save(store, "o1", fence)
    assert store.get(REF).steps == ()  # type: ignore[union-attr]


# -- which transitions keep the steps ---------------------------------------------------------

def test_success_drops_the_steps(store: KeyStore) -> None:
    fence = claimed_with_step(store)
    save(store, "o1", fence, name="order")
    store.complete(REF, owner="o1", fence=fence, result=RESULT, ttl_ms=DAY_MS)
    record = store.get(REF)
    assert record is not None and record.state is KeyState.SUCCEEDED and record.steps == ()
    assert record.result == RESULT.data


def test_a_cached_error_drops_the_steps(store: KeyStore) -> None:
    claimed_with_step(store)
    store.fail(REF, owner="o1", error='{"type":"E"}', retryable=False, ttl_ms=DAY_MS)
    assert store.get(REF).steps == ()  # type: ignore[union-attr]


def test_a_retryable_failure_keeps_the_steps_for_the_next_publish(store: KeyStore) -> None:
    claimed_with_step(store)
    store.fail(REF, owner="o1", error='{"type":"E"}', retryable=True, ttl_ms=DAY_MS)
    assert recorded_step(store) == ("charge",)
    # The next publish reserves anew; its execution continues where the failed one stopped.
    assert reserve(store, task_id="t2").status is ReserveStatus.RESERVED
    record = store.get(REF)
    assert record is not None and record.state is KeyState.PENDING and record.task_id == "t2"
    assert record.steps == ("charge",) and record.error is None and record.owner is None
    fence = claim(store, task_id="t2", owner="o2")
    assert begin(store, "o2", fence) == VALUE


def test_a_retryable_failure_claimed_by_a_message_sent_by_name_keeps_the_steps(
        store: KeyStore) -> None:
    claimed_with_step(store)
    store.fail(REF, owner="o1", error='{"type":"E"}', retryable=True, ttl_ms=DAY_MS)
    fence = claim(store, task_id="t2", owner="o2")  # no reservation in between
    assert begin(store, "o2", fence) == VALUE


def test_a_retry_keeps_the_steps(store: KeyStore) -> None:
    claimed_with_step(store)
    assert store.requeue(REF, owner="o1", pending_ms=PENDING_MS, ttl_ms=DAY_MS)
    assert recorded_step(store) == ("charge",)
    fence = claim(store, task_id="t1", owner="o2")  # the retried message
    assert begin(store, "o2", fence) == VALUE


@pytest.mark.parametrize("requeued", [True, False], ids=["requeued", "message-gone"])
def test_an_abandoned_claim_keeps_the_steps(store: KeyStore, requeued: bool) -> None:
    claimed_with_step(store, owner="host:1.abc")
    assert store.abandon(REF, task_id="t1", owner_prefix="host:1.", requeued=requeued,
                         error='{"type":"WorkerLostError"}', ttl_ms=DAY_MS,
                         pending_ms=PENDING_MS)
    assert recorded_step(store) == ("charge",)
    if requeued:
        fence = claim(store, task_id="t1", owner="o2")  # the redelivery
    else:
        assert reserve(store, task_id="t2").status is ReserveStatus.RESERVED
        fence = claim(store, task_id="t2", owner="o2")
    assert begin(store, "o2", fence) == VALUE


def test_a_take_over_continues_from_the_lost_owners_steps(store: KeyStore) -> None:
    reserve(store)
    old_fence = claim(store, owner="old", lease_ms=50)
    save(store, "old", old_fence)
    wait_past(50)
    new_fence = claim(store, task_id="t2", owner="new")
    assert begin(store, "new", new_fence) == VALUE


def test_a_pending_reservation_replaced_after_its_deadline_keeps_the_steps(
        store: KeyStore) -> None:
    claimed_with_step(store)
    assert store.requeue(REF, owner="o1", pending_ms=50)
    wait_past(50)
    reservation = reserve(store, task_id="t2")
    assert reservation.status is ReserveStatus.RESERVED and reservation.replaced_task_id == "t1"
    assert recorded_step(store) == ("charge",)


def test_an_ignored_task_discards_the_key_with_its_steps(store: KeyStore) -> None:
    """Ignore (e.g. self.replace()) frees the key: the next publish starts from scratch."""
    claimed_with_step(store)
    assert store.discard(REF, owner="o1")
    assert store.get(REF) is None


# -- replies, TTL and layout -----------------------------------------------------------------

def test_replies_never_carry_the_steps_values(store: KeyStore) -> None:
    """A duplicate polling a busy key gets the record, not the (possibly large) steps."""
    fence = claimed_with_step(store)
    save(store, "o1", fence, name="big", value=b"x" * 100_000)
    busy = store.claim(REF, task_id="t2", owner="o2", fingerprint="fp1",
                       task_name="tasks.charge", lease_ms=LEASE_MS, ttl_ms=DAY_MS)
    assert busy.status is ClaimStatus.BUSY
    assert busy.record is not None and busy.record.steps == ()
    duplicate = reserve(store, task_id="t2")
    assert duplicate.status is ReserveStatus.DUPLICATE
    assert duplicate.record is not None and duplicate.record.steps == ()
    # Reads show which steps are recorded (the CLI's `show`); a listing without results
    # reads the record's own fields only.
    assert store.get(REF).steps == ("big", "charge")  # type: ignore[union-attr]
    entry = store.entry(REF)
    assert entry is not None and entry.record is not None
    assert entry.record.steps == ("big", "charge")
    listed = [e.record for e in store.entries(with_result=False) if e.record is not None]
    assert [record.steps for record in listed] == [()]


def test_steps_expire_with_their_record(store: KeyStore) -> None:
    reserve(store, ttl_ms=100)
    fence = claim(store, lease_ms=100, ttl_ms=100)
    save(store, "o1", fence)
    entry = store.entry(REF)
    assert entry is not None and entry.ttl_ms is not None and entry.ttl_ms <= 100
    wait_past(100)
    assert store.get(REF) is None
    reserve(store, task_id="t2")
    fence = claim(store, task_id="t2", owner="o2")
    assert begin(store, "o2", fence) is None  # gone with the record


def test_steps_live_in_the_records_own_hash(store: KeyStore) -> None:
    """No second key: nothing else to expire, and on a Cluster the same hash slot."""
    fence = claimed_with_step(store)
    save(store, "o1", fence, name="order")
    if isinstance(store, RedisKeyStore):
        name = store.store_key(REF)
        assert store.client.exists(name) == 1
        fields = {k.decode() for k in store.client.hkeys(name)}
        assert {step_field("charge"), step_field("order")} <= fields
        total = sum(len(server.keys("*")) for server in store._servers())
        assert total == 1
    assert [entry.store_key for entry in store.entries()] == [store.store_key(REF)]  # type: ignore[attr-defined]


HOSTILE_NAMES = ["st", "o", "l", "f", "sp:charge", "sp:", "{tag}", "}{", "*?[]\\", "名前 ünï",
                 "'; redis.call('DEL', KEYS[1]) --", "x" * 200, "a b\tc".replace("\t", " "),
                 "\u200b", "0", "-1"]


def test_hostile_step_names_are_just_names(store: KeyStore) -> None:
    reserve(store)
    fence = claim(store)
    for index, name in enumerate(HOSTILE_NAMES):
        assert begin(store, "o1", fence, name=name) is None
        save(store, "o1", fence, name=name, value=str(index).encode())
    for index, name in enumerate(HOSTILE_NAMES):
        assert begin(store, "o1", fence, name=name) == str(index).encode()
    record = store.get(REF)
    assert record is not None
    # The record's own fields are untouched by steps named like them.
    assert (record.state, record.owner, record.fence, record.key) == (
        KeyState.STARTED, "o1", fence, REF.key)
    assert record.lease_expires_ms is not None
    assert sorted(record.steps) == sorted(HOSTILE_NAMES)
    store.complete(REF, owner="o1", fence=fence, result=RESULT, ttl_ms=DAY_MS)
    assert store.get(REF).steps == ()  # type: ignore[union-attr]


# -- the step runner over each store: values, and damaged values -------------------------------

def runner(store: KeyStore, owner: str, fence: int) -> Steps:
    return Steps(ref=REF, config=IdempotencyConfig(store_url="memory://"),
                 task_name="tasks.charge", task_id="t1",
                 sender=None, claim=StepClaim(store, owner, fence, LEASE_MS),
                 accept=["application/json"])


def test_a_runner_records_and_replays_values(store: KeyStore) -> None:
    reserve(store)
    fence = claim(store)
    calls: list[int] = []
    first = runner(store, "o1", fence)
    assert first.run("charge", lambda n: calls.append(n) or {"id": f"ch_{n}"}, (1,), {}) == {
        "id": "ch_1"}
    again = runner(store, "o1", fence)  # the next run of the key, same claim for brevity
    assert again.run("charge", lambda n: calls.append(n), (2,), {}) == {"id": "ch_1"}
    assert calls == [1]


@pytest.mark.parametrize("raw", [b"garbage without separators", b"\0\0{not json",
                                 b"\xff\xfe\0\0{}", b"application/x-python-serialize\0\0x"],
                         ids=["no-separators", "bad-json", "bad-content-type",
                              "disallowed-content-type"])
def test_a_damaged_step_value_is_corrupt_record_naming_the_key(store: KeyStore,
                                                               raw: bytes) -> None:
    reserve(store)
    fence = claim(store)
    save(store, "o1", fence, value=raw)
    calls: list[str] = []
    with pytest.raises(CorruptRecord) as info:
        runner(store, "o1", fence).run("charge", calls.append, ("ran",), {})
    assert calls == []  # not run: its record exists, it just cannot be read
    message = str(info.value)
    assert info.value.key == REF.key and "step 'charge'" in message
    assert store.store_key(REF) in message  # type: ignore[attr-defined]


def test_the_lua_step_prefix_is_records_prefix() -> None:
    common = importlib.resources.files("celery_idempotency.store").joinpath(
        "lua", "_common.lua").read_text()
    assert re.findall(r"local STEP_PREFIX = '([^']*)'", common) == [F_STEP_PREFIX]


# -- Redis only: a damaged record met by the step scripts, and the CLI -------------------------

@pytest.fixture
def redis_store(redis_server: Any) -> Any:
    store = RedisKeyStore.from_url(redis_server.url(3), prefix="t:")
    store.client.flushdb()
    yield store
    store.client.flushdb()
    store.close()


def test_a_hand_edited_lease_met_by_begin_step_is_corrupt_record_naming_the_field(
        redis_store: RedisKeyStore) -> None:
    reserve(redis_store)
    fence = claim(redis_store)
    redis_store.client.hset(redis_store.store_key(REF), "l", "soon")
    with pytest.raises(CorruptRecord, match="field 'l' is not an integer: 'soon'") as info:
        begin(redis_store, "o1", fence)
    assert info.value.key == redis_store.store_key(REF)
    save(redis_store, "o1", fence)  # save reads no lease: the finished step is kept
    assert redis_store.client.hget(redis_store.store_key(REF), step_field("charge")) == VALUE


def test_cli_show_lists_the_recorded_steps(redis_server: Any,
                                           redis_store: RedisKeyStore) -> None:
    from tests.cli.conftest import run_standalone

    reserve(redis_store)
    fence = claim(redis_store)
    for name in ("charge", "order"):
        save(redis_store, "o1", fence, name=name)
    shown = run_standalone("--store-url", redis_server.url(3), "--prefix", "t:", "show",
                           REF.key, "--scope", REF.scope)
    assert shown.code == 0, shown.err
    assert "steps:       charge, order" in shown.out
    as_json = run_standalone("--store-url", redis_server.url(3), "--prefix", "t:", "show",
                             REF.key, "--scope", REF.scope, "--json")
    assert as_json.code == 0, as_json.err
    assert json.loads(as_json.out)["steps"] == ["charge", "order"]
