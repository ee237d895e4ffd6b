"""Section 7: the cost of a recovery point (``self.step``) next to the cost of a whole task.

In this process, on the real store (its own redis-server), ``Task.apply()`` of an
`IdempotentTask` whose body makes ``STEPS`` steps (each step's function returns a small dict at
once), with the key header a published message carries:

* ``0 steps``: claim + complete around an empty body (the whole task's worker-side path);
* ``STEPS steps, each run``: every step calls its function and records its value;
* ``STEPS steps, each replayed``: the same key after a retryable failure that recorded them
  all (untimed), so every step returns its recorded value without calling the function;
* ``plain``: the same body as a plain task (no store at all), and ``PING`` (one bare round
  trip with the store's client: the floor).

Per step = (median with steps - median without) / STEPS. Round trips per step are counted the
same way from MONITOR on the store's server (commands clients sent, as in section 4).
Blocks are interleaved so that a burst of noise hits all of them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from celery import Task

from celery_idempotency import IdempotentTask
from celery_idempotency.config import KEY_HEADER
from celery_idempotency.store import RedisKeyStore

from . import app as bench_app
from .roundtrips import CommandLog
from .stack import Stack, percentile

STEPS = 10
BLOCK = 50
NAME = "bench.steps"
PLAIN_NAME = "bench.steps.plain"


class _Failed(RuntimeError):
    """Not a cached error: the key fails retryable and keeps its steps."""


# Items whose next run fails after its steps (not an argument: the same call must run again
# under its key, which checks the arguments).
_FAIL_NEXT: set[int] = set()


def _value(index: int) -> dict[str, Any]:
    return {"step": index, "ok": True}


@bench_app.app.task(name=NAME, base=IdempotentTask, bind=True)
def stepper(self: Any, run: str, item: int, steps: int) -> dict[str, Any]:
    for index in range(steps):
        self.step(f"s{index}", _value, index)
    if item in _FAIL_NEXT:
        _FAIL_NEXT.discard(item)
        raise _Failed(f"{run}/{item}: fails after its steps")
    return {"item": item, "ok": True}


@bench_app.app.task(name=PLAIN_NAME, bind=True)
def plain_stepper(self: Any, run: str, item: int, steps: int) -> dict[str, Any]:
    for index in range(steps):
        _value(index)
    return {"item": item, "ok": True}


def _us(values: list[float]) -> dict[str, float]:
    micros = [v * 1e6 for v in values]
    return {"p50_us": percentile(micros, 0.5), "p90_us": percentile(micros, 0.9),
            "mean_us": sum(micros) / len(micros), "n": len(micros)}


class _Runs:
    """Applies of one key each (a new key per call), remembering which ones failed."""

    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:8]
        self.count = 0

    def next_key(self) -> tuple[int, str]:
        self.count += 1
        return self.count, f"steps-{self.run}-{self.count}"

    def apply(self, task: Task, item: int, key: str, steps: int, *, fail: bool = False,
              expect: str = "SUCCESS") -> float:
        if fail:
            _FAIL_NEXT.add(item)
        start = time.perf_counter()
        outcome = task.apply((self.run, item, steps), headers={KEY_HEADER: key})
        elapsed = time.perf_counter() - start
        if outcome.state != expect:
            raise RuntimeError(f"{task.name} with {steps} steps: {outcome.state} "
                               f"{outcome.traceback}")
        return elapsed


def step_cost(stack: Stack, *, iterations: int, log: Any) -> dict[str, Any]:
    stack.configure_publisher("redis", "idem-bench-steps-unused")
    store = RedisKeyStore.from_url(stack.store.url(0))
    runs = _Runs()
    labels = ["PING", "plain, 0 steps", "0 steps", f"{STEPS} steps, each run",
              f"{STEPS} steps, each replayed"]
    samples: dict[str, list[float]] = {label: [] for label in labels}

    def block(label: str) -> None:
        for _ in range(BLOCK):
            if label == "PING":
                start = time.perf_counter()
                store.client.ping()
                samples[label].append(time.perf_counter() - start)
                continue
            item, key = runs.next_key()
            if label.startswith("plain"):
                samples[label].append(runs.apply(plain_stepper, item, key, 0))
            elif label == "0 steps":
                samples[label].append(runs.apply(stepper, item, key, 0))
            elif label.endswith("each run"):
                samples[label].append(runs.apply(stepper, item, key, STEPS))
            else:  # record every step, fail retryable (untimed); then replay them all
                runs.apply(stepper, item, key, STEPS, fail=True, expect="FAILURE")
                samples[label].append(runs.apply(stepper, item, key, STEPS))

    for label in labels:  # warm-up: connections, scripts loaded
        block(label)
    for values in samples.values():
        values.clear()
    for _ in range(max(1, iterations // BLOCK)):
        for label in labels:
            block(label)
    stats = {label: _us(values) for label, values in samples.items()}
    base = stats["0 steps"]["p50_us"]
    per_step_run = (stats[f"{STEPS} steps, each run"]["p50_us"] - base) / STEPS
    per_step_replayed = (stats[f"{STEPS} steps, each replayed"]["p50_us"] - base) / STEPS
    round_trips = _round_trips(stack, runs)
    result = {
        "steps_per_task": STEPS,
        "iterations": len(samples["0 steps"]),
        "stats": stats,
        "step_run_us_p50": per_step_run,
        "step_replayed_us_p50": per_step_replayed,
        "task_overhead_us_p50": base - stats["plain, 0 steps"]["p50_us"],
        "ping_us_p50": stats["PING"]["p50_us"],
        "round_trips": round_trips,
    }
    log(f"[steps] PING p50 {result['ping_us_p50']:.0f} us; a task without steps "
        f"{base:.0f} us ({result['task_overhead_us_p50']:.0f} us above plain); a step "
        f"{per_step_run:.0f} us run and recorded ({round_trips['per_step_run']:.2f} round "
        f"trips), {per_step_replayed:.0f} us replayed "
        f"({round_trips['per_step_replayed']:.2f} round trips)")
    store.close()
    return result


def _round_trips(stack: Stack, runs: _Runs, calls: int = 20) -> dict[str, Any]:
    """Commands clients sent to the store per task of each kind (MONITOR), and per step."""
    command_log = CommandLog(stack.store.url())
    command_log.start()
    counts: dict[str, dict[str, float]] = {}
    try:
        for label, steps, replay in (("0 steps", 0, False), ("each run", STEPS, False),
                                     ("each replayed", STEPS, True)):
            keys = []
            for _ in range(calls):
                item, key = runs.next_key()
                if replay:
                    runs.apply(stepper, item, key, STEPS, fail=True, expect="FAILURE")
                keys.append((item, key))
            command_log.mark(f"{label}-a")
            for item, key in keys:
                runs.apply(stepper, item, key, steps)
            command_log.mark(f"{label}-b")
            entries = command_log.between(f"{label}-a", f"{label}-b")
            sent = [name for origin, name in entries if origin == "client"]
            by_name: dict[str, float] = {}
            for name in sent:
                by_name[name] = by_name.get(name, 0) + 1 / calls
            counts[label] = {"round_trips_per_task": len(sent) / calls, **{
                f"cmd:{name}": value for name, value in sorted(by_name.items())}}
    finally:
        command_log.stop()
    base = counts["0 steps"]["round_trips_per_task"]
    return {
        "per_task": counts,
        "per_step_run": (counts["each run"]["round_trips_per_task"] - base) / STEPS,
        "per_step_replayed": (counts["each replayed"]["round_trips_per_task"] - base) / STEPS,
    }


def table(data: dict[str, Any]) -> list[str]:
    """The section as Markdown lines (report.tables)."""
    stats, steps = data["stats"], data["steps_per_task"]
    trips = data["round_trips"]
    lines = ["", f"**7. Recovery points** (``self.step``; in-process ``Task.apply()`` on the "
             f"real store, {data['iterations']} samples each, interleaved blocks; a task of "
             f"{steps} steps whose functions return at once).", "",
             "| case | p50 µs | p90 µs | store round trips per task |", "|---|---:|---:|---:|"]
    trips_of = {"0 steps": "0 steps", f"{steps} steps, each run": "each run",
                f"{steps} steps, each replayed": "each replayed"}
    for label, values in stats.items():
        per_task = trips["per_task"].get(trips_of.get(label, ""), {})
        rt = per_task.get("round_trips_per_task")
        lines.append(f"| {label} | {values['p50_us']:.0f} | {values['p90_us']:.0f} | "
                     f"{'-' if rt is None else f'{rt:.2f}'} |")
    lines += ["", f"One step, run and recorded: {data['step_run_us_p50']:.0f} µs and "
              f"{trips['per_step_run']:.2f} store round trips; replayed from its record: "
              f"{data['step_replayed_us_p50']:.0f} µs and {trips['per_step_replayed']:.2f} "
              f"round trips. The whole task's own cost (claim + complete above a plain task): "
              f"{data['task_overhead_us_p50']:.0f} µs; a PING {data['ping_us_p50']:.0f} µs."]
    return lines
