"""Section 4: Redis round trips to the store per operation.

The store (and both lock libraries' locks) live on a redis-server of their own, so everything
it sees is store traffic. Two independent counts per phase:

* ``INFO commandstats`` deltas: every command Redis executed, including the ones a Lua script
  ran inside one EVALSHA;
* ``MONITOR``: the same commands tagged by origin, so that round trips (commands a client sent)
  are told apart from commands run inside a script (``[0 lua]``).

Phases, per configuration, with a warm worker (Redis broker, solo) and warm publisher:
publish new keys to a parking queue the worker does not consume; publish the same calls again
while the originals wait (duplicates); let the worker consume the parking queue (first
executions); publish the same calls again after they succeeded; and, for `IdempotentTask`, send
the same calls by name (``app.send_task``: no publish-time reservation) so that the worker sees
duplicates of succeeded keys (execution-time deduplication).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections import Counter
from typing import Any

import redis
from celery.signals import after_task_publish
from celery_once import AlreadyQueued

from . import app as bench_app
from .app import TASKS
from .stack import Stack, unique

CONFIGS = ["idempotent", "celery-once", "celery-singleton", "plain"]
_OURS = {"info", "echo", "config"}  # what this module itself sends to the store server


class CommandLog:
    """MONITOR of the store server in a thread, cut into phases by ECHO markers."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url)
        self.entries: list[tuple[str, str]] = []  # (origin "lua"/"client", command name)
        self._marks: dict[str, int] = {}
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="bench-monitor", daemon=True)

    def _listen(self) -> None:
        monitor_client = redis.Redis.from_url(self.url)
        with monitor_client.monitor() as monitor:
            self._started.set()
            for command in monitor.listen():
                text = command["command"]
                name = text.split(" ", 1)[0].lower()
                if name == "echo" and "bench-mark:" in text:
                    mark = text.split("bench-mark:", 1)[1].strip()
                    self._marks[mark] = len(self.entries)
                    if mark == "stop":
                        return
                    continue
                origin = "lua" if command["client_type"] == "lua" else "client"
                self.entries.append((origin, name))

    def start(self) -> None:
        self._thread.start()
        self._started.wait(5)
        self.mark("start")  # connects this client before any phase is measured

    def mark(self, name: str) -> None:
        self.client.echo(f"bench-mark:{name}")

    def stop(self) -> None:
        self.mark("stop")
        self._thread.join(10)
        self.client.close()

    def between(self, first: str, second: str) -> list[tuple[str, str]]:
        deadline = time.monotonic() + 5
        while second not in self._marks and time.monotonic() < deadline:
            time.sleep(0.01)
        return [entry for entry in self.entries[self._marks[first]:self._marks[second]]
                if entry[1] not in _OURS]


def _commandstats(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(value["calls"])
                    for name, value in stats.items()})


class Phases:
    def __init__(self, stats: redis.Redis, log: CommandLog) -> None:
        self.stats = stats
        self.log = log
        self.results: dict[str, Any] = {}
        self._count = 0

    def measure(self, name: str, operations: int, action: Any) -> None:
        self._count += 1
        before, begin = _commandstats(self.stats), f"{self._count}a"
        self.log.mark(begin)
        outcome = action()
        if operations < 0:  # the action says how many operations it waited for
            operations = int(outcome)
        end = f"{self._count}b"
        self.log.mark(end)
        delta = _commandstats(self.stats) - before
        for ours in _OURS:
            delta.pop(ours, None)
        entries = self.log.between(begin, end)
        client = Counter(name for origin, name in entries if origin == "client")
        lua = Counter(name for origin, name in entries if origin == "lua")
        per = max(operations, 1)
        self.results[name] = {
            "operations": operations,
            "round_trips": sum(client.values()) / per,
            "commands_in_scripts": sum(lua.values()) / per,
            "commands_executed": sum(delta.values()) / per,
            "round_trip_commands": {k: v / per for k, v in sorted(client.items())},
            "commandstats_delta": {k: v / per for k, v in sorted(delta.items())},
        }


