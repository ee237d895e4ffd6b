"""Parked duplicates, with real workers (docs/wakeups.md): a duplicate message of a long owner,
re-sent with backoff, parks on the record; the owner's completion publishes it again at once, so
its callback runs with the cached result right after the owner is done, once: the safety-net
copy (its countdown re-send) finds the outcome replayed and runs nothing. An owner killed
before its completion wakes nobody: the countdown copy still gives the duplicate its outcome,
once."""

from __future__ import annotations

import os
import signal
import time

from tests.integration import app as itest
from tests.integration.app import after, long_lease, long_lease_unrequeued
from tests.support.integration import (
    TIMEOUT,
    Effects,
    Fleet,
    Stack,
    log_lines,
    task_log,
    unique,
    wait_for,
)
from tests.support.runs import SETTLE, measured, wait_for_runs

_HANDLED = "another copy of this message already replayed the outcome"


def test_a_parked_duplicate_gets_its_callback_once_right_after_the_owner(
        own_stack: Stack, fleet: Fleet, effects: Effects) -> None:
    """The owner runs 6 s. The duplicate (with a link callback) waits 0.5 s, then is re-sent
    (1 s, 2 s, 4 s: parked at each look). The owner's completion wakes it: the woken copy
    replays the result and runs the callback; the countdown copy that comes later ends
    without doing anything."""
    worker = fleet.start(own_stack, concurrency=3)
    job, key = unique("parked"), unique("parked-key")
    handle = long_lease.apply_async((job, 6.0), idempotency_key=key)
    wait_for_runs(effects, "long_lease", job, 1, worker=worker)
    duplicate = itest.app.send_task(long_lease.name, args=(job, 6.0),
                                    headers={"idempotency_key": key}, link=after.s())
    wait_for(lambda: log_lines(worker, f"[{duplicate.id}] key={key!r} is running as task"),
             what="the duplicate's first busy re-send", worker=worker)
    result = handle.get(timeout=TIMEOUT)
    done_at = time.time()
    wait_for(lambda: effects.count("after", job) >= 1, what="the duplicate's callback",
             worker=worker, interval=0.01)
    called_at = time.time()
    # The safety-net copy comes back by its countdown (at most the 30 s lease) and ends.
    handled = wait_for(lambda: log_lines(worker, f"[{duplicate.id}] key={key!r}: {_HANDLED}"),
                       what="the countdown copy to end as handled", timeout=TIMEOUT + 35,
                       worker=worker)
    time.sleep(SETTLE)

    assert effects.count("long_lease", job) == 1
    assert effects.count("after", job) == 1, "the callback ran once"
    assert effects.values("after", job) == [result], "with the cached result"
    resends = log_lines(worker, f"[{duplicate.id}] key={key!r} is running as task")
    assert resends and all("(parked)" in line.message for line in resends), resends
    woke = log_lines(worker, f"key={key!r}: woke 1 parked duplicate(s): {duplicate.id}")
    assert len(woke) == 1, woke
    # The woken copy replayed (succeeded, its callback sent), before the countdown copy came.
    succeeded = task_log(worker, duplicate.id, "succeeded")
    assert len(succeeded) == 1 and repr(result) in succeeded[0]
    assert len(handled) == 1 and handled[0].at >= woke[0].at
    measured("owner done -> parked duplicate's callback ran (test process view, polled)",
             called_at - done_at)


def test_a_parked_duplicate_of_a_killed_owner_still_gets_the_outcome_once(
        own_stack: Stack, fleet: Fleet, effects: Effects) -> None:
    """The owner's child is SIGKILLed after the duplicate parked: no completion, nothing
    woken; the key fails (retryable: the message is acknowledged). The duplicate's countdown
    copy runs the task itself, and its callback runs once with that run's result."""
    worker = fleet.start(own_stack, concurrency=2)
    job, key = unique("parked-kill"), unique("parked-kill-key")
    long_lease_unrequeued.apply_async((job, 8.0), idempotency_key=key)
    first = wait_for_runs(effects, "long_lease_unrequeued", job, 1, worker=worker)[0]
    duplicate = itest.app.send_task(long_lease_unrequeued.name, args=(job, 8.0),
                                    headers={"idempotency_key": key}, link=after.s())
    wait_for(lambda: [line for line in log_lines(
        worker, f"[{duplicate.id}] key={key!r} is running as task") if "(parked)" in
        line.message], what="the duplicate to park", worker=worker)
    os.kill(first["pid"], signal.SIGKILL)
    runs = wait_for_runs(effects, "long_lease_unrequeued", job, 2, worker=worker)
    assert runs[1]["task_id"] == duplicate.id
    wait_for(lambda: effects.count("after", job) >= 1, what="the duplicate's callback",
             timeout=TIMEOUT + 35, worker=worker)
    time.sleep(SETTLE + 2)

    assert effects.count("long_lease_unrequeued", job) == 2  # the killed run, and the duplicate
    assert effects.count("after", job) == 1
    (value,) = effects.values("after", job)
    assert value["run"] == 2 and value["fence"] == runs[1]["fence"]
    assert not log_lines(worker, "woke 1 parked duplicate"), "a killed owner wakes nobody"
    assert len(task_log(worker, duplicate.id, "succeeded")) == 1
