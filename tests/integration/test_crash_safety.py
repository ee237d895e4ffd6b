"""Crash safety on real workers: killed pool children, revokes, broker redelivery of a running
task, the lease keeper, fenced takeover of a frozen worker, and store outages mid-task.

The tests that kill, revoke or outlast one child share a prefork worker (-c 2); the others
start the workers their scenario needs on a queue of their own. Each test checks what the
caller's handle returns, how often the side effect really ran (a counter in the effects db,
with one entry per run saying which process, task id and fence ran it), and the key's record
in the store (state, fence, whose outcome).

Measured times are printed as ``[measured] ...`` lines (``pytest -s`` shows them).

Timings are measured, not asserted: waits poll with generous timeouts; the few assertions about
time compare two moments of the same run (e.g. "the redelivery started before the first
claim's lease would have expired"), never a sleep against a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import TaskRevokedError
from kombu.transport import redis as kombu_redis

from celery_idempotency import IdempotentTask, KeyState, ReplayedTaskError
from celery_idempotency.keys import RecordRef
from celery_idempotency.records import Record
from tests.integration import app as itest
from tests.integration.app import interruptible, long_lease, long_lease_unrequeued
from tests.support.integration import (
    TIMEOUT,
    Effects,
    LogLine,
    PublishLog,
    Stack,
    log_lines,
    redis_stack,
    start_worker,
    task_log,
    unique,
    use_stack,
    wait_for,
)
from tests.support.services import RedisServer
from tests.support.workers import Worker

SETTLE = 0.5  # after an outcome: long enough for a stray extra execution to show up
# A revoked, expired or terminated task fails its key with what Celery's backend records for it.
REVOKED = f"{TaskRevokedError.__module__}.{TaskRevokedError.__qualname__}"


class Fleet:
    """The workers one test starts, and the processes it freezes: at teardown every frozen
    process is thawed and every worker stopped, whatever the test did."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.workers: list[Worker] = []
        self.frozen: set[int] = set()

    def start(self, stack: Stack, *, pool: str = "prefork", concurrency: int = 2,
              name: str | None = None) -> Worker:
        worker = start_worker(stack, self.log_dir, pool=pool, concurrency=concurrency,
                              name=name)
        self.workers.append(worker)
        return worker

    def freeze(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        self.frozen.add(pid)

    def thaw(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)
        self.frozen.discard(pid)

    def close(self) -> None:
        for pid in list(self.frozen):
            with contextlib.suppress(ProcessLookupError):
                self.thaw(pid)
        for worker in self.workers:  # warm shutdown of all at once, then wait for each
            if worker.process is not None and worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.process.pid, signal.SIGTERM)
        for worker in self.workers:
            worker.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    made = Fleet(tmp_path)
    yield made
    made.close()


_RESTORED = ("broker_transport_options", "idempotency_store_retry_max_delay",
             "idempotency_store_timeout")


@pytest.fixture
def app_conf() -> Iterator[None]:
    """Put back the publisher's settings that a test's stack changed (``extra_conf``)."""
    saved = {name: itest.app.conf.get(name) for name in _RESTORED}
    yield
    itest.app.conf.update(saved)


@pytest.fixture(scope="module")
def shared_stack(redis_server: RedisServer) -> Stack:
    return redis_stack(redis_server)