class _Publisher:
    """Publishes ``calls`` calls of one task (same arguments on every call of ``send``)."""

    def __init__(self, task: Any, run: str, calls: int) -> None:
        self.task, self.run, self.calls = task, run, calls
        self.sent = 0

    def _on_publish(self, **_: Any) -> None:
        self.sent += 1

    def send(self, queue: str) -> None:
        after_task_publish.connect(self._on_publish, weak=False)
        try:
            for item in range(self.calls):
                with contextlib.suppress(AlreadyQueued):
                    self.task.apply_async((self.run, item), queue=queue)
        finally:
            after_task_publish.disconnect(self._on_publish)


class _Bench:
    def __init__(self, stack: Stack, worker: Any, calls: int) -> None:
        self.stack, self.worker, self.calls = stack, worker, calls
        self.nodename = f"{worker.name}@{socket.gethostname()}"
        self.done_key = f"bench:done:{worker.queues}"
        self.finished = 0

    def wait_finished(self, more: int) -> None:
        self.finished += more
        self.stack.wait_count(self.done_key, self.finished, timeout=120, worker=self.worker)
        time.sleep(0.2)  # let the last task's after-return writes land

    def warm_up(self) -> None:
        """Every task once through publisher and worker: connections open, scripts loaded."""
        for config in CONFIGS:
            run = uuid.uuid4().hex[:8]
            for item in range(20):
                TASKS[config].apply_async((run, item))
            bench_app.app.send_task(bench_app.IDEM, (run, 0))
        self.wait_finished(21 * len(CONFIGS))

    def consume(self, queue: str, expected: int) -> int:
        reply = bench_app.app.control.add_consumer(queue, reply=True,
                                                   destination=[self.nodename], timeout=5)
        if not reply:
            raise RuntimeError(f"worker {self.nodename} did not start consuming {queue}")
        self.wait_finished(expected)
        return expected

    def redeliver(self, run: str) -> None:
        """Send the same calls by name: no reservation at publish, the worker deduplicates."""
        for item in range(self.calls):
            bench_app.app.send_task(bench_app.IDEM, (run, item))
        self.wait_finished(self.calls)

    def config(self, config: str, phases: Phases) -> None:
        run = uuid.uuid4().hex[:8]
        parking, parking2 = unique("idem-bench-park"), unique("idem-bench-park2")
        publisher = _Publisher(TASKS[config], run, self.calls)
        try:
            phases.measure("publish, new key", self.calls, lambda: publisher.send(parking))
            phases.measure("publish, duplicate while pending", self.calls,
                           lambda: publisher.send(parking))
            queued = publisher.sent
            phases.measure("execute (first run)", -1, lambda: self.consume(parking, queued))
            phases.measure("publish, duplicate after success", self.calls,
                           lambda: publisher.send(parking2))
            if config == "idempotent":
                phases.measure("execute, duplicate of a succeeded key", self.calls,
                               lambda: self.redeliver(run))
        finally:
            self.stack.delete_queue("redis", parking)
            self.stack.delete_queue("redis", parking2)


def round_trips(stack: Stack, *, calls: int, log: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    command_log = CommandLog(stack.store.url())
    with stack.worker("redis", "solo", count_postrun=True) as worker:
        bench = _Bench(stack, worker, calls)
        bench.warm_up()
        command_log.start()
        stats = stack.store.client()
        _commandstats(stats)
        try:
            for config in CONFIGS:
                phases = Phases(stats, command_log)
                bench.config(config, phases)
                results[config] = phases.results
                log(f"[round trips] {config}: " + ", ".join(
                    f"{name} {value['round_trips']:.2f}"
                    for name, value in phases.results.items()))
        finally:
            command_log.stop()
            stats.close()
    return {"calls_per_phase": calls, "broker": "redis", "pool": "solo", "results": results}
