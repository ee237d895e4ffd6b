"""Replaying cached errors with real workers: no redelivery storms, no constructors the user
did not opt into (tests/integration/replay_app.py counts deliveries, runs and constructions).

"No storm" is checked by counting deliveries once every expected delivery has finished, and
again after a quiet window: a rebuilt Reject or WorkerLostError used to be redelivered hundreds
of times per second, so any extra delivery would show within it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_idempotency import KeyState, ReplayedTaskError, result_for_key
from tests.integration import replay_app
from tests.support.apps import RedisFromEnv
from tests.support.integration import TIMEOUT, Stack, unique, wait_for
from tests.support.workers import Worker

APP_MODULE = "tests.integration.replay_app"
QUIET_WINDOW = 2.0  # seconds without a further delivery after the expected ones finished


class Counts:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def __call__(self, what: str, job: str) -> int:
        return int(self.client.get(f"{what}:{job}") or 0)


@pytest.fixture(scope="module")
def tested_app() -> tuple[Celery, str]:
    """The module's stack and worker run the replay app."""
    return replay_app.app, APP_MODULE


@pytest.fixture
def counts(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Counts]:
    # The publisher's own copies of Audited (a .get() that rebuilds it) count there too.
    monkeypatch.setenv("EFFECTS_URL", stack.effects_url)
    monkeypatch.setattr(replay_app, "effects", RedisFromEnv("EFFECTS_URL"))  # a new client
    client = stack.effects()
    yield Counts(client)
    client.close()


def settle(counts: Counts, worker: Worker, jobs: dict[str, int]) -> None:
    """Wait until each job's expected deliveries finished, then a quiet window; then every job
    must have been delivered exactly that often."""
    wait_for(lambda: all(counts("finished", job) >= n for job, n in jobs.items()),
             what=f"deliveries to finish: {jobs}", worker=worker)
    time.sleep(QUIET_WINDOW)
    assert {job: counts("deliveries", job) for job in jobs} == jobs, worker.output()[-3000:]


def send_duplicate(task: Any, job: str) -> None:
    """A second message for the key, as a redelivery or another service would send it (by
    name, with the key header): not deduplicated at publish, so it reaches the worker."""
    replay_app.app.send_task(task.name, (job,), headers={"idempotency_key": job})


def write_failed_record(task: Any, job: str, error: dict[str, Any]) -> None:
    """A failed, non-retryable record written by hand (as an attacker with store access, or
    an earlier deploy, could), for the key ``job`` of ``task``."""
    store = task.idem_store()
    context = task.key_target((job,), {}, key=job, message_options={})
    store.reserve(context.ref, task_id="hand-written", fingerprint=context.fingerprint,
                  task_name=task.name, ttl_ms=600_000)
    store.claim(context.ref, task_id="hand-written", owner="by-hand",
                fingerprint=context.fingerprint, task_name=task.name, lease_ms=600_000,
                ttl_ms=600_000)
    store.fail(context.ref, owner="by-hand", error=json.dumps(error), retryable=False,
               ttl_ms=600_000)


def test_a_cached_worker_lost_error_raised_by_the_task_is_requeued_once_then_replayed(
        worker: Worker, counts: Counts) -> None:
    job = unique("lost-cached")
    handle = replay_app.lost_cached.apply_async((job,), idempotency_key=job)
    # Celery requeues the first delivery (reject_on_worker_lost: it takes the error for a lost
    # child); the redelivery replays the cached error, which is not a WorkerLostError.
    settle(counts, worker, {job: 2})
    send_duplicate(replay_app.lost_cached, job)
    settle(counts, worker, {job: 3})
    assert counts("runs", job) == 1
    with pytest.raises(ReplayedTaskError) as replayed:
        handle.get(timeout=TIMEOUT)
    assert replayed.value.error_type == "billiard.exceptions.WorkerLostError"
    assert "raised by the task itself" in replayed.value.message
    again = replay_app.lost_cached.apply_async((job,), idempotency_key=job)
    assert again.duplicate


def test_an_uncached_worker_lost_error_raised_by_the_task_is_not_rebuilt_by_get(
        worker: Worker, counts: Counts) -> None:
    job = unique("lost-uncached")
    handle = replay_app.lost_uncached.apply_async((job,), idempotency_key=job)
    settle(counts, worker, {job: 1})
    with pytest.raises(ReplayedTaskError) as replayed:
        handle.get(timeout=TIMEOUT)
    assert replayed.value.error_type == "billiard.exceptions.WorkerLostError"
    # A retryable failure: the next message runs the task again, once.
    send_duplicate(replay_app.lost_uncached, job)
    settle(counts, worker, {job: 2})
    assert counts("runs", job) == 2


