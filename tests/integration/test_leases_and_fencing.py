"""Leases and fencing on real workers: the broker redelivers a task that is still running (the
copy waits and replays the result), the lease keeper keeps a long task's claim on every pool,
and a frozen worker loses its claim to a takeover with a higher fence, its late outcome
refused.

Measured times are printed as ``[measured] ...`` lines (``pytest -s`` shows them). Timings are
measured, not asserted: waits poll with generous timeouts; the few assertions about time
compare two moments of the same run, never a sleep against a deadline.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from kombu.transport import redis as kombu_redis

from celery_idempotency import KeyState
from tests.integration import app as itest
from tests.integration.app import long_lease
from tests.support.integration import (
    TIMEOUT,
    Effects,
    Fleet,
    PublishLog,
    Stack,
    log_lines,
    redis_stack,
    task_log,
    unique,
    use_stack,
    wait_for,
)
from tests.support.procs import parent_of
from tests.support.runs import (
    SETTLE,
    done_of,
    measured,
    record_of,
    wait_for_expired_lease,
    wait_for_runs,
)
from tests.support.services import RedisServer

# -- the broker redelivers a task that is still running ----------------------------------------

REDELIVERING_BROKER = {"visibility_timeout": 2, "unacked_restore_interval": 1,
                       "unacked_restore_throttle": 1, "unacked_mutex_expire": 10,
                       "polling_interval": 0.1}


# kombu < 5.7 has no unacked_restore_interval: it restores an unacked message only every
# 10 x 10 s, and the redelivery this test waits for would not come within its timeout.
@pytest.mark.skipif(not hasattr(kombu_redis.Channel, "unacked_restore_interval"),
                    reason="kombu < 5.7 cannot redeliver an unacked message within seconds")
def test_redelivery_of_a_running_task_waits_and_replays_the_result(
        redis_server: RedisServer, app_conf: None, fleet: Fleet,
        published: PublishLog) -> None:
    """Redis broker, visibility_timeout 2 s, a 5 s task, two workers: kombu hands the unacked
    message to the other worker while the first still runs it (plain Celery and the lock
    libraries then run it twice). Here the copy finds the key busy, looks again until the
    original has finished, and replays its result: one run, both deliveries SUCCESS. Publishes
    of the key meanwhile are duplicates."""
    stack = redis_stack(redis_server, broker_transport_options=REDELIVERING_BROKER)
    use_stack(itest.app, stack)
    effects = Effects(stack.effects())
    first_worker = fleet.start(stack, concurrency=1)
    second_worker = fleet.start(stack, concurrency=1)
    workers = (first_worker, second_worker)
    job, key = unique("redeliver"), unique("redeliver-key")

    def log_of(needle: str) -> list[Any]:
        return sorted((line for w in workers for line in log_lines(w, needle)),
                      key=lambda line: line.at)

    handle = long_lease.apply_async((job, 5.0), idempotency_key=key)
    first = wait_for_runs(effects, "long_lease", job, 1)[0]
    busy = wait_for(lambda: log_of(f"[{handle.id}] key={key!r} is running as task"),
                    what="the redelivered copy to find the key busy")
    probe = long_lease.apply_async((job, 5.0), idempotency_key=key)
    assert (probe.id, probe.duplicate) == (handle.id, True)
    running = record_of(long_lease, key)
    assert running is not None and running.state is KeyState.STARTED
    assert running.fence == first["fence"]

    result = handle.get(timeout=TIMEOUT)
    assert result == {"job": job, "run": 1, "fence": first["fence"], "pid": first["pid"]}
    replayed = wait_for(lambda: log_of(f"[{handle.id}] key={key!r} already succeeded"),
                        what="the copy to replay the result")
    late_probe = long_lease.apply_async((job, 5.0), idempotency_key=key)
    assert (late_probe.id, late_probe.duplicate) == (handle.id, True)
    assert late_probe.get(timeout=TIMEOUT) == result

    wait_for(lambda: len(log_of(f"[{handle.id}] succeeded")) >= 2,
             what="both deliveries to succeed")
    time.sleep(SETTLE)
    # The original and the copy (a copy's re-sends keep its task id) both end SUCCESS with the
    # one result. (A loaded machine may restore a re-send once more: a third SUCCESS, no run.)
    succeeded = log_of(f"[{handle.id}] succeeded")
    assert len(succeeded) >= 2 and all(repr(result) in line.message for line in succeeded)
    for worker in workers:
        assert not task_log(worker, handle.id, "raised")
    assert effects.count("long_lease", job) == 1
    assert len(done_of(effects, "long_lease", job)) == 1
    final = record_of(long_lease, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert (final.task_id, final.fence) == (handle.id, first["fence"])
    assert published.ids_for(key) == [handle.id], "the probes published nothing"
    for worker in workers:
        assert "taken over" not in worker.output()
    effects.client.close()

    measured("4: the copy waited (first busy -> replayed)", replayed[0].at - busy[0].at)
    measured("4: busy looks of the copy", len(log_of(f"[{handle.id}] key={key!r} is running")))
    measured("4: deliveries that ended SUCCESS", len(succeeded))


# -- the lease keeper keeps a long task's claim ------------------------------------------------


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_heartbeat_keeps_a_task_running_three_times_its_lease(
        pool: str, request: pytest.FixtureRequest, fleet: Fleet, effects: Effects,
        published: PublishLog) -> None:
    """``slow`` has a 1.5 s lease and runs 4.5 s. A duplicate message (sent by name with the
    key header) arrives after the first lease would have run out: it finds the key busy,
    never takes over, and replays the one result."""
    from tests.integration.app import slow

    if pool == "prefork":  # -c 2: the duplicate runs in the other child
        request.getfixturevalue("module_stack")
        workers = [request.getfixturevalue("worker")]
    else:
        stack = request.getfixturevalue("own_stack")
        workers = [fleet.start(stack, pool=pool, concurrency=1 if pool == "solo" else 2)]
        if pool == "solo":  # one task at a time: the duplicate needs a second worker
            workers.append(fleet.start(stack, pool=pool, concurrency=1))
    job, key = unique(f"heartbeat-{pool}"), unique("heartbeat-key")

    handle = slow.apply_async((job, 4.5), idempotency_key=key)
    wait_for(lambda: effects.count("slow", job) == 1, what="the task to start",
             worker=workers[0])
    time.sleep(2.5)  # past the first lease (1.5 s)
    renewed = record_of(slow, key)
    assert renewed is not None and renewed.state is KeyState.STARTED
    assert renewed.lease_expires_ms is not None
    assert renewed.lease_expires_ms > renewed.updated_ms + 1500, "the lease was renewed"
    assert not renewed.lease_expired(slow.idem_store().now_ms())

    duplicate = itest.app.send_task(slow.name, args=(job, 4.5), headers={"idempotency_key": key})
    result = handle.get(timeout=TIMEOUT)
    assert result == {"job": job, "run": 1, "fence": renewed.fence}, "one claim, renewed"

    def dup_lines(event: str) -> list[str]:
        return [line for w in workers for line in task_log(w, duplicate.id, event)]

    wait_for(lambda: dup_lines("succeeded"), what="the duplicate to replay the result",
             worker=workers[-1])
    time.sleep(SETTLE)
    assert effects.count("slow", job) == 1
    assert repr(result) in dup_lines("succeeded")[0]
    busy = [line for w in workers
            for line in log_lines(w, f"[{duplicate.id}] key={key!r} is running")]
    assert busy, "the duplicate found the key busy"
    final = record_of(slow, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert (final.task_id, final.fence) == (handle.id, renewed.fence)
    for worker in workers:
        for needle in ("taken over", "lost the claim", "was lost"):
            lines = [line for line in log_lines(worker, needle) if key in line.message]
            # A "was lost" ERROR at the very end of the run, with the outcome recorded, would be
            # the lease keeper renewing a claim that its task had just completed (a false alarm).
            assert not lines, lines
    assert published.ids_for(key) == [handle.id, duplicate.id]


# -- a frozen worker loses its claim; its late outcome is refused ------------------------------


def test_frozen_owner_is_taken_over_and_its_late_outcome_refused(
        own_stack: Stack, fleet: Fleet, effects: Effects, published: PublishLog) -> None:
    """SIGSTOP the child running ``slow`` (1.5 s lease) until its lease expires: a new publish
    goes out, another worker takes over with a higher fence. SIGCONT the original while the new
    owner runs: its completion is refused, and the new owner's outcome is the one recorded. Both
    bodies ran (the documented frozen-worker case); the store has one outcome."""
    from tests.integration.app import slow

    workers = [fleet.start(own_stack, concurrency=1), fleet.start(own_stack, concurrency=1)]
    job, key = unique("frozen"), unique("frozen-key")

    handle = slow.apply_async((job, 3.0), idempotency_key=key)
    pid = int(wait_for(lambda: effects.client.get(f"pid:slow:{job}") or b"",
                       what="the first run to start", worker=workers[0]))
    frozen_worker = next(w for w in workers if w.process is not None
                         and parent_of(pid) == w.process.pid)
    fleet.freeze(pid)
    frozen_at = time.time()

    expired = wait_for_expired_lease(slow, key)
    assert expired.state is KeyState.STARTED
    measured("6: frozen -> lease expired", time.time() - frozen_at)

    takeover = slow.apply_async((job, 3.0), idempotency_key=key)
    assert takeover.duplicate is False and takeover.id != handle.id, "stale claim: published"
    wait_for(lambda: effects.count("slow", job) == 2, what="the takeover run to start")
    taken = record_of(slow, key)
    assert taken is not None and taken.state is KeyState.STARTED
    assert taken.task_id == takeover.id and taken.fence > expired.fence
    other = next(w for w in workers if w is not frozen_worker)
    assert f"taken over (fence {taken.fence})" in other.output()

    fleet.thaw(pid)
    refused = wait_for(lambda: log_lines(frozen_worker, "lost the claim"),
                       what="the late completion to be refused", worker=frozen_worker)
    assert refused[0].level == "ERROR" and f"[{handle.id}]" in refused[0].message
    assert "did not record success" in refused[0].message
    still = record_of(slow, key)
    assert still is not None and (still.task_id, still.fence) == (takeover.id, taken.fence), \
        "the late owner did not touch the new claim"

    result = takeover.get(timeout=TIMEOUT)
    assert result == {"job": job, "run": 2, "fence": taken.fence}
    assert handle.get(timeout=TIMEOUT) == result, "one outcome per key: the second"
    time.sleep(SETTLE)
    final = record_of(slow, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert (final.task_id, final.fence) == (takeover.id, taken.fence)
    assert effects.count("slow", job) == 2
    # Celery itself still reports the frozen run as a success (its own return value).
    assert f"'run': 1, 'fence': {expired.fence}" in (
        task_log(frozen_worker, handle.id, "succeeded") or [""])[0]
    assert published.ids_for(key) == [handle.id, takeover.id]
    finished = wait_for(lambda: log_lines(other, f"[{takeover.id}] succeeded"),
                        what="the new owner's success line", worker=other)[0]
    measured("6: late completion refused before the new owner finished",
             finished.at - refused[0].at)
