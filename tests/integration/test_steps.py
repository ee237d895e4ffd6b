"""Recovery points (``self.step``) with real workers: a three-step task (charge, order,
receipt; tests/integration/steps_app.py) whose step functions write a ledger, so that each test
counts how often every step's side effect really ran.

- a child SIGKILLed inside step 2: the redelivery returns step 1's recorded value without
  calling it, runs step 2 again (the step in flight) and step 3 once;
- a frozen owner: past its lease another worker takes the key over; thawed, the old owner's
  next step is refused (OwnershipLost) and it writes no step over the new owner's;
- ``self.retry()`` between steps keeps the recorded steps;
- a retryable failure keeps them too: the next publish with the key continues after step 1;
- a final outcome (success, or a cached error) drops them: once an operator releases the key,
  the next publish runs every step again.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_idempotency import KeyState, RecordRef, RedisKeyStore
from celery_idempotency.records import F_STEP_PREFIX, is_step_field
from tests.integration import steps_app
from tests.integration.steps_app import (
    STEPS,
    checkout,
    checkout_declinable,
    checkout_short_lease,
)
from tests.support.integration import (
    TIMEOUT,
    Fleet,
    Stack,
    redis_stack,
    task_log,
    unique,
    use_stack,
    wait_for,
)
from tests.support.procs import parent_of
from tests.support.runs import SETTLE, record_of, wait_for_expired_lease, wait_for_state
from tests.support.services import RedisServer
from tests.support.workers import Worker

APP_MODULE = "tests.integration.steps_app"


class Ledger:
    """What the step functions wrote (see steps_app)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def entries(self, job: str) -> list[dict[str, Any]]:
        """Every call of a step function for ``job``, in the order they began."""
        return [json.loads(raw) for raw in self.client.lrange(f"steps:ledger:{job}", 0, -1)]

    def runs(self, job: str, step: str) -> list[dict[str, Any]]:
        return [entry for entry in self.entries(job) if entry["step"] == step]

    def returned(self, job: str) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.client.lrange(f"steps:returned:{job}", 0, -1)]

    def done(self, job: str) -> list[dict[str, Any]]:
        """Each time ``self.step`` returned in a task body (recorded, or replayed)."""
        return [json.loads(raw) for raw in self.client.lrange(f"steps:done:{job}", 0, -1)]

    def calls(self, job: str) -> list[tuple[str, int]]:
        return [(entry["step"], entry["run"]) for entry in self.entries(job)]


def recorded_steps(task: Any, key: str) -> list[str]:
    """The steps the key's record holds (read from its hash: what the store keeps)."""
    store = task.idem_store()
    assert isinstance(store, RedisKeyStore)
    fields = store.client.hkeys(store.store_key(RecordRef(task.name, key)))
    names = (raw.decode() for raw in fields)
    return sorted(name.removeprefix(F_STEP_PREFIX) for name in names if is_step_field(name))


def value_of(entry: dict[str, Any]) -> dict[str, Any]:
    """What the step function returned for the call ``entry`` recorded."""
    return {"step": entry["step"], "run": entry["run"], "sid": entry["sid"]}


@pytest.fixture(scope="module")
def tested_app() -> tuple[Celery, str]:
    """The module's stack and worker run the steps app."""
    return steps_app.app, APP_MODULE


@pytest.fixture
def steps_stack(stack: Stack) -> Stack:
    """The module's stack, the publisher pointed at it again (after a test of its own queue)."""
    use_stack(steps_app.app, stack)
    return stack


@pytest.fixture
def ledger(stack: Stack) -> Iterator[Ledger]:
    client = stack.effects()
    yield Ledger(client)
    client.close()


@pytest.fixture
def own_stack(redis_server: RedisServer, stack: Stack) -> Iterator[Stack]:
    """A queue of the test's own (its workers are the only consumers); the publisher is
    pointed back at the module's stack afterwards."""
    made = redis_stack(redis_server)
    use_stack(steps_app.app, made)
    yield made
    use_stack(steps_app.app, stack)


def start_worker(fleet: Fleet, stack: Stack, tmp_path: Path, *, concurrency: int) -> Worker:
    worker = stack.worker(tmp_path, name=unique("w-steps"), concurrency=concurrency,
                          app=APP_MODULE).start()
    fleet.workers.append(worker)
    return worker


