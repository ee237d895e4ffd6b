"""What a task did, read back by the integration tests: its key's record in the store, the runs
of its body (the effects db: one entry per run saying which process, task id and fence ran it,
and one per run that returned), the worker log lines about giving a claim up, and measured
times (printed as ``[measured] ...`` lines; ``pytest -s`` shows them)."""

from __future__ import annotations

import json
import time
from typing import Any

from celery.exceptions import TaskRevokedError

from celery_idempotency import IdempotentTask, KeyState
from celery_idempotency.keys import RecordRef
from celery_idempotency.records import Record
from tests.support.integration import TIMEOUT, Effects, LogLine, log_lines, wait_for
from tests.support.workers import Worker

SETTLE = 0.5  # after an outcome: long enough for a stray extra execution to show up
# A revoked, expired or terminated task fails its key with what Celery's backend records for it.
REVOKED = f"{TaskRevokedError.__module__}.{TaskRevokedError.__qualname__}"


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