CONTROL_FLOW_RECORDS = {
    "reject": {"type": "celery.exceptions.Reject", "message": "m", "args": ["m", True]},
    "retry": {"type": "celery.exceptions.Retry", "message": "m", "args": ["m", None, 0.1]},
    "ignore": {"type": "celery.exceptions.Ignore", "message": "", "args": []},
    "terminated": {"type": "billiard.exceptions.Terminated", "message": "9", "args": [9]},
    "worker-lost": {"type": "billiard.exceptions.WorkerLostError", "message": "m",
                    "args": ["m"]},
    "time-limit": {"type": "billiard.exceptions.TimeLimitExceeded", "message": "1",
                   "args": [1]},
    "system-exit": {"type": "builtins.SystemExit", "message": "1", "args": [1]},
}


def test_hand_written_control_flow_records_replay_once_as_replayed_task_error(
        worker: Worker, counts: Counts) -> None:
    jobs = {name: unique(f"hand-{name}") for name in CONTROL_FLOW_RECORDS}
    for name, job in jobs.items():
        write_failed_record(replay_app.plain, job, CONTROL_FLOW_RECORDS[name])
        send_duplicate(replay_app.plain, job)
    settle(counts, worker, {job: 1 for job in jobs.values()})
    for name, job in jobs.items():
        assert counts("runs", job) == 0
        handle = result_for_key(replay_app.app, job, scope=replay_app.plain.name)
        assert handle is not None
        with pytest.raises(ReplayedTaskError) as replayed:
            handle.get(timeout=TIMEOUT)
        assert replayed.value.error_type == CONTROL_FLOW_RECORDS[name]["type"]
        assert replayed.value.error_args == CONTROL_FLOW_RECORDS[name]["args"]
    assert "raised unexpected: ReplayedTaskError" in worker.output()


def test_a_side_effecting_constructor_runs_only_as_often_as_opted_in(
        worker: Worker, counts: Counts) -> None:
    replays, gets = 3, 4
    cached, uncached = unique("audited-cached"), unique("audited-uncached")
    # Opted in (idempotency_cache_errors=(Audited,)): every replay rebuilds Audited.
    handle = replay_app.audited_cached.apply_async((cached,), idempotency_key=cached)
    settle(counts, worker, {cached: 1})
    # Celery itself copies the raised exception (pickled from the pool child to the main
    # process): the original raise costs this many constructions...
    per_raise = counts("constructed", cached)
    assert per_raise >= 1
    for _ in range(replays):
        send_duplicate(replay_app.audited_cached, cached)
    settle(counts, worker, {cached: 1 + replays})
    # ...and each replay exactly as many: the rebuild, and Celery's copies of it.
    assert counts("constructed", cached) == per_raise * (1 + replays)
    for _ in range(gets):
        with pytest.raises(replay_app.Audited):
            handle.get(timeout=TIMEOUT)
    assert counts("constructed", cached) == per_raise * (1 + replays) + gets
    assert counts("runs", cached) == 1

    # Not opted in: a record cached under another configuration is replayed as
    # ReplayedTaskError, by the worker and by .get(), without constructing Audited.
    write_failed_record(replay_app.audited_uncached, uncached,
                        {"type": "tests.integration.replay_app.Audited",
                         "message": f"('{uncached}', 'declined')", "args": [uncached, "declined"]})
    for _ in range(replays):
        send_duplicate(replay_app.audited_uncached, uncached)
    settle(counts, worker, {uncached: replays})
    handle = result_for_key(replay_app.app, uncached, scope=replay_app.audited_uncached.name)
    assert handle is not None
    for _ in range(gets):
        with pytest.raises(ReplayedTaskError) as replayed:
            handle.get(timeout=TIMEOUT)
        assert replayed.value.error_type == "tests.integration.replay_app.Audited"
    assert counts("constructed", uncached) == 0 and counts("runs", uncached) == 0



def test_an_error_whose_str_and_repr_raise_still_records_a_retryable_failure(
        worker: Worker, counts: Counts) -> None:
    job = unique("unprintable")
    handle = replay_app.unprintable.apply_async((job,), idempotency_key=job)
    settle(counts, worker, {job: 1})
    record = handle.record()
    assert record is not None and record.state is KeyState.FAILED and record.retryable
    assert record.error is not None
    assert record.error["type"] == "tests.integration.replay_app.Unprintable"
    assert record.error["message"].startswith("<unprintable ")
    assert record.error["args"] == [job]
    with pytest.raises(ReplayedTaskError):
        handle.get(timeout=TIMEOUT)
