"""The chaos run: publishers, real prefork workers killed and restarted at random moments, a
key store restarted with its data, and the analysis of what ran how often.

Sizes come from the environment (the CI configuration is the default; ``make chaos`` runs the
long one):

    CHAOS_TASKS           distinct keys (default 300)
    CHAOS_KILLS           SIGKILLs: whole worker process groups and single pool children (6)
    CHAOS_STORE_RESTARTS  restarts of the store's redis-server with its data (1)
    CHAOS_STORE_DOWNTIME  seconds the store stays down at each restart (1.0)
    CHAOS_ERROR_REPLIES   error-reply faults: the store's primary refuses every write with
                          NOREPLICAS (CONFIG SET min-replicas-to-write) for a while
                          (default: as many as store restarts)
    CHAOS_ERROR_SECONDS   how long each error-reply fault lasts (1.0)
    CHAOS_FAILOVERS       Sentinel failovers of the store, in the Sentinel run (default: as
                          many as store restarts)
    CHAOS_FAILOVER_MODE   "coordinated" (default: writes paused until the replica has them,
                          as Redis's FAILOVER command does) or "sentinel" (a plain SENTINEL
                          FAILOVER: acknowledged writes to the old primary can be lost; the
                          double executions they cause are counted apart)
    CHAOS_RATE            keys published per second (15)
    CHAOS_SEED            random seed (default: a new one, printed in the summary)
    CHAOS_SUMMARY_FILE    append each run's summary line to this file too
    CHAOS_WORKER_CONF     extra Celery settings for the workers only, as JSON (experiments:
                          '{"idempotency_enabled": false}' shows what the suite reports
                          when the workers deduplicate nothing)

Each run also writes chaos-report.txt (the summary, every window case and every problem, each
with its executions) next to the worker logs in the test's tmp_path.

How a second execution of a key is judged (the analysis needs no tolerance): every execution
records its pid, process group and start time together with the side effect (one MULTI), and
an end marker once the library's ``__call__`` has returned (after the completion write). The
test records every kill: which process (group) and when. A key may run again only after an
execution that has no end marker and whose process was killed while it ran; that is the
window between the side effect and the completion write, where no library can know whether
the side effect happened. Any other second execution is a double execution, and so is a
re-run that started before the previous execution's process was killed.

The task body is three recovery points (``self.step``, see chaos_app). The same reasoning holds
for each step on its own: a step's function may run again only if its previous run belongs to
an execution that was killed and whose ``self.step`` call for that step never returned (the
*step in flight*: killed inside the function, or after it and before its value was recorded).
A step run whose ``self.step`` call returned had its value recorded; running it again is a
*completed step re-run*, which must never happen. Step re-runs in flight are counted and
reported (and how many of them came after the function's own work was done); completed step
re-runs are asserted to be 0.

A step that cannot reach the store ends its execution without an outcome: the message comes
back later and the body runs again, returning the recorded steps. Such a re-run is no second
execution (it is counted as *resumed*), as long as it began after the first one ended and no
recorded step ran again; a step whose value could not be recorded then is a step in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from celery_idempotency import KeyState, RecordRef
from celery_idempotency.outcomes import decode_result
from celery_idempotency.result import accept_for
from tests.chaos import chaos_app
from tests.chaos.publisher import Entry, Published, run_schedule
from tests.chaos.stores import SentinelStore, accept_writes, primary_of, refuse_writes
from tests.support.procs import children_of, group_members, wait_gone
from tests.support.services import RedisServer
from tests.support.workers import ROOT, Worker

APP_MODULE = "tests.chaos.chaos_app"
MAIN_THREADS = 4  # publisher threads in the test process
PROC_THREADS = 2  # publisher threads in the second publisher process
DUP_THREAD = 0.4  # share of keys published again from another thread of the test process
DUP_PROCESS = 0.4  # share of keys published again from the second process
BY_NAME_SHARE = 0.5  # of the second process's duplicates, sent by name with the key header
RACE_SHARE = 0.6  # of those, published within 20 ms of the first publish; the rest 0-3 s later
PUBLISHER_BOOT = 3.0  # seconds for the second publisher process to import Celery
AIMED_SHARE = 0.7  # kills that wait for a running task to hit; the others hit whatever is there
AIM_FOR = 2.0  # seconds an aimed kill waits for a running task

# How an execution that a step ended (the store unreachable at a step) leaves the library's
# __call__: the message is re-sent (Retry), or requeued if that fails (Reject).
RESUMING_EXCEPTIONS = ("Retry", "Reject")

SUMMARIES: list[str] = []  # shown by tests/chaos/conftest.py in pytest's terminal summary


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


@dataclass(frozen=True)
class Sizes:
    tasks: int = 300
    kills: int = 6
    store_restarts: int = 1
    store_downtime: float = 1.0
    rate: float = 15.0
    seed: int = 0
    workers: int = 2
    concurrency: int = 2
    error_replies: int = 1
    error_seconds: float = 1.0
    failovers: int = 0
    coordinated_failover: bool = True

    @classmethod
    def from_env(cls) -> Sizes:
        mode = os.environ.get("CHAOS_FAILOVER_MODE") or "coordinated"
        if mode not in ("coordinated", "sentinel"):
            raise ValueError(f"CHAOS_FAILOVER_MODE must be coordinated or sentinel, not {mode!r}")
        restarts = _env_int("CHAOS_STORE_RESTARTS", 1)
        return cls(tasks=_env_int("CHAOS_TASKS", 300), kills=_env_int("CHAOS_KILLS", 6),
                   store_restarts=restarts,
                   store_downtime=float(os.environ.get("CHAOS_STORE_DOWNTIME") or 1.0),
                   rate=float(os.environ.get("CHAOS_RATE") or 15.0),
                   seed=_env_int("CHAOS_SEED", random.SystemRandom().randrange(10**9)),
                   error_replies=_env_int("CHAOS_ERROR_REPLIES", restarts),
                   error_seconds=float(os.environ.get("CHAOS_ERROR_SECONDS") or 1.0),
                   failovers=_env_int("CHAOS_FAILOVERS", restarts),
                   coordinated_failover=mode == "coordinated")

    def for_sentinel(self) -> Sizes:
        """The Sentinel run: failovers instead of restarts (a restarted primary would be
        failed over by a real deployment; here the failovers are the test's own)."""
        return dataclasses.replace(self, store_restarts=0)

    def for_single_server(self) -> Sizes:
        return dataclasses.replace(self, failovers=0)

    @property
    def publish_seconds(self) -> float:
        return self.tasks / self.rate

    @property
    def drain_timeout(self) -> float:
        """How long the run may take to finish every key once publishing and killing stop."""
        return 90.0 + self.tasks / 50


@dataclass(frozen=True)
class Kill:
    kind: str  # "group": a worker's whole process group; "child": one pool process
    worker: str
    pgid: int
    pid: int  # the pool child, or the worker's main process for a group kill
    pids: tuple[int, ...]  # every process that died
    t_sent: float  # wall clock just before the signal
    t_dead: float  # wall clock once every killed process was gone
    running: tuple[str, ...]  # executions that were running in the killed processes

    def ended(self, pid: int, pgid: int) -> bool:
        return pgid == self.pgid if self.kind == "group" else pid == self.pid


@dataclass
class Execution:
    key: str
    exec_id: str
    pid: int
    pgid: int
    t: float
    task_id: str
    fence: int | None
    sleep: float  # the body's work, split among its steps
    done_at: float | None = None
    killed_by: Kill | None = None
    steps_done: set[str] = field(default_factory=set)  # steps whose self.step returned here
    # How it ended when the library's __call__ raised instead: (exception class, wall clock).
    ended: tuple[str, float] | None = None

    def resumed_by(self, following: Execution) -> bool:
        """It ended without an outcome, the message coming back later (a step found the store
        unreachable: Retry, or Reject(requeue=True) if that could not be sent), and
        ``following`` began after that: not a second execution, the same one resumed."""
        return (self.done_at is None and self.ended is not None
                and self.ended[0] in RESUMING_EXCEPTIONS and following.t >= self.ended[1])

    @property
    def killed_while_working(self) -> bool:
        """Killed before its last step returned, certainly before the library's completion
        write; otherwise killed between the body's return and the end marker."""
        return self.killed_by is not None and chaos_app.STEPS[-1] not in self.steps_done


@dataclass
class StepRun:
    """One call of a step's function (``self.step`` found no record of the step)."""

    key: str
    step: str
    step_run: str
    exec_id: str
    t: float
    work_done: bool  # the function's own work was done (it was about to return)
    value_returned: bool  # some execution's self.step returned this run's value: recorded


@dataclass(repr=False)
class Report:
    broker: str
    sizes: Sizes
    publishes: int = 0
    deduplicated_at_publish: int = 0
    sent_by_name: int = 0
    publish_retries: int = 0
    kills: list[Kill] = field(default_factory=list)
    worker_restarts: int = 0
    store_restarts: list[tuple[float, float]] = field(default_factory=list)
    error_replies: list[tuple[float, float]] = field(default_factory=list)
    failovers: list[tuple[float, float]] = field(default_factory=list)
    # Double executions whose executions straddle a plain (uncoordinated) failover: writes
    # acknowledged by the old primary and lost with it. Counted apart, never hidden; always
    # empty for a coordinated failover, where they stay double executions.
    failover_losses: list[str] = field(default_factory=list)
    # Keys whose record (written to the old primary of a plain failover) is gone, their task
    # run once: a client retry would run it again. Counted apart from lost, never hidden.
    failover_forgotten: list[str] = field(default_factory=list)
    executions: int = 0
    lost: list[str] = field(default_factory=list)
    double_executed: list[str] = field(default_factory=list)
    window_cases: list[str] = field(default_factory=list)
    window_executions: int = 0
    window_details: list[str] = field(default_factory=list)
    window_after_work: int = 0  # re-runs after a kill between the body's return and end marker
    # Executions that a step ended (the store unreachable at it), run again from the message
    # that came back: not double executions when no recorded step ran again.
    resumed_executions: int = 0
    rerun_delays: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    step_runs: int = 0  # calls of a step's function
    # A step run again after its value was recorded (its self.step call returned): never
    # allowed, asserted to be 0.
    completed_steps_rerun: list[str] = field(default_factory=list)
    # A step run again because its execution was killed before its value was recorded:
    # allowed (a step is at-least-once), counted; and how many of those came after the
    # function's own work was done (killed between its return and the record).
    steps_in_flight_rerun: int = 0
    steps_in_flight_after_work: int = 0
    steps_in_flight_store: int = 0  # its value could not be recorded: store unreachable
    step_details: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    client_retries: int = 0  # re-publishes of keys whose message the broker lost
    duration: float = 0.0

    @property
    def duplicates(self) -> int:
        return self.publishes - self.sizes.tasks

    def summary(self) -> str:
        groups = sum(k.kind == "group" for k in self.kills)
        hit = sum(bool(k.running) for k in self.kills)
        downtime = sum(t1 - t0 for t0, t1 in self.store_restarts)
        return (f"chaos[{self.broker}] tasks={self.sizes.tasks} publishes={self.publishes} "
                f"duplicates={self.duplicates} ({self.duplicates / self.sizes.tasks:.0%} of "
                f"tasks: {self.deduplicated_at_publish} deduplicated at publish, "
                f"{self.sent_by_name} sent by name) "
                f"kills={len(self.kills)} (group {groups}, child {len(self.kills) - groups}; "
                f"{hit} hit a running task) worker_restarts={self.worker_restarts} "
                f"store_restarts={len(self.store_restarts)} ({downtime:.2f} s down, "
                f"{self.publish_retries} publishes refused and retried) "
                f"error_replies={len(self.error_replies)} failovers={len(self.failovers)}"
                f"{'' if self.sizes.coordinated_failover else ' (plain SENTINEL FAILOVER)'} "
                f"executions={self.executions} lost={len(self.lost)} "
                f"double_executed={len(self.double_executed)} "
                f"failover_losses={len(self.failover_losses)} "
                f"failover_forgotten={len(self.failover_forgotten)} "
                f"window_cases={len(self.window_cases)} ({self.window_executions} re-runs, "
                f"{self.window_after_work} of them after a kill past the body's work) "
                f"resumed={self.resumed_executions} "
                f"step_runs={self.step_runs} "
                f"completed_steps_rerun={len(self.completed_steps_rerun)} "
                f"steps_in_flight_rerun={self.steps_in_flight_rerun} "
                f"({self.steps_in_flight_after_work} after the step's work, "
                f"{self.steps_in_flight_store} after the store was unreachable) "
                f"client_retries={self.client_retries} "
                f"problems={len(self.problems)} seed={self.sizes.seed} "
                f"duration={self.duration:.1f}s")


class Workers:
    """The run's prefork workers: started, killed (group or one child) and restarted."""

    def __init__(self, env: dict[str, str], queue: str, log_dir: Path, sizes: Sizes) -> None:
        self.env = env
        self.queue = queue
        self.log_dir = log_dir
        self.sizes = sizes
        self.slots: list[Worker] = []
        self.started = 0
        self.retired: list[Worker] = []

    def _new(self) -> Worker:
        self.started += 1
        name = f"chaos{self.started}-{uuid.uuid4().hex[:6]}"
        return Worker(APP_MODULE, self.env, concurrency=self.sizes.concurrency, name=name,
                      queues=self.queue, log=self.log_dir / f"{name}.log")

    def start(self) -> None:
        self.slots = [self._new() for _ in range(self.sizes.workers)]
        threads = [threading.Thread(target=w.start) for w in self.slots]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for worker in self.slots:
            assert worker.process is not None and worker.process.poll() is None, worker.output()

    def main_pids(self) -> list[int]:
        return [w.process.pid for w in self.slots if w.process is not None]

    def kill_group(self, slot: int, running: dict[int, str]) -> Kill:
        worker = self.slots[slot]
        assert worker.process is not None
        pgid = worker.process.pid
        members = group_members(pgid)
        t_sent = time.time()
        worker.kill()  # SIGKILL to the group, then reap the main process
        for pid in members:
            wait_gone(pid)
        t_dead = time.time()
        worker.stop()  # closes its log
        self.retired.append(worker)
        replacement = self._new()
        self.slots[slot] = replacement
        replacement.start()
        return Kill("group", worker.name, pgid, pgid, tuple(members), t_sent, t_dead,
                    tuple(running[p] for p in members if p in running))

    def kill_child(self, slot: int, child: int, running: dict[int, str]) -> Kill:
        worker = self.slots[slot]
        assert worker.process is not None
        t_sent = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        wait_gone(child)
        t_dead = time.time()
        return Kill("child", worker.name, worker.process.pid, child, (child,), t_sent, t_dead,
                    (running[child],) if child in running else ())

    def stop(self) -> None:
        for worker in self.slots:
            worker.kill()
            worker.stop()

    def logs(self) -> list[Worker]:
        return [*self.retired, *self.slots]


class ChaosRun:
    def __init__(self, *, broker: str, broker_url: str, store: RedisServer | SentinelStore,
                 effects_url: str, queue: str, log_dir: Path, sizes: Sizes) -> None:
        self.broker = broker
        self.store_server = store
        self.sizes = sizes
        self.rng = random.Random(sizes.seed)
        self.run_id = uuid.uuid4().hex[:8]
        self.log_dir = log_dir
        self.urls = dict(broker_url=broker_url, store_url=store.url(0),
                         effects_url=effects_url, queue=queue)
        self.env = chaos_app.environment(**self.urls)
        self.effects = redis.Redis.from_url(effects_url)
        worker_env = {**self.env, "CHAOS_EXTRA_CONF": os.environ.get("CHAOS_WORKER_CONF", "")}
        self.workers = Workers(worker_env, queue, log_dir, sizes)
        self.report = Report(broker, sizes)
        self.errors: list[BaseException] = []

    # -- the plan ------------------------------------------------------------------------------

    def _plan(self) -> tuple[list[list[Entry]], list[Entry], dict[str, int]]:
        rng, sizes = self.rng, self.sizes

        def offset() -> float:
            return rng.uniform(0, 0.02) if rng.random() < RACE_SHARE else rng.uniform(0.02, 3.0)

        per_thread: list[list[Entry]] = [[] for _ in range(MAIN_THREADS)]
        other_process: list[Entry] = []
        sleeps: dict[str, int] = {}
        for i in range(sizes.tasks):
            key = f"{self.run_id}-{i:05d}"
            sleep_ms = sleeps[key] = rng.randint(0, 50)
            t = 0.2 + i / sizes.rate
            thread = i % MAIN_THREADS
            per_thread[thread].append((t, key, sleep_ms, "apply"))
            if rng.random() < DUP_THREAD:
                other = (thread + 1 + rng.randrange(MAIN_THREADS - 1)) % MAIN_THREADS
                per_thread[other].append((t + offset(), key, sleep_ms, "apply"))
            if rng.random() < DUP_PROCESS:
                how = "by_name" if rng.random() < BY_NAME_SHARE else "apply"
                other_process.append((t + offset(), key, sleep_ms, how))
        return per_thread, other_process, sleeps

    def _kill_plan(self) -> list[tuple[float, str]]:
        kinds = (["child", "group"] * math.ceil(self.sizes.kills / 2))[:self.sizes.kills]
        self.rng.shuffle(kinds)
        # A random moment in each of len(kinds) equal slices of the publishing time.
        span = self.sizes.publish_seconds / max(1, len(kinds))
        times = [0.5 + span * (i + self.rng.random()) for i in range(len(kinds))]
        return list(zip(times, kinds, strict=True))

    # -- chaos ---------------------------------------------------------------------------------

    def _running(self) -> dict[int, str]:
        return {int(pid): exec_id.decode()
                for pid, exec_id in self.effects.hgetall("running").items()}

    def _targets(self, kind: str, running: dict[int, str]
                 ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(worker slot, pid) of every target of a kill of ``kind``, and of the busy ones: the
        workers' main processes for a group kill, their pool children for a child kill."""
        mains = list(enumerate(self.workers.main_pids()))
        if kind == "group":
            return mains, [(s, pid) for s, pid in mains if set(children_of(pid)) & set(running)]
        children = [(s, child) for s, pid in mains for child in children_of(pid)]
        return children, [(s, child) for s, child in children if child in running]

    def _kill(self, kind: str) -> None:
        # Aimed: poll until some process runs a task body (its side effect is made, its
        # completion write is not), so that kills land in the window often enough to show
        # what happens there. Unaimed: whatever the processes are doing at that moment.
        aim_until = time.monotonic() + (AIM_FOR if self.rng.random() < AIMED_SHARE else 0)
        while True:
            running = self._running()
            every, busy = self._targets(kind, running)
            if busy or time.monotonic() >= aim_until:
                break
            time.sleep(0.001)
        slot, pid = self.rng.choice(busy or every)
        if kind == "group":
            kill = self.workers.kill_group(slot, running)
            self.report.worker_restarts += 1
        else:
            kill = self.workers.kill_child(slot, pid, running)
        self.report.kills.append(kill)

    def _chaos(self, start: float) -> None:
        try:
            for at, kind in self._kill_plan():
                pause = start + at - time.time()
                if pause > 0:
                    time.sleep(pause)
                self._kill(kind)
        except BaseException as exc:
            self.errors.append(exc)

    def _store_plan(self) -> list[tuple[float, str]]:
        """When the store's faults happen, as fractions of the publishing time: restarts (or
        failovers) evenly spread, error-reply faults in between, so that no two overlap."""
        sizes = self.sizes
        major = ["restart"] * sizes.store_restarts + ["failover"] * sizes.failovers
        plan = [((j + 1) / (len(major) + 1), kind) for j, kind in enumerate(major)]
        plan += [((j + 0.5) / (sizes.error_replies + 1), "error_reply")
                 for j in range(sizes.error_replies)]
        return sorted(plan)

    def _store_chaos(self, start: float) -> None:
        try:
            for fraction, kind in self._store_plan():
                pause = start + self.sizes.publish_seconds * fraction - time.time()
                if pause > 0:
                    time.sleep(pause)
                t0 = time.time()
                if kind == "restart":
                    # RedisServer.restart(keep_data=True), with the server away for a while
                    # in between: SHUTDOWN SAVE, a pause, then a new server loading the RDB.
                    assert isinstance(self.store_server, RedisServer)
                    self.store_server.stop(save=True)
                    time.sleep(self.sizes.store_downtime)
                    self.store_server.start(keep_data=True)
                    self.report.store_restarts.append((t0, time.time()))
                elif kind == "failover":
                    assert isinstance(self.store_server, SentinelStore)
                    self.store_server.failover(coordinated=self.sizes.coordinated_failover)
                    self.report.failovers.append((t0, time.time()))
                else:
                    # Every write refused with NOREPLICAS, then accepted again.
                    primary = primary_of(self.store_server)
                    refuse_writes(primary)
                    try:
                        time.sleep(self.sizes.error_seconds)
                    finally:
                        accept_writes(primary)
                    self.report.error_replies.append((t0, time.time()))
        except BaseException as exc:
            self.errors.append(exc)

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> Report:
        began = time.monotonic()
        chaos_app.configure(**self.urls)
        self.workers.start()
        per_thread, other_process, sleeps = self._plan()
        self.report.publishes = sum(map(len, per_thread)) + len(other_process)

        start = time.time() + PUBLISHER_BOOT
        get_deadline = start + self.sizes.publish_seconds + self.sizes.drain_timeout
        schedule = self.log_dir / "publisher-schedule.json"
        out = self.log_dir / "publisher-results.json"
        schedule.write_text(json.dumps({"start": start, "threads": PROC_THREADS,
                                        "get_deadline": get_deadline,
                                        "entries": other_process}))
        log = (self.log_dir / "publisher.log").open("wb")
        publisher = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.publisher", str(schedule), str(out)],
            env={**os.environ, **self.env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            chaos = threading.Thread(target=self._chaos, args=(start,), name="chaos")
            store_chaos = threading.Thread(target=self._store_chaos, args=(start,),
                                           name="store-chaos")
            chaos.start()
            store_chaos.start()
            published = run_schedule(per_thread, start=start)
            chaos.join()
            store_chaos.join()
            if self.errors:
                raise self.errors[0]
            self._wait_for_outcomes(sleeps, deadline=time.monotonic() + self.sizes.drain_timeout)
            self._settle()
            try:
                publisher.wait(timeout=max(10.0, get_deadline - time.time() + 10))
            except subprocess.TimeoutExpired:
                self.report.problems.append("the second publisher process did not finish")
            rows = json.loads(out.read_text()) if out.exists() else []
            if publisher.returncode not in (0, None) or len(rows) != len(other_process):
                self.report.problems.append(
                    f"second publisher: exit {publisher.returncode}, {len(rows)} of "
                    f"{len(other_process)} handles reported; see {log.name}")
            self._analyse(sleeps, published, rows)
        finally:
            if publisher.poll() is None:
                os.killpg(publisher.pid, signal.SIGKILL)
                publisher.wait()
            log.close()
            self.workers.stop()
            self.effects.close()
        self.report.duration = time.monotonic() - began
        self._write_report()
        return self.report

    def _write_report(self) -> None:
        report = self.report
        kills = [f"{k.kind:5} {k.worker} pid {k.pid} at {k.t_sent:.3f} (dead after "
                 f"{(k.t_dead - k.t_sent) * 1000:.0f} ms), running: {list(k.running)}"
                 for k in report.kills]
        delays = [f"{kind} kills: {len(values)} re-runs, {min(values):.2f} s min, "
                  f"{statistics.median(values):.2f} s median, {max(values):.2f} s max"
                  for kind, values in sorted(report.rerun_delays.items())]
        sections = [report.summary(), "re-run after the kill, window cases:", *delays,
                    "kills:", *kills, "store restarts:",
                    *(f"down {t0:.3f} - {t1:.3f}" for t0, t1 in report.store_restarts),
                    "error-reply faults (NOREPLICAS):",
                    *(f"refusing {t0:.3f} - {t1:.3f}" for t0, t1 in report.error_replies),
                    "failovers:",
                    *(f"failover {t0:.3f} - {t1:.3f}" for t0, t1 in report.failovers),
                    f"failover losses ({len(report.failover_losses)}): "
                    f"{report.failover_losses[:50]}",
                    f"failover forgotten ({len(report.failover_forgotten)}): "
                    f"{report.failover_forgotten[:50]}",
                    f"window cases ({len(report.window_details)}):", *report.window_details,
                    f"completed steps re-run ({len(report.completed_steps_rerun)}):",
                    *report.completed_steps_rerun,
                    f"step re-runs in flight ({len(report.step_details)}):",
                    *report.step_details,
                    f"problems ({len(report.problems)}):", *report.problems]
        (self.log_dir / "chaos-report.txt").write_text("\n".join(sections) + "\n")

    def _refs(self, keys: Any) -> Iterator[tuple[str, RecordRef]]:
        for key in keys:
            yield key, RecordRef(chaos_app.work.name, key)

    def _wait_for_outcomes(self, sleeps: dict[str, int], *, deadline: float) -> None:
        """Wait for every key, retrying as a client would: a key still ``pending`` past
        idempotency_pending_timeout lost its message (kombu's Redis transport loses one taken
        by a worker killed before it recorded it as unacked), and a client that got no answer
        publishes again, which the library then sends (deduplicated at execution)."""
        store = chaos_app.work.idem_store()
        waiting = set(sleeps)
        while waiting and time.monotonic() < deadline:
            now_ms = store.now_ms()
            for key, ref in list(self._refs(waiting)):
                record = store.get(ref)
                if record is not None and record.state is KeyState.SUCCEEDED:
                    waiting.discard(key)
                elif record is not None and record.pending_deadline_ms is not None \
                        and record.pending_deadline_ms < now_ms:
                    chaos_app.work.apply_async((key, sleeps[key]), idempotency_key=key)
                    self.report.client_retries += 1
            if waiting:
                time.sleep(0.5)

    def _settle(self) -> None:
        """Let stray messages (waiting duplicates, restored copies) reach a worker, so that an
        execution they would wrongly cause shows up in the effects db before it is read."""
        if self.broker != "redis":
            time.sleep(3.0)
            return
        broker = redis.Redis.from_url(self.urls["broker_url"])
        deadline = time.monotonic() + 15.0
        try:
            while time.monotonic() < deadline:
                queued = sum(int(broker.llen(name)) for name in broker.scan_iter(
                    match=f"{self.urls['queue']}*") if broker.type(name) == b"list")
                if queued == 0 and broker.hlen("unacked") == 0:
                    break
                time.sleep(0.25)
            time.sleep(1.0)
        finally:
            broker.close()

    # -- analysis ------------------------------------------------------------------------------

    def _executions(self, keys: list[str]) -> tuple[
            dict[str, list[Execution]], dict[str, int], dict[str, list[StepRun]]]:
        runs: dict[str, list[Execution]] = {}
        effect: dict[str, int] = {}
        step_runs: dict[str, list[StepRun]] = {}
        for i in range(0, len(keys), 500):
            batch = keys[i:i + 500]
            pipe = self.effects.pipeline(transaction=False)
            for key in batch:
                pipe.get(f"effect:{key}")
                pipe.lrange(f"runs:{key}", 0, -1)
                pipe.lrange(f"done:{key}", 0, -1)
                pipe.lrange(f"steps:{key}", 0, -1)
                pipe.lrange(f"stepends:{key}", 0, -1)
                pipe.lrange(f"stepdone:{key}", 0, -1)
                pipe.lrange(f"ended:{key}", 0, -1)
            replies = pipe.execute()
            for j, key in enumerate(batch):
                count, raw_runs, raw_done, raw_steps, raw_ends, raw_returned, raw_ended = \
                    replies[7 * j:7 * j + 7]
                effect[key] = int(count or 0)
                done = {d["exec"]: d["t"] for d in map(json.loads, raw_done)}
                ended = {d["exec"]: (d["error"], d["t"]) for d in map(json.loads, raw_ended)}
                returned = [json.loads(raw) for raw in raw_returned]
                steps_done: dict[str, set[str]] = defaultdict(set)
                for entry in returned:
                    steps_done[entry["exec"]].add(entry["step"])
                runs[key] = sorted(
                    (Execution(key, r["exec"], r["pid"], r["pgid"], r["t"], r["task_id"],
                               r["fence"], r["sleep"], done.get(r["exec"]),
                               steps_done=steps_done[r["exec"]], ended=ended.get(r["exec"]))
                     for r in map(json.loads, raw_runs)), key=lambda e: e.t)
                work_done = {raw.decode() for raw in raw_ends}
                recorded = {entry["sid"] for entry in returned}
                step_runs[key] = sorted(
                    (StepRun(key, s["step"], s["sid"], s["exec"], s["t"], s["sid"] in work_done,
                             s["sid"] in recorded)
                     for s in map(json.loads, raw_steps)), key=lambda r: r.t)
        return runs, effect, step_runs

    def _analyse(self, sleeps: dict[str, int], published: list[Published],
                 other_rows: list[dict[str, Any]]) -> None:
        report = self.report
        keys = sorted(sleeps)
        runs, effect, step_runs = self._executions(keys)
        report.executions = sum(map(len, runs.values()))
        report.step_runs = sum(map(len, step_runs.values()))
        report.publish_retries = (sum(p.attempts - 1 for p in published)
                                  + sum(row["attempts"] - 1 for row in other_rows))
        report.deduplicated_at_publish = (sum(bool(p.handle and p.handle.duplicate)
                                              for p in published)
                                          + sum(bool(row["duplicate"]) for row in other_rows))
        report.sent_by_name = sum(bool(row["by_name"]) for row in other_rows)

        by_process: dict[tuple[int, int], list[Execution]] = defaultdict(list)
        for execution in (e for es in runs.values() for e in es):
            by_process[(execution.pid, execution.pgid)].append(execution)
        kills = sorted(report.kills, key=lambda k: k.t_sent)
        for executions in by_process.values():
            executions.sort(key=lambda e: e.t)
            for index, execution in enumerate(executions):
                if execution.ended is not None:
                    continue  # it ended (raised) on its own, before any kill
                # The first kill of this process after the execution began: was it still
                # running then (no later execution in the same process before the kill)?
                for kill in kills:
                    if kill.t_dead < execution.t or not kill.ended(execution.pid,
                                                                   execution.pgid):
                        continue
                    following = executions[index + 1:index + 2]
                    if not following or following[0].t > kill.t_dead:
                        execution.killed_by = kill
                    break

        store = chaos_app.work.idem_store()
        accept = accept_for("json")
        stored: dict[str, Any] = {}
        for key, ref in self._refs(keys):
            executions = runs[key]
            if effect[key] != len(executions):
                report.problems.append(self._describe(
                    key, f"effect counter {effect[key]} != {len(executions)} executions",
                    executions))
            # Each execution but the last must have been cut short by a kill of its process
            # (no end marker), and the next one must have begun after that kill; or it ended
            # without an outcome because a step found the store unreachable (the message
            # comes back: resumed, its recorded steps not run again: see _analyse_steps).
            double = False
            window = []
            for previous, following in itertools.pairwise(executions):
                if previous.resumed_by(following):
                    report.resumed_executions += 1
                    continue
                window.append((previous, following))
                kill = previous.killed_by
                if previous.done_at is not None or kill is None or following.t < kill.t_sent:
                    double = True
            if double and self._lost_in_a_failover(executions):
                report.failover_losses.append(key)
                report.window_details.append(self._describe(
                    key, "executed again after a plain failover lost a write", executions))
            elif double:
                report.double_executed.append(key)
                report.problems.append(self._describe(key, "executed again outside the "
                                                      "window", executions))
            elif len(executions) > 1:
                if window:
                    report.window_cases.append(key)
                    report.window_executions += len(window)
                report.window_details.append(self._describe(
                    key, "window case" if window else "resumed after the store was unreachable",
                    executions))
                for previous, following in window:
                    assert previous.killed_by is not None
                    report.window_after_work += not previous.killed_while_working
                    report.rerun_delays[previous.killed_by.kind].append(
                        following.t - previous.killed_by.t_sent)

            self._analyse_steps(key, executions, step_runs[key])

            record = store.get(ref)
            if record is None and self._forgotten_in_a_failover(executions):
                report.failover_forgotten.append(key)
                report.window_details.append(self._describe(
                    key, "record lost with the old primary of a plain failover", executions))
                continue
            if record is None or record.state is not KeyState.SUCCEEDED or not executions:
                report.lost.append(key)
                what = f"{record.state.value if record else 'no record'} with " \
                       f"{len(executions)} executions"
                if record is not None:
                    what += self._whereabouts(record.task_id, record.updated_ms / 1000)
                report.problems.append(self._describe(key, what, executions))
                continue
            stored[key] = result = decode_result(record, accept=accept)
            if result.get("exec") != executions[-1].exec_id:
                report.problems.append(self._describe(
                    key, f"stored result {result!r} is not from the last execution",
                    executions))
            last = {step: runs_of[-1].step_run for step in chaos_app.STEPS
                    if (runs_of := [r for r in step_runs[key] if r.step == step])}
            if result.get("steps") != last:
                report.problems.append(self._describe_steps(
                    key, f"stored steps {result.get('steps')!r} are not each step's last run "
                    f"{last!r}", executions, step_runs[key]))

        # Every handle, from both processes, gets the key's one result.
        for item in published:
            if item.key not in stored or item.handle is None:
                continue
            try:
                got = item.handle.get(timeout=10)
            except Exception as exc:
                got = f"{type(exc).__name__}: {exc}"
            if got != stored[item.key]:
                if item.key not in report.lost:
                    report.lost.append(item.key)
                report.problems.append(f"{item.key}: handle {item.task_id} got {got!r}, "
                                       f"the store has {stored[item.key]!r}")
        for row in other_rows:
            if row["key"] in stored and row.get("result") != stored[row["key"]]:
                if row["key"] not in report.lost:
                    report.lost.append(row["key"])
                report.problems.append(f"{row['key']}: second process's handle {row['id']} "
                                       f"got {row.get('result', row.get('error'))!r}, the "
                                       f"store has {stored[row['key']]!r}")

    def _analyse_steps(self, key: str, executions: list[Execution],
                       step_runs: list[StepRun]) -> None:
        """Each step's runs for a key: a run again after the previous run's value was recorded
        is a completed step re-run; after a kill of the previous run's execution before that
        (or after that execution ended because the store was unreachable), a step in flight
        run again; otherwise a problem. (`_analyse` checks that the stored result holds each
        step's last run, the one recorded.)"""
        report = self.report
        by_exec = {e.exec_id: e for e in executions}
        for step in chaos_app.STEPS:
            mine = [run for run in step_runs if run.step == step]
            for previous, following in itertools.pairwise(mine):
                execution = by_exec.get(previous.exec_id)
                kill = execution.killed_by if execution is not None else None
                if previous.value_returned and self._straddles_a_plain_failover(
                        previous.t, following.t):
                    if key not in report.failover_losses:
                        report.failover_losses.append(key)
                    report.step_details.append(self._describe_steps(
                        key, f"step {step} run again after a plain failover lost its record",
                        executions, mine))
                elif previous.value_returned:
                    report.completed_steps_rerun.append(self._describe_steps(
                        key, f"step {step} run again after its value was recorded",
                        executions, mine))
                elif kill is not None and following.t >= kill.t_sent:
                    report.steps_in_flight_rerun += 1
                    report.steps_in_flight_after_work += previous.work_done
                    report.step_details.append(self._describe_steps(
                        key, f"step {step} in flight, run again after a {kill.kind} kill",
                        executions, mine))
                elif execution is not None and execution.ended is not None \
                        and execution.ended[0] in RESUMING_EXCEPTIONS \
                        and following.t >= execution.ended[1]:
                    # Its value could not be recorded (store unreachable past
                    # idempotency_store_write_timeout): the step in flight runs again.
                    report.steps_in_flight_rerun += 1
                    report.steps_in_flight_store += 1
                    report.step_details.append(self._describe_steps(
                        key, f"step {step} in flight, run again after the store was "
                        "unreachable", executions, mine))
                else:
                    report.problems.append(self._describe_steps(
                        key, f"step {step} run again with no kill of its previous run",
                        executions, mine))

    def _describe_steps(self, key: str, what: str, executions: list[Execution],
                        step_runs: list[StepRun]) -> str:
        lines = [self._describe(key, what, executions)]
        lines += [f"    step {r.step} run {r.step_run} exec {r.exec_id} t={r.t:.3f} "
                  f"work_done={r.work_done} recorded={r.value_returned}" for r in step_runs]
        return "\n".join(lines)

    def _straddles_a_plain_failover(self, before: float, after: float) -> bool:
        """Only for a plain SENTINEL FAILOVER: a failover ended between the two moments (a
        write acknowledged by the old primary may be gone)."""
        return not self.sizes.coordinated_failover and any(
            before < t1 and after > t0 for t0, t1 in self.report.failovers)

    def _lost_in_a_failover(self, executions: list[Execution]) -> bool:
        """Only for a plain SENTINEL FAILOVER: an execution began before a failover ended and
        the next one after it began (the claim or outcome written to the old primary was
        lost). A coordinated failover loses no acknowledged write: no excuse there."""
        if self.sizes.coordinated_failover:
            return False
        return any(previous.t < t1 and following.t > t0
                   for previous, following in itertools.pairwise(executions)
                   for t0, t1 in self.report.failovers)

    def _forgotten_in_a_failover(self, executions: list[Execution]) -> bool:
        """Only for a plain SENTINEL FAILOVER: the key ran, and its last execution began
        around a failover (its writes went to the old primary, then were dropped)."""
        if self.sizes.coordinated_failover or not executions:
            return False
        last = executions[-1].t
        return any(t0 - 1.0 <= last <= t1 for t0, t1 in self.report.failovers)

    def _whereabouts(self, task_id: str, since: float) -> str:
        """Where the message of a key that never finished went: the worker log lines that name
        its task id, and the kills closest to the record's last change."""
        seen = self.worker_log_lines(task_id, limit=5)
        near = sorted(self.report.kills, key=lambda k: abs(k.t_sent - since))[:2]
        lines = [f", task {task_id}, record last changed at {since:.3f}; worker log lines "
                 f"naming the task: {len(seen)}", *(f"    {line[:200]}" for line in seen),
                 *(f"    nearest kill: {k.kind} {k.worker} {k.t_sent - since:+.3f} s "
                   f"(processes dead {k.t_dead - since:+.3f} s)" for k in near)]
        return "\n".join(lines)

    def _describe(self, key: str, what: str, executions: list[Execution]) -> str:
        lines = [f"{key}: {what}"]
        for e in executions:
            kill = e.killed_by
            lines.append(
                f"    exec {e.exec_id} task {e.task_id} pid {e.pid} pgid {e.pgid} "
                f"fence {e.fence} t={e.t:.3f} work={e.sleep * 1000:.0f}ms done="
                f"{'-' if e.done_at is None else f'{e.done_at:.3f}'} "
                f"{'' if e.ended is None else f'ended={e.ended[0]} at {e.ended[1]:.3f} '}"
                f"killed_by="
                f"{'-' if kill is None else f'{kill.kind} {kill.worker} at {kill.t_sent:.3f}'}")
        return "\n".join(lines)

    def worker_log_lines(self, needle: str, limit: int = 40) -> list[str]:
        found = []
        for worker in self.workers.logs():
            for line in worker.output().splitlines():
                if needle in line:
                    found.append(f"[{worker.name}] {line}")
        return found[:limit]
