"""Sections 1 and 2: end-to-end throughput through real workers.

Time runs from the first publish to the moment the side-effect counter reaches the number of
messages that were actually sent (polled every 2 ms by this process): the same end detection for
every configuration, and no result backend anywhere.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

from celery.signals import after_task_publish
from celery_once import AlreadyQueued

from .app import TASKS
from .stack import Stack, Stalled, interleave, median

CONFIGS = ["plain", "idempotent", "celery-once", "celery-singleton"]
# Section 1 also runs the floor of the design (plain + three bare store round trips, app.py).
UNIQUE_CONFIGS = [*CONFIGS, "floor"]
DUPLICATE_SHARES = [0.0, 0.1, 0.3, 0.5, 0.7]
TIMEOUT = 300.0


@dataclass
class RunResult:
    seconds: float
    publish_seconds: float
    publishes: int
    sent: int
    executions: int
    keys: int
    keys_run_twice: int
    already_queued: int

    @property
    def rate(self) -> float:
        return self.publishes / self.seconds


def _run(stack: Stack, config: str, items: list[int], worker: Any,
         work_ms: float = 0.0) -> RunResult:
    """Publish ``items`` (item ids; a repeated id is a duplicate publish) as fast as one thread
    can, then wait until every message that was sent has run its side effect."""
    task = TASKS[config]
    run = uuid.uuid4().hex[:10]
    counter, per_key = f"bench:n:{run}", f"bench:k:{run}"
    sent = 0

    def on_publish(**_: Any) -> None:
        nonlocal sent
        sent += 1

    already_queued = 0
    after_task_publish.connect(on_publish, weak=False)
    try:
        start = time.perf_counter()
        for item in items:
            try:
                task.apply_async((run, item, work_ms) if work_ms else (run, item))
            except AlreadyQueued:
                already_queued += 1
    finally:
        after_task_publish.disconnect(on_publish)
    published = time.perf_counter()
    end = stack.wait_count(counter, sent, timeout=TIMEOUT, worker=worker)
    time.sleep(0.05)  # anything run more often than sent would show up now
    executions = int(stack.effects.get(counter) or 0)
    counts = [int(v) for v in stack.effects.hvals(per_key)]
    stack.effects.delete(counter, per_key)
    return RunResult(end - start, published - start, len(items), sent, executions, len(counts),
                     sum(1 for c in counts if c > 1), already_queued)


def _measure_unique(stack: Stack, worker: Any, *, label: str, items: list[int],
                    work_ms: float, log: Any) -> Any:
    def measure(config: str, index: int) -> float:
        stack.flush_stores()
        result = _run(stack, config, items, worker, work_ms)
        if result.executions != len(items) or result.keys != len(items):
            raise RuntimeError(f"{config}: {result.executions} executions of "
                               f"{len(items)} unique tasks")
        log(f"[throughput] {label} round {index + 1} {config:16s} "
            f"{result.rate:8.0f} tasks/s (published in {result.publish_seconds:.2f} s, "
            f"done in {result.seconds:.2f} s)")
        return result.rate

    return measure


def unique_throughput(stack: Stack, *, brokers: list[str], pools: list[str], tasks: int,
                      rounds: int, warmup: int, log: Any, work_ms: float = 0.0,
                      configs: list[str] | None = None) -> dict[str, Any]:
    """Section 1: ``tasks`` distinct calls per run; ratio of each configuration to plain.
    With ``work_ms``, every task also waits that long (section 1b)."""
    configs = configs or UNIQUE_CONFIGS
    results: dict[str, Any] = {}
    for broker in brokers:
        for pool in pools:
            label = f"{broker}/{pool}" + (f" +{work_ms:g} ms" if work_ms else "")
            log(f"[throughput] {label}: starting worker")
            try:
                with stack.worker(broker, pool) as worker:
                    for config in configs:  # warm-up: connections, scripts, imports
                        stack.flush_stores()
                        _run(stack, config, list(range(warmup)), worker, work_ms)
                    samples = interleave(configs, rounds, _measure_unique(
                        stack, worker, label=label, items=list(range(tasks)),
                        work_ms=work_ms, log=log))
            except Stalled as exc:
                # Seen with RabbitMQ and the solo pool for every configuration, plain Celery
                # included: the worker idles in epoll while the queue holds ready messages.
                log(f"[throughput] {label}: STALLED, block skipped: {str(exc).splitlines()[0]}")
                results[f"{broker}/{pool}"] = {"stalled": str(exc).splitlines()[0]}
                continue
            plain = median(samples["plain"])
            results[f"{broker}/{pool}"] = {
                config: {"tasks_per_s": median(samples[config]),
                         "ratio_to_plain": median(samples[config]) / plain,
                         "samples": samples[config]}
                for config in configs}
    return {"tasks_per_run": tasks, "rounds": rounds, "work_ms": work_ms, "configs": configs,
            "results": results}


def duplicate_sequence(total: int, fraction: float, seed: int) -> list[int]:
    """``total`` publishes of which ``round(fraction * total)`` repeat an earlier item: a client
    retrying some earlier request (chosen uniformly among the items published so far)."""
    rng = random.Random(seed)
    duplicates = round(fraction * total)
    positions = set(rng.sample(range(1, total), duplicates))
    items: list[int] = []
    next_item = 0
    for index in range(total):
        if index in positions:
            items.append(rng.choice(items))
        else:
            items.append(next_item)
            next_item += 1
    return items


def _measure_duplicates(stack: Stack, worker: Any, *, label: str, items: list[int],
                        runs: dict[str, list[RunResult]], log: Any) -> Any:
    distinct = len(set(items))
    share = 1 - distinct / len(items)

    def measure(config: str, index: int) -> float:
        stack.flush_stores()
        result = _run(stack, config, items, worker)
        runs[config].append(result)
        log(f"[duplicates {share:.0%}] {label} round {index + 1} {config:16s} "
            f"{result.rate:8.0f} publishes/s, {result.executions} executions "
            f"({distinct} distinct), {result.already_queued} AlreadyQueued")
        return result.rate

    return measure


def duplicate_workload(stack: Stack, *, broker: str, pool: str, tasks: int,
                       fractions: list[float], rounds: int, warmup: int,
                       log: Any) -> dict[str, Any]:
    """Section 2: throughput (publishes per second) and side-effect executions."""
    results: dict[str, Any] = {}
    label = f"{broker}/{pool}"
    with stack.worker(broker, pool) as worker:
        for config in CONFIGS:
            stack.flush_stores()
            _run(stack, config, list(range(warmup)), worker)
        for fraction in fractions:
            items = duplicate_sequence(tasks, fraction, seed=int(fraction * 1000))
            distinct = len(set(items))
            runs: dict[str, list[RunResult]] = {c: [] for c in CONFIGS}
            samples = interleave(CONFIGS, rounds, _measure_duplicates(
                stack, worker, label=label, items=items, runs=runs, log=log))
            plain = median(samples["plain"])
            results[f"{fraction:.0%}"] = {
                "share": fraction, "publishes": tasks, "distinct_keys": distinct,
                "configs": {config: {
                    "publishes_per_s": median(samples[config]),
                    "ratio_to_plain": median(samples[config]) / plain,
                    "executions": median([r.executions for r in runs[config]]),
                    "executions_samples": [r.executions for r in runs[config]],
                    "extra_executions": median([r.executions - distinct
                                                for r in runs[config]]),
                    "keys_run_more_than_once": median([r.keys_run_twice
                                                       for r in runs[config]]),
                    "already_queued": median([r.already_queued for r in runs[config]]),
                    "messages_sent": median([r.sent for r in runs[config]]),
                    "samples": samples[config],
                } for config in CONFIGS},
                # Against the peers, end to end: > 1 means IdempotentTask got through the same
                # publishes faster.
                "idempotent_over": {peer: median(samples["idempotent"]) / median(samples[peer])
                                    for peer in ("celery-once", "celery-singleton")}}
    return {"broker": broker, "pool": pool, "rounds": rounds, "results": results,
            "crossover": crossover(
                [(block["share"], min(block["idempotent_over"].values()))
                 for block in results.values()])}


def crossover(points: list[tuple[float, float]]) -> dict[str, Any]:
    """The duplicate share from which IdempotentTask stays ahead of the slower-to-beat peer:
    ``points`` are (share, min ratio over both peers) in increasing share. Linear interpolation
    between the last share where it was behind (ratio <= 1) and the next one; ``below`` when it
    is ahead at every share measured, ``above`` when it is behind at the last one."""
    points = sorted(points)
    behind = [index for index, (_, ratio) in enumerate(points) if ratio <= 1.0]
    if not behind:
        return {"share": None, "where": "below", "text": f"below {points[0][0] * 100:.0f} %"}
    last = behind[-1]
    if last == len(points) - 1:
        return {"share": None, "where": "above", "text": f"above {points[-1][0] * 100:.0f} %"}
    (s0, r0), (s1, r1) = points[last], points[last + 1]
    share = s0 + (1.0 - r0) * (s1 - s0) / (r1 - r0)
    return {"share": share, "where": "at", "text": f"{share * 100:.0f} %"}
