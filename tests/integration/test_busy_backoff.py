"""A duplicate message blocked by a live owner, with real workers: its re-sends back off
(1, 2, 4, 8... s, never past the owner's lease left) instead of one per
``idempotency_busy_retry_delay``; a dead owner's key is still taken over once its lease runs
out; a short owner's duplicate replays without a re-send."""

from __future__ import annotations

import itertools
import re
import time

from celery_idempotency import KeyState
from celery_idempotency.protocol import BUSY_ATTEMPT_HEADER
from tests.integration import app as itest
from tests.integration.app import long_lease, six_second_lease
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
from tests.support.procs import parent_of
from tests.support.runs import SETTLE, measured, record_of, wait_for_runs
from tests.support.workers import Worker

_LOOKING_AGAIN = re.compile(r"looking again in (\d+\.\d+) s")


def _resend_delays(workers: list[Worker], task_id: str, key: str) -> list[float]:
    """The countdowns of a message's busy re-sends, in order (from the workers' logs)."""
    lines = sorted((line for w in workers
                    for line in log_lines(w, f"[{task_id}] key={key!r} is running as task")),
                   key=lambda line: line.at)
    return [float(m.group(1)) for line in lines if (m := _LOOKING_AGAIN.search(line.message))]


def test_a_duplicate_of_a_long_run_is_resent_with_backoff(
        own_stack: Stack, fleet: Fleet, effects: Effects) -> None:
    """The owner runs 20 s (lease 30 s, renewed). The old fixed 1 s delay re-sent the
    duplicate about 20 times; now the countdowns double: 1, 2, 4, 8, 16 s."""
    workers = [fleet.start(own_stack, concurrency=2)]
    job, key = unique("backoff"), unique("backoff-key")
    handle = long_lease.apply_async((job, 20.0), idempotency_key=key)
    wait_for_runs(effects, "long_lease", job, 1, worker=workers[0])
    duplicate = itest.app.send_task(long_lease.name, args=(job, 20.0),
                                    headers={"idempotency_key": key})
    result = handle.get(timeout=TIMEOUT)
    wait_for(lambda: task_log(workers[0], duplicate.id, "succeeded"),
             what="the duplicate to replay the result", timeout=TIMEOUT + 40,
             worker=workers[0])
    time.sleep(SETTLE)
    assert repr(result) in task_log(workers[0], duplicate.id, "succeeded")[0]
    assert effects.count("long_lease", job) == 1
    delays = _resend_delays(workers, duplicate.id, key)
    measured("busy re-sends of the duplicate during a 20 s run", len(delays))
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0], delays
    assert 4 <= len(delays) <= 6, f"{len(delays)} re-sends (a fixed 1 s delay: about 20)"
    assert all(later >= earlier for earlier, later in itertools.pairwise(delays))


def test_a_backing_off_duplicate_takes_a_dead_owners_key_over_after_its_lease(
        own_stack: Stack, fleet: Fleet, effects: Effects) -> None:
    """The owner (lease 6 s, a 3 s run) is frozen mid-run, worker and all: no renewals. The
    duplicate's countdowns never pass the lease left, so it is back when the lease has run
    out and takes the key over."""
    workers = [fleet.start(own_stack, concurrency=1), fleet.start(own_stack, concurrency=1)]
    job, key = unique("dead-owner"), unique("dead-owner-key")
    six_second_lease.apply_async((job, 3.0), idempotency_key=key)
    first = wait_for_runs(effects, "six_second_lease", job, 1)[0]
    owner = next(w for w in workers if w.process is not None
                 and parent_of(first["pid"]) == w.process.pid)
    # The whole worker, as a dead host would be: its main process must not take the
    # duplicate's messages either.
    fleet.freeze(first["pid"])
    assert owner.process is not None
    fleet.freeze(owner.process.pid)
    # As if it had looked 3 times already: uncapped, its next countdown would be 8 s.
    duplicate = itest.app.send_task(six_second_lease.name, args=(job, 3.0),
                                    headers={"idempotency_key": key,
                                             BUSY_ATTEMPT_HEADER: 3})
    other = next(w for w in workers if w is not owner)
    runs = wait_for_runs(effects, "six_second_lease", job, 2, worker=other)
    assert runs[1]["task_id"] == duplicate.id
    assert runs[1]["fence"] > first["fence"]
    wait_for(lambda: [w for w in workers
                      if f"[{duplicate.id}] succeeded" in w.output()],
             what="the duplicate's run to finish")
    final = record_of(six_second_lease, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert final.task_id == duplicate.id
    assert any("taken over" in w.output() for w in workers)
    delays = _resend_delays(workers, duplicate.id, key)
    assert delays and all(delay <= 6.0 for delay in delays), delays
    measured("busy re-sends before the takeover", len(delays))


def test_a_short_owners_duplicate_replays_without_a_resend(
        own_stack: Stack, fleet: Fleet, effects: Effects) -> None:
    """The duplicate arrives while the owner runs 0.4 s: it waits in the worker, is woken by
    the owner's outcome, and replays it; no re-send."""
    workers = [fleet.start(own_stack, concurrency=2)]
    job, key = unique("short-owner"), unique("short-owner-key")
    handle = long_lease.apply_async((job, 0.4), idempotency_key=key)
    wait_for_runs(effects, "long_lease", job, 1, worker=workers[0])
    duplicate = itest.app.send_task(long_lease.name, args=(job, 0.4),
                                    headers={"idempotency_key": key})
    result = handle.get(timeout=TIMEOUT)
    wait_for(lambda: task_log(workers[0], duplicate.id, "succeeded"),
             what="the duplicate to replay the result", worker=workers[0])
    assert repr(result) in task_log(workers[0], duplicate.id, "succeeded")[0]
    assert effects.count("long_lease", job) == 1
    waited = log_lines(workers[0], f"[{duplicate.id}] key={key!r} is held by task")
    if not waited:  # the duplicate came after the outcome (a slow machine): nothing to show
        assert not log_lines(workers[0], f"[{duplicate.id}] key={key!r} is running")
        return
    assert _resend_delays(workers, duplicate.id, key) == []