@pytest.fixture(scope="module")
def shared_worker(shared_stack: Stack,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One prefork worker (-c 2) for the tests that kill, revoke or outlast a child of it: the
    pool replaces a lost child, and every test has its own keys and jobs."""
    worker = start_worker(shared_stack, tmp_path_factory.mktemp("shared-worker"))
    yield worker
    worker.stop()


@pytest.fixture
def crash_stack(shared_stack: Stack, app_conf: None) -> Stack:
    """The shared worker's stack, the publisher pointed at it."""
    use_stack(itest.app, shared_stack)
    return shared_stack


@pytest.fixture
def own_stack(redis_server: RedisServer, app_conf: None) -> Stack:
    """A stack (queue) of the test's own, for workers the test starts itself."""
    made = redis_stack(redis_server)
    use_stack(itest.app, made)
    return made


def effects_of(stack: Stack) -> Effects:
    return Effects(stack.effects())


@pytest.fixture
def effects(shared_stack: Stack) -> Iterator[Effects]:
    """The effects db (the same for every stack on the session server)."""
    found = effects_of(shared_stack)
    yield found
    found.client.close()


@pytest.fixture
def published() -> Iterator[PublishLog]:
    with PublishLog() as log:
        yield log


def record_of(task: IdempotentTask, key: str) -> Record | None:
    return task.idem_store().get(RecordRef(task.name, key))


def runs_of(effects: Effects, name: str, job: str) -> list[dict[str, Any]]:
    """One entry per run of the task body: run number, pid, task id, fence, start time."""
    return effects.values(name, job)


def done_of(effects: Effects, name: str, job: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in effects.client.lrange(f"done:{name}:{job}", 0, -1)]


def wait_for_runs(effects: Effects, name: str, job: str, count: int,
                  worker: Worker | None = None) -> list[dict[str, Any]]:
    def started() -> list[dict[str, Any]] | None:
        runs = runs_of(effects, name, job)
        return runs if len(runs) >= count else None

    return wait_for(started, what=f"run {count} of {name}({job})", worker=worker)


def wait_for_state(task: IdempotentTask, key: str, state: KeyState,
                   worker: Worker | None = None, timeout: float = TIMEOUT) -> Record:
    def reached() -> Record | None:
        record = record_of(task, key)
        return record if record is not None and record.state is state else None

    return wait_for(reached, what=f"key {key!r} to be {state.value}", worker=worker,
                    timeout=timeout)


def wait_for_expired_lease(task: IdempotentTask, key: str) -> Record:
    """Until the key's claim has outlived its lease (by the store's clock)."""
    store = task.idem_store()

    def expired() -> Record | None:
        record = record_of(task, key)
        return record if record is not None and record.lease_expired(store.now_ms()) else None

    return wait_for(expired, what=f"the lease of key {key!r} to expire")


def given_up_lines(worker: Worker, task_id: str) -> list[LogLine]:
    """The main process's "claim given up" lines about ``task_id``, once there is one (the line
    is written just after the store write that a test may have seen first)."""
    def logged() -> list[LogLine]:
        return [line for line in log_lines(worker, "claim given up")
                if f"[{task_id}]" in line.message]

    wait_for(logged, what=f"'claim given up' for {task_id}", worker=worker)
    time.sleep(0.05)  # and any second line would be there too
    return logged()


def error_type(record: Record) -> str:
    assert record.error is not None
    return str(record.error["type"])


def measured(name: str, value: float) -> None:
    """Report a measured time (seconds) with the test's output (``pytest -s`` shows it)."""
    print(f"[measured] {name}: {value:.3f}")


# -- 1, 2: a prefork child killed mid-task ---------------------------------------------------


def test_killed_child_with_requeue_gives_up_the_claim_and_the_redelivery_runs_at_once(
        crash_stack: Stack, shared_worker: Worker, effects: Effects, published: PublishLog) -> None:
    """acks_late + reject_on_worker_lost: the main process puts the key back to ``pending``
    as it requeues the message, so the redelivery claims it at once; the lease (30 s) plays no
    part. The side effect ran twice: the child died after it, before the outcome was written
    (the documented limit)."""
    worker = shared_worker
    job, key = unique("kill"), unique("kill-key")

    handle = long_lease.apply_async((job, 2.0), idempotency_key=key)
    first = wait_for_runs(effects, "long_lease", job, 1, worker)[0]
    claimed = record_of(long_lease, key)
    assert claimed is not None and claimed.state is KeyState.STARTED
    assert (claimed.fence, claimed.task_id) == (first["fence"], handle.id)
    assert claimed.lease_expires_ms is not None

    os.kill(first["pid"], signal.SIGKILL)
    killed_at = time.time()
    result = handle.get(timeout=TIMEOUT)
    returned_at = time.time()

    runs = runs_of(effects, "long_lease", job)
    assert len(runs) == 2, runs
    second = runs[1]
    assert result == {"job": job, "run": 2, "fence": second["fence"], "pid": second["pid"]}
    assert second["task_id"] == handle.id, "the redelivered message, not a new publish"
    assert second["pid"] != first["pid"]
    assert second["fence"] > first["fence"]
    # Freed by the main process, not by the lease running out.
    assert second["started"] * 1000 < claimed.lease_expires_ms - 20_000

    given_up = given_up_lines(worker, handle.id)
    assert len(given_up) == 1, given_up
    assert given_up[0].process == "MainProcess"
    assert "claim given up (pending for the redelivery)" in given_up[0].message
    assert not log_lines(worker, f"[{handle.id}] key={key!r} is running as task"), \
        "the redelivery never found the key busy: the claim was given up first"
    assert not [line for line in log_lines(worker, "taken over") if key in line.message]

    final = record_of(long_lease, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert (final.fence, final.task_id) == (second["fence"], handle.id)

    time.sleep(SETTLE)
    assert effects.count("long_lease", job) == 2
    assert [d["run"] for d in done_of(effects, "long_lease", job)] == [2]
    assert published.ids_for(key) == [handle.id]
    assert len(task_log(worker, handle.id, "succeeded")) == 1

    measured("1: kill -> claim given up (main process log)", given_up[0].at - killed_at)
    measured("1: claim given up -> redelivered run starts", second["started"] - given_up[0].at)
    measured("1: kill -> redelivered run starts", second["started"] - killed_at)
    measured("1: kill -> .get() returns (2 s task)", returned_at - killed_at)


def test_killed_child_without_requeue_fails_the_key_retryable(
        crash_stack: Stack, shared_worker: Worker, effects: Effects, published: PublishLog) -> None:
    """reject_on_worker_lost=False: Celery acknowledges the lost message, nothing will run it.
    The key becomes ``failed`` (retryable) with the WorkerLostError: the handle raises it (as a
    ReplayedTaskError: a replay never raises a control-flow exception), and
    the next publish with the key runs the task again (it is not a duplicate)."""
    worker = shared_worker
    job, key = unique("lost"), unique("lost-key")

    handle = long_lease_unrequeued.apply_async((job, 1.0), idempotency_key=key)
    first = wait_for_runs(effects, "long_lease_unrequeued", job, 1, worker)[0]
    os.kill(first["pid"], signal.SIGKILL)

    failed = wait_for_state(long_lease_unrequeued, key, KeyState.FAILED, worker)
    assert failed.retryable is True
    assert error_type(failed) == "billiard.exceptions.WorkerLostError"
    assert (failed.task_id, failed.fence) == (handle.id, first["fence"])
    # A control-flow exception is never raised by a replay (.get() included): the stand-in.
    with pytest.raises(ReplayedTaskError) as raised:
        handle.get(timeout=TIMEOUT)
    assert raised.value.error_type == "billiard.exceptions.WorkerLostError"
    given_up = given_up_lines(worker, handle.id)
    assert len(given_up) == 1
    assert "claim given up (failed, the next publish runs it)" in given_up[0].message

    time.sleep(SETTLE)  # the acknowledged message must not come back
    assert effects.count("long_lease_unrequeued", job) == 1
    assert len(task_log(worker, handle.id, "received")) == 1

    again = long_lease_unrequeued.apply_async((job, 1.0), idempotency_key=key)
    assert again.duplicate is False
    assert again.id != handle.id
    result = again.get(timeout=TIMEOUT)
    second = runs_of(effects, "long_lease_unrequeued", job)[1]
    assert result == {"job": job, "run": 2, "fence": second["fence"], "pid": second["pid"]}
    assert second["fence"] > first["fence"]
    assert second["task_id"] == again.id
    # The first handle reads the key: it now sees the new run's result.
    assert handle.get(timeout=TIMEOUT) == result

    time.sleep(SETTLE)
    final = record_of(long_lease_unrequeued, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert (final.task_id, final.fence) == (again.id, second["fence"])
    assert effects.count("long_lease_unrequeued", job) == 2
    assert published.ids_for(key) == [handle.id, again.id]


# -- 3: revoked, expired, terminated -------------------------------------------------------


def _assert_runs_again(task: IdempotentTask, args: tuple[Any, ...], key: str,
                       first_id: str, effects: Effects, name: str, job: str,
                       runs_before: int) -> None:
    """The next publish with the key is not a duplicate: it runs the task (a higher fence)."""
    again = task.apply_async(args, idempotency_key=key)
    assert again.duplicate is False and again.id != first_id
    result = again.get(timeout=TIMEOUT)
    assert result["run"] == runs_before + 1
    final = record_of(task, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert final.task_id == again.id
    time.sleep(SETTLE)
    assert effects.count(name, job) == runs_before + 1


def test_revoked_before_it_runs_fails_the_key_retryable(
        crash_stack: Stack, shared_worker: Worker, effects: Effects, published: PublishLog) -> None:
    worker = shared_worker
    job, key = unique("revoke"), unique("revoke-key")

    handle = long_lease.apply_async((job, 0.1), idempotency_key=key, countdown=3)
    wait_for(lambda: task_log(worker, handle.id, "received"), what="the ETA message to arrive",
             worker=worker)
    itest.app.control.revoke(handle.id)
    wait_for(lambda: [line for line in log_lines(worker, "flagged as revoked")
                      if handle.id in line.message],
             what="the revoke to arrive", worker=worker)

    failed = wait_for_state(long_lease, key, KeyState.FAILED, worker)
    assert failed.retryable is True
    assert error_type(failed) == REVOKED
    assert failed.error is not None and "revoked" in failed.error["message"]
    assert (failed.task_id, failed.fence) == (handle.id, 0), "never claimed"
    with pytest.raises(TaskRevokedError):
        handle.get(timeout=TIMEOUT)
    given_up = given_up_lines(worker, handle.id)
    assert len(given_up) == 1
    assert f"key={key!r}: task revoked; claim given up (failed, the next publish runs it)" in \
        given_up[0].message
    assert effects.count("long_lease", job) == 0

    _assert_runs_again(long_lease, (job, 0.1), key, handle.id, effects, "long_lease", job, 0)
    assert len(published.ids_for(key)) == 2


def test_expired_before_it_runs_fails_the_key_retryable(
        crash_stack: Stack, shared_worker: Worker, effects: Effects, published: PublishLog) -> None:
    worker = shared_worker
    job, key = unique("expired"), unique("expired-key")

    past = datetime.now(timezone.utc) - timedelta(seconds=5)
    handle = long_lease.apply_async((job, 0.1), idempotency_key=key, expires=past)
    failed = wait_for_state(long_lease, key, KeyState.FAILED, worker)
    assert failed.retryable is True
    assert error_type(failed) == REVOKED
    assert failed.error is not None and "expired" in failed.error["message"]
    with pytest.raises(TaskRevokedError):
        handle.get(timeout=TIMEOUT)
    given_up = given_up_lines(worker, handle.id)
    assert len(given_up) == 1 and f"key={key!r}: task expired; claim given up" in \
        given_up[0].message
    assert effects.count("long_lease", job) == 0

    _assert_runs_again(long_lease, (job, 0.1), key, handle.id, effects, "long_lease", job, 0)
    assert len(published.ids_for(key)) == 2


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
def test_terminated_while_running_fails_the_key_retryable(
        signame: str, crash_stack: Stack, shared_worker: Worker, effects: Effects) -> None:
    """revoke(terminate=True): the main process fails the key (retryable) as it acknowledges
    the message. With SIGTERM (Celery's default) the child also unwinds (SystemExit) and gives
    its claim back; whichever comes first, the key ends failed, and nothing runs it again until
    the next publish."""
    worker = shared_worker
    job, key = unique("terminate"), unique("terminate-key")

    handle = long_lease.apply_async((job, 2.0), idempotency_key=key)
    first = wait_for_runs(effects, "long_lease", job, 1, worker)[0]
    itest.app.control.revoke(handle.id, terminate=True, signal=signame)

    failed = wait_for_state(long_lease, key, KeyState.FAILED, worker)
    assert failed.retryable is True
    assert error_type(failed) == REVOKED
    assert (failed.task_id, failed.fence) == (handle.id, first["fence"])
    with pytest.raises(TaskRevokedError):
        handle.get(timeout=TIMEOUT)
    given_up = given_up_lines(worker, handle.id)
    assert len(given_up) == 1 and f"key={key!r}: task terminated; claim given up" in \
        given_up[0].message
    wait_for(lambda: not _alive(first["pid"]), what="the child to be gone", worker=worker)

    time.sleep(SETTLE)  # the revoked message is acknowledged: no redelivery
    settled = record_of(long_lease, key)
    assert settled is not None and settled.state is KeyState.FAILED, \
        "the child's exit changed nothing"
    assert effects.count("long_lease", job) == 1
    assert done_of(effects, "long_lease", job) == []
    assert len(task_log(worker, handle.id, "received")) == 1

    _assert_runs_again(long_lease, (job, 2.0), key, handle.id, effects, "long_lease", job, 1)
    final = record_of(long_lease, key)
    assert final is not None and final.fence > first["fence"]


def test_terminated_task_that_finishes_late_cannot_write(
        crash_stack: Stack, shared_worker: Worker, effects: Effects) -> None:
    """revoke(terminate=True, signal='SIGUSR1') raises SoftTimeLimitExceeded in the task, which
    here still returns a result a second later: the key was failed by the revoke meanwhile,
    and the late success is refused (OwnershipLost, logged), not written over it."""
    worker = shared_worker
    job, key = unique("late"), unique("late-key")

    handle = interruptible.apply_async((job, 10.0, 1.0), idempotency_key=key)
    wait_for_runs(effects, "interruptible", job, 1, worker)
    itest.app.control.revoke(handle.id, terminate=True, signal="SIGUSR1")

    failed = wait_for_state(interruptible, key, KeyState.FAILED, worker)
    assert failed.retryable is True and error_type(failed) == REVOKED
    wait_for(lambda: done_of(effects, "interruptible", job), what="the late return",
             worker=worker)
    refused = wait_for(lambda: log_lines(worker, f"[{handle.id}]: did not record success"),
                       what="the late write to be refused", worker=worker)
    assert refused[0].level == "ERROR" and "lost the claim" in refused[0].message

    time.sleep(SETTLE)
    final = record_of(interruptible, key)
    assert final is not None and final.state is KeyState.FAILED
    assert final.retryable is True and error_type(final) == REVOKED
    assert final.result is None
    assert effects.count("interruptible", job) == 1
    assert effects.count("interrupted", job) == 1
    with pytest.raises(TaskRevokedError):
        handle.get(timeout=TIMEOUT)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


# -- 4: the broker redelivers a task that is still running ------------------------------------

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
    effects = effects_of(stack)
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


# -- 5: the lease keeper keeps a long task's claim ---------------------------------------------


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_heartbeat_keeps_a_task_running_three_times_its_lease(
        pool: str, request: pytest.FixtureRequest, fleet: Fleet, effects: Effects,
        published: PublishLog) -> None:
    """``slow`` has a 1.5 s lease and runs 4.5 s. A duplicate message (sent by name with the
    key header) arrives after the first lease would have run out: it finds the key busy,
    never takes over, and replays the one result."""
    from tests.integration.app import slow

    if pool == "prefork":  # -c 2: the duplicate runs in the other child
        request.getfixturevalue("crash_stack")
        workers = [request.getfixturevalue("shared_worker")]
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


# -- 6: a frozen worker loses its claim; its late outcome is refused ---------------------------


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
                         and _parent_of(pid) == w.process.pid)
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


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


# -- 7: the key store restarts or stays down while a task runs --------------------------------


@pytest.fixture
def outage_stack(redis_server: RedisServer, own_redis: RedisServer, app_conf: None) -> Stack:
    made = redis_stack(redis_server, store=own_redis, idempotency_store_timeout=0.5,
                       idempotency_store_retry_max_delay=1.0)
    use_stack(itest.app, made)
    return made


def test_store_restarted_with_data_at_completion_the_retried_write_lands(
        own_redis: RedisServer, outage_stack: Stack, fleet: Fleet) -> None:
    """The store goes down (saving its data) while the task runs and comes back just after the
    body returned: the outcome write, retried while the store is unreachable, lands after
    the restart."""
    worker = fleet.start(outage_stack)
    effects = effects_of(outage_stack)
    job, key = unique("restart-data"), unique("restart-data-key")

    handle = long_lease.apply_async((job, 1.5), idempotency_key=key)
    first = wait_for_runs(effects, "long_lease", job, 1, worker)[0]
    own_redis.stop(save=True)
    done = wait_for(lambda: done_of(effects, "long_lease", job), what="the body to return",
                    worker=worker)[0]
    time.sleep(0.3)  # let the outage span a few write attempts
    back_at = time.time()
    own_redis.start(keep_data=True)

    result = handle.get(timeout=TIMEOUT)
    assert result["run"] == 1 and result["fence"] == first["fence"]
    succeeded = wait_for(lambda: log_lines(worker, f"[{handle.id}] succeeded"),
                         what="Celery's success line", worker=worker)
    assert done["at"] < back_at <= succeeded[0].at + 0.001, \
        "the body returned during the outage; the outcome was written after the restart"
    time.sleep(SETTLE)
    final = record_of(long_lease, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert (final.task_id, final.fence) == (handle.id, first["fence"])
    assert effects.count("long_lease", job) == 1
    assert "could not record success" not in worker.output()
    effects.client.close()
    measured("7a: body returned -> outcome written (store restarted)",
             succeeded[0].at - done["at"])


def test_store_restarted_empty_refuses_the_completion_and_the_key_runs_again(
        own_redis: RedisServer, outage_stack: Stack, fleet: Fleet) -> None:
    """The documented data-loss window: the store loses its data while a task runs. The
    completion finds no record and writes nothing (OwnershipLost, logged); the key is unknown,
    so a later publish runs the task again."""
    worker = fleet.start(outage_stack)
    effects = effects_of(outage_stack)
    job, key = unique("restart-empty"), unique("restart-empty-key")

    handle = long_lease.apply_async((job, 1.5), idempotency_key=key)
    first = wait_for_runs(effects, "long_lease", job, 1, worker)[0]
    own_redis.restart(keep_data=False)
    assert record_of(long_lease, key) is None

    refused = wait_for(lambda: log_lines(worker, "lost the claim"),
                       what="the completion to be refused", worker=worker)
    assert refused[0].level == "ERROR" and f"[{handle.id}]" in refused[0].message
    assert "the record is gone" in refused[0].message
    assert record_of(long_lease, key) is None, "nothing written into the empty store"

    again = long_lease.apply_async((job, 1.5), idempotency_key=key)
    assert again.duplicate is False and again.id != handle.id
    result = again.get(timeout=TIMEOUT)
    # A new record (the store lost everything), yet its first fence is above the lost one.
    assert result["run"] == 2 and result["fence"] > first["fence"]
    assert handle.get(timeout=TIMEOUT) == result
    time.sleep(SETTLE)
    assert effects.count("long_lease", job) == 2
    final = record_of(long_lease, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert final.task_id == again.id
    effects.client.close()


def test_store_down_for_seconds_at_completion_the_write_waits_and_lands(
        own_redis: RedisServer, outage_stack: Stack, fleet: Fleet) -> None:
    """The store is down for 4 s (longer than its 0.5 s timeout and any single retry) when the
    task returns: the outcome write keeps trying (idempotency_store_write_timeout, 300 s by
    default) and lands once the store is back; the handle gets the result, nothing re-runs."""
    from tests.integration.app import six_second_lease

    worker = fleet.start(outage_stack)
    effects = effects_of(outage_stack)
    job, key = unique("wait"), unique("wait-key")
    handle = six_second_lease.apply_async((job, 0.5), idempotency_key=key)
    first = wait_for_runs(effects, "six_second_lease", job, 1, worker)[0]
    own_redis.stop(save=True)
    wait_for(lambda: log_lines(worker, "store unreachable, trying to record success"),
             what="the write to wait for the store", worker=worker)
    time.sleep(4)
    own_redis.start(keep_data=True)
    result = handle.get(timeout=TIMEOUT)
    assert result["run"] == 1 and result["fence"] == first["fence"]
    record = record_of(six_second_lease, key)
    assert record is not None
    assert (record.state, record.fence) == (KeyState.SUCCEEDED, first["fence"])
    assert six_second_lease.apply_async((job, 0.5), idempotency_key=key).duplicate
    time.sleep(SETTLE)
    assert effects.count("six_second_lease", job) == 1
    assert not log_lines(worker, "could not record success")
    effects.client.close()


@pytest.fixture
def short_write_stack(redis_server: RedisServer, own_redis: RedisServer,
                      app_conf: None) -> Stack:
    made = redis_stack(redis_server, store=own_redis, idempotency_store_timeout=0.5,
                       idempotency_store_retry_max_delay=1.0,
                       idempotency_store_write_timeout=1.5)
    use_stack(itest.app, made)
    return made


def test_store_down_past_the_write_timeout_keeps_the_claim_until_its_lease_expires(
        own_redis: RedisServer, short_write_stack: Stack, fleet: Fleet,
        published: PublishLog) -> None:
    """The store is down for longer than the outcome-write timeout (1.5 s here): the worker
    logs an ERROR and the claim stays ``started`` (a publish meanwhile is a duplicate) until
    its lease (6 s) expires; then a publish goes out and takes over with a higher fence."""
    from tests.integration.app import six_second_lease

    outage_stack = short_write_stack
    worker = fleet.start(outage_stack)
    effects = effects_of(outage_stack)
    job, key = unique("down"), unique("down-key")
    store = six_second_lease.idem_store()

    handle = six_second_lease.apply_async((job, 0.5), idempotency_key=key)
    first = wait_for_runs(effects, "six_second_lease", job, 1, worker)[0]
    own_redis.stop(save=True)
    done = wait_for(lambda: done_of(effects, "six_second_lease", job), what="the body to return",
                    worker=worker)[0]
    gave_up = wait_for(lambda: log_lines(worker, "could not record success, store unreachable"),
                       what="the write to be given up", worker=worker)
    assert gave_up[0].level == "ERROR" and "the claim stays until its lease expires" in \
        gave_up[0].message
    own_redis.start(keep_data=True)
    back_at = time.time()

    stuck = record_of(six_second_lease, key)
    assert stuck is not None and stuck.state is KeyState.STARTED
    assert (stuck.task_id, stuck.fence) == (handle.id, first["fence"])
    assert stuck.lease_expires_ms is not None
    left_ms = stuck.lease_expires_ms - store.now_ms()
    assert left_ms > 0, f"the lease must still be alive after the restart ({left_ms} ms)"
    probe = six_second_lease.apply_async((job, 0.5), idempotency_key=key)
    assert (probe.id, probe.duplicate) == (handle.id, True)

    wait_for_expired_lease(six_second_lease, key)
    expired_at = time.time()
    takeover = six_second_lease.apply_async((job, 0.5), idempotency_key=key)
    assert takeover.duplicate is False and takeover.id != handle.id
    result = takeover.get(timeout=TIMEOUT)
    second = runs_of(effects, "six_second_lease", job)[1]
    assert result == {"job": job, "run": 2, "fence": second["fence"], "pid": second["pid"]}
    assert second["fence"] > first["fence"]
    assert f"[{takeover.id}] key={key!r}: the lease of task {handle.id} expired; taken over " \
           f"(fence {second['fence']})" in worker.output()
    assert handle.get(timeout=TIMEOUT) == result
    time.sleep(SETTLE)
    assert effects.count("six_second_lease", job) == 2
    final = record_of(six_second_lease, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert (final.task_id, final.fence) == (takeover.id, second["fence"])
    assert published.ids_for(key) == [handle.id, takeover.id]
    effects.client.close()

    measured("7c: body returned -> write given up (ERROR)", gave_up[0].at - done["at"])
    measured("7c: store back -> lease expired", expired_at - back_at)
    measured("7c: lease left when the store came back", left_ms / 1000)
    measured("7c: body returned -> takeover run starts", second["started"] - done["at"])