def test_a_child_killed_inside_step_two_resumes_after_step_one(
        steps_stack: Stack, worker: Worker, ledger: Ledger) -> None:
    """SIGKILL the pool child while step 2's function runs. The main process hands the claim
    back and the message is redelivered: step 1 is not called again (its recorded value is
    returned), step 2 runs again (it was in flight: nothing was recorded), step 3 runs once."""
    job, key = unique("kill-step"), unique("kill-step-key")
    handle = checkout.apply_async((job,), {"pauses": {"order#1": 5.0}}, idempotency_key=key)
    inside = wait_for(lambda: ledger.runs(job, "order"), what="step 2 to start",
                      worker=worker)[0]
    assert ledger.calls(job) == [("charge", 1), ("order", 1)]
    os.kill(inside["pid"], signal.SIGKILL)

    result = handle.get(timeout=TIMEOUT)
    time.sleep(SETTLE)
    charge, order, receipt = (ledger.runs(job, step) for step in STEPS)
    assert len(charge) == 1, "a recorded step is not run again"
    assert len(receipt) == 1
    # The step in flight is at-least-once: killed inside its function, it recorded nothing,
    # so it ran again; never more than that once.
    assert len(order) == 2, order
    assert ledger.calls(job) == [("charge", 1), ("order", 1), ("order", 2), ("receipt", 1)]
    again = order[1]
    assert again["task_id"] == handle.id, "the redelivered message, not a new publish"
    assert again["pid"] != inside["pid"] and again["fence"] > inside["fence"]
    assert receipt[0]["fence"] == again["fence"]
    assert result == {"job": job, "task_id": handle.id, "fence": again["fence"],
                      "steps": {"charge": value_of(charge[0]), "order": value_of(again),
                                "receipt": value_of(receipt[0])}}
    # A step's key is the same for every attempt: a downstream API deduplicates on it.
    assert inside["step_key"] == again["step_key"]
    assert len({entry["step_key"] for entry in ledger.entries(job)}) == len(STEPS)
    final = record_of(checkout, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert (final.task_id, final.fence) == (handle.id, again["fence"])
    assert len(task_log(worker, handle.id, "succeeded")) == 1


# Where the first owner is frozen: inside step 1's function (its value not recorded yet), or
# in the body between step 1 (recorded) and step 2. What the test publishes each time (the same
# arguments, or the key would not match): the first owner's pause, and the new owner failing
# inside step 2 after 5 s, so that the late owner wakes up while the new one is inside a step.
FROZEN = {
    "inside_a_step": {"pauses": {"charge#1": 3.0, "order#1": 5.0}, "fails": ["order#1"]},
    "between_steps": {"gaps": {"charge@1": 3.0}, "pauses": {"order#1": 5.0},
                      "fails": ["order#1"]},
}


@pytest.mark.parametrize("where", sorted(FROZEN))
def test_a_frozen_owner_starts_no_step_after_a_takeover(
        where: str, own_stack: Stack, fleet: Fleet, ledger: Ledger, tmp_path: Path) -> None:
    """SIGSTOP the child running the task (1.5 s lease) until its lease expires; a new publish
    is taken over by the other worker, which fails inside step 2. The old owner is thawed
    while the new one is inside step 2: its step is refused (OwnershipLost; frozen inside step
    1, the function it was in may finish, but its value is not recorded; frozen between steps,
    step 2 is refused before its function is called), and it starts no step after the
    takeover. The steps recorded under the claim that won are the ones the next publish
    continues from: step 1 as the new owner ran it, or, when the old owner had recorded it
    before it froze, as the old owner recorded it (the new owner did not run it again)."""
    workers = [start_worker(fleet, own_stack, tmp_path, concurrency=1),
               start_worker(fleet, own_stack, tmp_path, concurrency=1)]
    job, key = unique(f"frozen-{where}"), unique("frozen-key")
    kwargs = FROZEN[where]

    handle = checkout_short_lease.apply_async((job,), kwargs, idempotency_key=key)
    if where == "inside_a_step":
        pid = wait_for(lambda: ledger.runs(job, "charge"), what="step 1 to start",
                       worker=workers[0])[0]["pid"]
    else:
        pid = wait_for(lambda: ledger.done(job), what="step 1 to be recorded",
                       worker=workers[0])[0]["pid"]
    frozen_worker = next(w for w in workers
                         if w.process is not None and parent_of(pid) == w.process.pid)
    other = next(w for w in workers if w is not frozen_worker)
    fleet.freeze(pid)

    expired = wait_for_expired_lease(checkout_short_lease, key)
    assert expired.state is KeyState.STARTED and expired.task_id == handle.id
    takeover = checkout_short_lease.apply_async((job,), kwargs, idempotency_key=key)
    assert takeover.duplicate is False and takeover.id != handle.id
    new_order = wait_for(lambda: ledger.runs(job, "order"), what="the new owner's step 2",
                         worker=other)[0]
    assert new_order["task_id"] == takeover.id and new_order["fence"] > expired.fence
    taken_at = min(e["t"] for e in ledger.done(job) + ledger.entries(job)
                   if e["task_id"] == takeover.id)

    fleet.thaw(pid)  # while the new owner is inside step 2
    refused = wait_for(lambda: [line for line in task_log(frozen_worker, handle.id, "raised")
                                if "OwnershipLost" in line],
                       what="the old owner's step to be refused", worker=frozen_worker)
    assert refused
    wait_for_state(checkout_short_lease, key, KeyState.FAILED, other)
    failed = record_of(checkout_short_lease, key)
    assert failed is not None and failed.retryable and failed.task_id == takeover.id
    old_calls = [e for e in ledger.entries(job) if e["task_id"] == handle.id]
    assert [(e["step"], e["run"]) for e in old_calls] == [("charge", 1)], \
        "the old owner started no step after the takeover"
    assert all(e["t"] < taken_at for e in old_calls)
    old_done = [(e["step"], e["task_id"]) for e in ledger.done(job) if e["task_id"] == handle.id]
    assert old_done == ([("charge", handle.id)] if where == "between_steps" else [])

    again = checkout_short_lease.apply_async((job,), kwargs, idempotency_key=key)
    assert again.duplicate is False
    result = again.get(timeout=TIMEOUT)
    time.sleep(SETTLE)
    charge, order, receipt = (ledger.runs(job, step) for step in STEPS)
    if where == "inside_a_step":  # in flight when frozen: the new owner ran it again
        assert [e["task_id"] for e in charge] == [handle.id, takeover.id]
    else:  # recorded before the freeze: nobody ran it again
        assert [e["task_id"] for e in charge] == [handle.id]
    assert [e["task_id"] for e in order] == [takeover.id, again.id]
    assert [e["task_id"] for e in receipt] == [again.id]
    assert result["steps"] == {"charge": value_of(charge[-1]), "order": value_of(order[1]),
                               "receipt": value_of(receipt[0])}, \
        "step 1 is the value recorded under the claim that won, not the late owner's"
    final = record_of(checkout_short_lease, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert final.task_id == again.id
    assert len({e["step_key"] for e in [*charge, new_order]}) == 2  # one per step


def test_a_frozen_owner_nobody_took_over_continues_from_its_steps(
        steps_stack: Stack, worker: Worker, fleet: Fleet, ledger: Ledger) -> None:
    """SIGSTOP the child between step 1 (recorded) and step 2 until its lease (1.5 s) has
    expired, with no other message for the key, then SIGCONT. Either its lease keeper renews
    the claim first (nobody took it) and the run goes on, or step 2 finds the lease expired
    and the run ends like a retry, the message coming back at once. Either way step 1 is not
    run again, steps 2 and 3 run once, and the result holds step 1's recorded value."""
    job, key = unique("frozen-alone"), unique("frozen-alone-key")
    handle = checkout_short_lease.apply_async((job,), {"gaps": {"charge@1": 3.0}},
                                              idempotency_key=key)
    pid = wait_for(lambda: ledger.done(job), what="step 1 to be recorded",
                   worker=worker)[0]["pid"]
    fleet.freeze(pid)
    expired = wait_for_expired_lease(checkout_short_lease, key)
    assert expired.state is KeyState.STARTED and expired.task_id == handle.id
    fleet.thaw(pid)

    result = handle.get(timeout=TIMEOUT)
    time.sleep(SETTLE)
    assert ledger.calls(job) == [("charge", 1), ("order", 1), ("receipt", 1)]
    charge, order, receipt = (ledger.runs(job, step)[0] for step in STEPS)
    assert {charge["task_id"], order["task_id"], receipt["task_id"]} == {handle.id}
    assert result["steps"] == {"charge": value_of(charge), "order": value_of(order),
                               "receipt": value_of(receipt)}
    retried = bool(task_log(worker, handle.id, "retry"))
    # Went on under the renewed claim, or came back under a new one.
    assert (order["fence"] > charge["fence"]) is retried
    final = record_of(checkout_short_lease, key)
    assert final is not None and final.state is KeyState.SUCCEEDED and final.task_id == handle.id
    print(f"[measured] frozen owner alone: {'came back (retry)' if retried else 'went on'}")


def test_retry_between_steps_keeps_the_recorded_steps(
        steps_stack: Stack, worker: Worker, ledger: Ledger) -> None:
    """``self.retry()`` right after step 1: the retry (same task id, a new claim) returns
    step 1's recorded value and runs steps 2 and 3."""
    job, key = unique("retry-step"), unique("retry-step-key")
    handle = checkout.apply_async((job,), {"retry_after": "charge"}, idempotency_key=key)
    result = handle.get(timeout=TIMEOUT)
    time.sleep(SETTLE)
    assert ledger.calls(job) == [("charge", 1), ("order", 1), ("receipt", 1)]
    charge, order, receipt = (ledger.runs(job, step)[0] for step in STEPS)
    assert task_log(worker, handle.id, "retry"), "the task did retry"
    assert {charge["task_id"], order["task_id"], receipt["task_id"]} == {handle.id}
    assert order["fence"] > charge["fence"], "the retry ran under a claim of its own"
    assert result == {"job": job, "task_id": handle.id, "fence": order["fence"],
                      "steps": {"charge": value_of(charge), "order": value_of(order),
                                "receipt": value_of(receipt)}}
    final = record_of(checkout, key)
    assert final is not None and final.state is KeyState.SUCCEEDED


def test_a_retryable_failure_keeps_the_steps_for_the_next_publish(
        steps_stack: Stack, worker: Worker, ledger: Ledger) -> None:
    """Step 2 raises an error that is not cached: the key fails (retryable) and step 2
    recorded nothing. The next publish with the key (a new task) does not call step 1 again,
    runs step 2 and step 3, and returns step 1's first value."""
    job, key = unique("fail-step"), unique("fail-step-key")
    kwargs = {"fails": ["order#1"]}
    first = checkout.apply_async((job,), kwargs, idempotency_key=key)
    failed = wait_for_state(checkout, key, KeyState.FAILED, worker)
    assert failed.retryable and failed.task_id == first.id
    assert failed.error is not None and "StepFailed" in str(failed.error["type"])
    with pytest.raises(Exception, match=r"order of .* failed"):
        first.get(timeout=TIMEOUT)
    assert ledger.calls(job) == [("charge", 1), ("order", 1)]
    assert recorded_steps(checkout, key) == ["charge"], "kept; the step that raised: nothing"

    second = checkout.apply_async((job,), kwargs, idempotency_key=key)
    assert second.duplicate is False and second.id != first.id
    result = second.get(timeout=TIMEOUT)
    time.sleep(SETTLE)
    assert ledger.calls(job) == [("charge", 1), ("order", 1), ("order", 2), ("receipt", 1)]
    charge, order, receipt = ledger.runs(job, "charge")[0], ledger.runs(job, "order")[1], \
        ledger.runs(job, "receipt")[0]
    assert charge["task_id"] == first.id
    assert order["task_id"] == receipt["task_id"] == second.id
    assert result["steps"] == {"charge": value_of(charge), "order": value_of(order),
                               "receipt": value_of(receipt)}
    assert first.get(timeout=TIMEOUT) == result, "the first handle sees the key's outcome"
    # Another task, the same key: the same step keys.
    assert len({e["step_key"] for e in ledger.runs(job, "order")}) == 1
    final = record_of(checkout, key)
    assert final is not None and final.state is KeyState.SUCCEEDED and final.task_id == second.id
    assert recorded_steps(checkout, key) == [], "dropped with the result"


@pytest.mark.parametrize("outcome", ["success", "cached_error"])
def test_a_final_outcome_drops_the_steps(
        outcome: str, steps_stack: Stack, worker: Worker, ledger: Ledger) -> None:
    """Once the outcome is final (a result, or an error in idempotency_cache_errors), the
    record keeps no step, and after an operator releases the key (as ``celery idempotency
    release --force`` does) the next publish runs every step again instead of returning
    values recorded for the finished task."""
    job, key = unique(f"final-{outcome}"), unique("final-key")
    kwargs: dict[str, Any] = {"fails": ["order#1:declined"]} if outcome == "cached_error" else {}
    first = checkout_declinable.apply_async((job,), kwargs, idempotency_key=key)
    if outcome == "success":
        first.get(timeout=TIMEOUT)
        assert ledger.calls(job) == [("charge", 1), ("order", 1), ("receipt", 1)]
    else:
        with pytest.raises(steps_app.Declined):
            first.get(timeout=TIMEOUT)
        assert ledger.calls(job) == [("charge", 1), ("order", 1)]
    record = record_of(checkout_declinable, key)
    assert record is not None
    assert record.state is (KeyState.SUCCEEDED if outcome == "success" else KeyState.FAILED)
    assert not record.retryable
    assert recorded_steps(checkout_declinable, key) == [], "dropped with the final outcome"
    assert checkout_declinable.idem_store().delete_if_unchanged(record)

    second = checkout_declinable.apply_async((job,), kwargs, idempotency_key=key)
    assert second.duplicate is False
    result = second.get(timeout=TIMEOUT)
    time.sleep(SETTLE)
    charge = ledger.runs(job, "charge")
    assert [e["task_id"] for e in charge] == [first.id, second.id], \
        "step 1 ran again: the finished task's steps were dropped"
    assert result["steps"]["charge"] == value_of(charge[1])
    assert [e["task_id"] for e in ledger.runs(job, "receipt")][-1] == second.id
