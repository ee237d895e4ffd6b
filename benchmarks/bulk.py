"""Section "bulk": a nightly job publishing many keyed tasks, 30% of them repeats.

The same sequence of calls (``calls`` publishes, ``duplicate_share`` of them repeating a call
made earlier in the sequence, chosen uniformly among the earlier ones), published by one thread
to a queue of our own on the Redis broker, no worker (the queue is deleted after each run):

* plain ``apply_async`` of a plain task, one call at a time: every call is sent, repeats too;
* ``IdempotentTask.apply_async``, one call at a time: one store round trip per call, repeats
  not sent;
* ``IdempotentTask.apply_many``: one store round trip per batch of 1000, one producer, repeats
  not sent;
* the same calls as the members of one plain ``celery.group`` (one store round trip per member,
  repeats sent: group members always are) and of one ``IdempotentGroup`` (one store round trip
  for the whole group, repeats sent); a group's message carries its group id and index, and
  Celery freezes every member first, so both cost more per message than a plain call.

Publishes per second count every call of the sequence, sent or found to be a repeat.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

from celery import group

from celery_idempotency import IdempotentGroup

from .app import TASKS
from .stack import Stack, interleave, median, unique

CASES = ("plain apply_async, every call sent", "idempotent apply_async, one by one",
         "idempotent apply_many", "idempotent members, celery.group",
         "idempotent members, IdempotentGroup")
BASELINE, BULK, PLAIN_GROUP, BATCHED_GROUP = CASES[0], CASES[2], CASES[3], CASES[4]


def call_items(calls: int, duplicate_share: float, seed: int = 14) -> list[int]:
    """Item numbers of the sequence: new items in order, with ``duplicate_share`` of the
    positions (never the first) repeating an earlier item."""
    rng = random.Random(seed)
    repeats = set(rng.sample(range(1, calls), round(calls * duplicate_share)))
    items: list[int] = []
    fresh = 0
    for position in range(calls):
        if position in repeats:
            items.append(rng.choice(items))
        else:
            items.append(fresh)
            fresh += 1
    return items


def _publish_rate(stack: Stack, queue: str, case: str, items: list[int]) -> float:
    run = uuid.uuid4().hex[:10]
    start = time.perf_counter()
    if case == BULK:
        TASKS["idempotent"].apply_many([((run, item), {}) for item in items])
    elif case in (PLAIN_GROUP, BATCHED_GROUP):
        kind = group if case == PLAIN_GROUP else IdempotentGroup
        kind(TASKS["idempotent"].s(run, item) for item in items).apply_async()
    else:
        task = TASKS["plain" if case == BASELINE else "idempotent"]
        for item in items:
            task.apply_async((run, item))
    elapsed = time.perf_counter() - start
    stack.delete_queue("redis", queue)
    return len(items) / elapsed


def bulk_publish(stack: Stack, *, calls: int, duplicate_share: float, rounds: int,
                 log: Any) -> dict[str, Any]:
    queue = unique("idem-bench-bulk")
    stack.configure_publisher("redis", queue)
    items = call_items(calls, duplicate_share)
    warmup = call_items(max(100, calls // 10), duplicate_share)
    for case in CASES:
        _publish_rate(stack, queue, case, warmup)

    def measure(case: str, index: int) -> float:
        stack.flush_stores()
        rate = _publish_rate(stack, queue, case, items)
        log(f"[bulk] round {index + 1} {case:40s} {rate:8.0f} calls/s")
        return rate

    samples = interleave(list(CASES), rounds, measure)
    stack.flush_stores()
    base = median(samples[BASELINE])
    group_ratio = median(samples[BATCHED_GROUP]) / median(samples[PLAIN_GROUP])
    return {"calls_per_run": calls, "distinct_keys": len(set(items)),
            "duplicate_share": duplicate_share, "rounds": rounds, "broker": "redis",
            "results": {case: {"calls_per_s": median(samples[case]),
                               "ratio_to_plain": median(samples[case]) / base,
                               "samples": samples[case]} for case in CASES},
            # The batched group against the plain group of the same members.
            "group_ratio_to_plain_group": group_ratio}
