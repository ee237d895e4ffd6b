"""The Celery app of the recovery-point tests (tests/integration/test_steps.py), run by real
workers.

Configured from the environment like ``tests.integration.app`` (BROKER_URL, STORE_URL,
EFFECTS_URL, QUEUE). Its tasks run three steps (`STEPS`) through ``self.step``; each step's
function is `side_effect`, which writes to a ledger in the effects db:

- ``steps:ledger:<job>``   one JSON entry per call of a step function (step, its run number,
                           a unique ``sid``, pid, task id, the owner's fence, the step key it
                           was given, wall-clock start), written before it does anything else;
- ``steps:returned:<job>`` the same entry once the function is about to return (its work done);
- ``steps:count:<job>:<step>`` calls of that step function;
- ``steps:done:<job>``     one entry each time ``self.step`` returned in the task body (the
                           step's value is recorded by then, or was replayed from its record).

What a test asks a step to do is keyed by ``"<step>#<run>"`` (the n-th call of that step for
the job): ``pauses`` (sleep that long inside the function: a moment to kill or freeze it) and
``fails`` (raise `StepFailed`, or `Declined` for ``"<step>#<run>:declined"``). ``gaps``, keyed
by ``"<step>@<attempt>"`` (the n-th run of the task body for the job), sleeps in the body after
that step returned, between two steps.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from celery_idempotency import IdempotentTask
from tests.support.apps import RedisFromEnv, worker_app

STEPS = ("charge", "order", "receipt")

app = worker_app("steps", redelivering=True)
app.conf.update(json.loads(os.environ.get("EXTRA_CONF") or "{}"))

effects = RedisFromEnv("EFFECTS_URL")  # effects(): the effects db's client


class StepFailed(RuntimeError):
    """A step's function failed (not a cached error: the key's failure is retryable)."""


class Declined(Exception):
    """A cached error (``idempotency_cache_errors``): the outcome is final."""


def side_effect(job: str, step: str, *, task_id: str, fence: int | None, step_key: str,
                pauses: dict[str, float], fails: list[str]) -> dict[str, Any]:
    """A step's side effect: one ledger entry per call, then the work a test asked for."""
    client = effects()
    run = int(client.incr(f"steps:count:{job}:{step}"))
    entry = {"step": step, "run": run, "sid": uuid.uuid4().hex[:12], "pid": os.getpid(),
             "task_id": task_id, "fence": fence, "step_key": step_key, "t": time.time()}
    client.rpush(f"steps:ledger:{job}", json.dumps(entry))
    pause = pauses.get(f"{step}#{run}")
    if pause:
        time.sleep(pause)
    if f"{step}#{run}" in fails:
        raise StepFailed(f"{step} of {job} failed (run {run})")
    if f"{step}#{run}:declined" in fails:
        raise Declined(f"{step} of {job} declined (run {run})")
    client.rpush(f"steps:returned:{job}", json.dumps(entry))
    return {"step": step, "run": run, "sid": entry["sid"]}


def _checkout(task: Any, job: str, pauses: dict[str, float] | None,
              fails: list[str] | None, retry_after: str | None,
              gaps: dict[str, float] | None = None) -> dict[str, Any]:
    """The three steps; ``retry_after``: ``self.retry()`` once, right after that step."""
    attempt = int(effects().incr(f"steps:attempt:{job}"))
    done: dict[str, Any] = {}
    for name in STEPS:
        done[name] = task.step(
            name, side_effect, job, name, task_id=task.request.id,
            fence=task.request.idempotency_fence, step_key=task.step_key(name),
            pauses=pauses or {}, fails=fails or [])
        effects().rpush(f"steps:done:{job}", json.dumps(
            {"step": name, "task_id": task.request.id, "attempt": attempt, "t": time.time(),
             "pid": os.getpid(), "value": done[name]}))
        gap = (gaps or {}).get(f"{name}@{attempt}")
        if gap:
            time.sleep(gap)
        if name == retry_after and task.request.retries == 0:
            raise task.retry(countdown=0.2)
    return {"job": job, "steps": done, "task_id": task.request.id,
            "fence": task.request.idempotency_fence}


@app.task(base=IdempotentTask, bind=True, idempotency_lease=30, max_retries=3)
def checkout(self: Any, job: str, pauses: dict[str, float] | None = None,
             fails: list[str] | None = None, retry_after: str | None = None) -> dict[str, Any]:
    """A lease far longer than any test waits: a key freed early was freed on purpose."""
    return _checkout(self, job, pauses, fails, retry_after)


@app.task(base=IdempotentTask, bind=True, idempotency_lease=1.5)
def checkout_short_lease(self: Any, job: str, pauses: dict[str, float] | None = None,
                         fails: list[str] | None = None,
                         gaps: dict[str, float] | None = None) -> dict[str, Any]:
    """A lease a frozen process outlives within a test."""
    return _checkout(self, job, pauses, fails, None, gaps)


@app.task(base=IdempotentTask, bind=True, idempotency_lease=30,
          idempotency_cache_errors=(Declined,))
def checkout_declinable(self: Any, job: str, pauses: dict[str, float] | None = None,
                        fails: list[str] | None = None) -> dict[str, Any]:
    """`Declined` is cached: a final outcome, like success."""
    return _checkout(self, job, pauses, fails, None)
