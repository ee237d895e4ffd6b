"""Section 3: the publish path alone, one thread, no worker (messages pile up in a queue of our
own on the Redis broker, deleted after each run).

* new key: every call has new arguments, so every call is sent to the broker;
* duplicate key: the same arguments every time; for `IdempotentTask` that is the fast path
  (one store round trip, nothing sent), for celery-once an `AlreadyQueued` raised and caught,
  for celery-singleton the original task's handle.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

from celery_once import AlreadyQueued

from .app import TASKS
from .stack import Stack, interleave, median, unique

CASES = {
    "plain apply_async (new args)": ("plain", False),
    "idempotent, new key": ("idempotent", False),
    "idempotent, duplicate key": ("idempotent", True),
    "celery-once, new key": ("celery-once", False),
    "celery-once, duplicate (AlreadyQueued)": ("celery-once", True),
    "celery-singleton, new key": ("celery-singleton", False),
    "celery-singleton, duplicate": ("celery-singleton", True),
}
BASELINE = "plain apply_async (new args)"


def _publish_rate(stack: Stack, queue: str, case: str, calls: int) -> float:
    config, duplicate = CASES[case]
    task = TASKS[config]
    run = uuid.uuid4().hex[:10]
    if duplicate:  # the original: reserved/locked and sent once, outside the timing
        task.apply_async((run, 0))
    start = time.perf_counter()
    if duplicate and config == "celery-once":
        for _ in range(calls):
            with contextlib.suppress(AlreadyQueued):
                task.apply_async((run, 0))
    elif duplicate:
        for _ in range(calls):
            task.apply_async((run, 0))
    else:
        for item in range(calls):
            task.apply_async((run, item))
    elapsed = time.perf_counter() - start
    stack.delete_queue("redis", queue)
    return calls / elapsed


def publish_path(stack: Stack, *, calls: int, rounds: int, log: Any) -> dict[str, Any]:
    queue = unique("idem-bench-publish")
    stack.configure_publisher("redis", queue)
    cases = list(CASES)
    for case in cases:  # warm-up
        _publish_rate(stack, queue, case, max(50, calls // 10))

    def measure(case: str, index: int) -> float:
        stack.flush_stores()
        rate = _publish_rate(stack, queue, case, calls)
        log(f"[publish] round {index + 1} {case:40s} {rate:8.0f} publishes/s")
        return rate

    samples = interleave(cases, rounds, measure)
    stack.flush_stores()
    base = median(samples[BASELINE])
    return {"calls_per_run": calls, "rounds": rounds, "broker": "redis",
            "results": {case: {"publishes_per_s": median(samples[case]),
                               "ratio_to_plain": median(samples[case]) / base,
                               "samples": samples[case]} for case in cases}}
